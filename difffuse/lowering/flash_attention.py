"""CUDA attention: FlashAttention-4 or FlashAttention-3 behind `difffuse::flash_attention`.

Kernels (read from upstream source, Dao-AILab/flash-attention):
- fa4: PyPI `flash-attn-4` (checked 4.0.0b40, `flash_attn/cute/interface.py`):
  ``flash_attn_func(q, k, v, softmax_scale=, causal=, return_lse=True) -> (out, lse)``,
  q/k/v/out ``[B, L, H, D]``, lse fp32 ``[B, H, Lq]`` (natural log). fp16/bf16. Head dims
  (`_validate_head_dims`): SM90: 8..256 for D and Dv, multiples of 16 bytes; SM100/110:
  8..128, or (192, 128), or (256, 256). Inputs whose stride(-1) != 1 or whose other
  strides / pointer are not 16-byte aligned are copied (`maybe_contiguous`). Kernels are
  CuTe-DSL JIT-compiled per configuration on first call (seconds); its on-disk cache is
  enabled by ``FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED=1`` read when `cache_utils` is
  imported, so we set it (unless the user set it) before the first import.
- fa3: an installed FlashAttention-3 (`hopper/` build of the same repository: module
  ``flash_attn_interface`` or ``flash_attn_3.flash_attn_interface``; not on PyPI, not a
  dependency): ``flash_attn_func(q, k, v, softmax_scale=, causal=, return_attn_probs=True)
  -> (out, softmax_lse)``, the same layouts; SM90 only; fp16/bf16 (a build may leave fp16
  or some head dims out, which only running it tells: see `_probe`).

Both take `[B, L, H, D]` tensors: the `[B, H, L, D]` views SDPA gets from diffusers are
transposed back (a view, no copy) and must then have stride 1 in D and 16-byte-aligned
strides, else the kernel would copy them; such calls stay on SDPA. `lse` is the kernel's,
already in the op's `[B, H, Lq]` layout.

Which kernel: `PREFERENCE` (measured per arch, head_dim and key count, benchmarks/attention.py),
overridden by the backend option ``attention_kernel`` ("fa3" | "fa4" | "auto"). Each
kernel's eligibility is stated once (`FlashKernel.limits`) on the typed site; the first
preferred kernel that is installed, takes the site and passed its probe is chosen, else
the call stays on SDPA (cuDNN) with every kernel's reason in the report.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib
import logging
import math
import os
from typing import Callable, Optional

import torch
from torch import Tensor

from . import ATTENTION_KERNEL
from .ops import attention_ref
from .sites import AttentionSite, TensorSpec, known

log = logging.getLogger("difffuse")

KERNEL_NAMES = ("fa4", "fa3")
DTYPES = (torch.float16, torch.bfloat16)

# ------------------------------------------------------------------ the kernels
@functools.lru_cache(None)  # called on every kernel launch: look the module up once
def _fa4_module():
    os.environ.setdefault("FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED", "1")
    return importlib.import_module("flash_attn.cute")


@functools.lru_cache(None)  # called on every kernel launch: search the module names once
def _fa3_module():
    for name in ("flash_attn_interface", "flash_attn_3.flash_attn_interface"):
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    raise ImportError("no FlashAttention-3 module (flash_attn_interface / flash_attn_3) is installed")


def _fa4_forward(q: Tensor, k: Tensor, v: Tensor, scale: float, causal: bool) -> tuple[Tensor, Tensor]:
    out, lse = _fa4_module().flash_attn_func(q, k, v, softmax_scale=scale, causal=causal, return_lse=True)
    return out, lse


def _fa3_forward(q: Tensor, k: Tensor, v: Tensor, scale: float, causal: bool) -> tuple[Tensor, Tensor]:
    res = _fa3_module().flash_attn_func(q, k, v, softmax_scale=scale, causal=causal, return_attn_probs=True)
    return res[0], res[1]


def _fa4_head_dims(d: int, dv: int, major: int) -> Optional[str]:
    if major == 9:
        ok = 8 <= d <= 256 and 8 <= dv <= 256
    else:
        ok = (8 <= d <= 128 and 8 <= dv <= 128) or (d, dv) in ((192, 128), (256, 256))
    if not ok or d % 8 or dv % 8:
        return f"head dims ({d}, {dv}) outside FA4's SM{major}0 limits"
    return None


def _fa3_head_dims(d: int, dv: int, major: int) -> Optional[str]:
    if not (d == dv and 8 <= d <= 256 and d % 8 == 0):
        return f"head dims ({d}, {dv}): FA3 here takes equal head dims, 8..256, multiples of 8"
    return None


@dataclasses.dataclass(frozen=True)
class FlashKernel:
    name: str
    label: str
    load: Callable
    forward: Callable  # ([B, L, H, D] q, k, v, scale, causal) -> (out [B, Lq, H, Dv], lse [B, H, Lq])
    arches: tuple[int, ...]  # compute-capability majors
    head_dims: Callable  # (d, dv, major) -> None | reason
    install: str

    def available(self) -> Optional[str]:
        return _import_reason(self.name)

    def limits(self, site: AttentionSite, major: int) -> Optional[str]:
        if major not in self.arches:
            return f"{self.label} runs on SM{'/'.join(f'{a}x' for a in self.arches)}, not SM{major}x"
        d, dv = site.q.shape[-1], site.v.shape[-1]
        if not (isinstance(d, int) and isinstance(dv, int)):
            return f"symbolic head dims ({d}, {dv})"
        return self.head_dims(d, dv, major)


KERNELS = {
    "fa4": FlashKernel("fa4", "FlashAttention-4", _fa4_module, _fa4_forward, (9, 10), _fa4_head_dims,
                       "pip install 'difffuse[cuda]' (flash-attn-4)"),
    "fa3": FlashKernel("fa3", "FlashAttention-3", _fa3_module, _fa3_forward, (9,), _fa3_head_dims,
                       "build FlashAttention-3 from flash-attention/hopper"),
}

# Measured order per (compute-capability major, head_dim, short keys): benchmarks/attention.py,
# benchmarks/RESULTS.md (H100, bf16, 2026-12-05). SM90, D=128: FA3 1.8-5.5 % faster than
# FA4 per call; D=64: FA4 4.5 % faster. With few keys (Wan's 512 text tokens) FA4's SM90
# kernel is 44 % slower than cuDNN while FA3 is on par: only FA3, else the node stays on
# cuDNN. Anything not listed: FA4, then FA3.
SHORT_KV = 2048  # fewer keys than this (statically known) count as short
PREFERENCE: dict[tuple[int, int, bool], tuple[str, ...]] = {
    (9, 128, False): ("fa3", "fa4"),
    (9, 64, False): ("fa4", "fa3"),
}
SHORT_ORDER = {9: ("fa3",)}
DEFAULT_ORDER = ("fa4", "fa3")


@functools.lru_cache(None)
def _import_reason(name: str) -> Optional[str]:
    try:
        KERNELS[name].load()
        return None
    except Exception as exc:  # noqa: BLE001  (a broken install is a reason, not a crash)
        return f"{KERNELS[name].label} is not importable ({type(exc).__name__}: {str(exc).splitlines()[0][:160]})"


_warned_none = False


def _warn_none_installed(reasons: list[str]) -> None:
    global _warned_none
    if not _warned_none:
        _warned_none = True
        log.warning("difffuse: no FlashAttention kernel is installed, so attention stays on SDPA (cuDNN): %s. "
                    "Install one with: %s", "; ".join(reasons), KERNELS["fa4"].install)


# ------------------------------------------------------------------ the op
@torch.library.custom_op("difffuse::flash_attention", mutates_args=(), device_types="cuda")
def flash_attention(q: Tensor, k: Tensor, v: Tensor, scale: Optional[float], is_causal: bool,
                    kernel: str) -> tuple[Tensor, Tensor]:
    """difffuse::attention on the named kernel: q/k/v [B, H, L, D] views, out [B, H, Lq, Dv]
    over [B, Lq, H, Dv] memory, lse fp32 [B, H, Lq]."""
    s = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    out, lse = KERNELS[kernel].forward(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), s, is_causal)
    return out.transpose(1, 2), lse


@flash_attention.register_fake
def _(q, k, v, scale, is_causal, kernel):
    b, h, lq = q.shape[0], q.shape[1], q.shape[2]
    out = q.new_empty((b, lq, h, v.shape[-1])).transpose(1, 2)
    return out, q.new_empty((b, h, lq), dtype=torch.float32)


# ------------------------------------------------------------------ eligibility
def _major(device: str) -> Optional[int]:
    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_capability(torch.device(device))[0]


def _blhd_reason(name: str, t: TensorSpec) -> Optional[str]:
    """t is a [B, H, L, D] view; the kernels read it as [B, L, H, D] in place only with
    stride 1 in D and 16-byte-aligned other strides."""
    align = 16 // t.dtype.itemsize
    if not known(t.stride[-1] == 1) or not all(known(s % align == 0) or known(s == 0) for s in t.stride[:-1]):
        return (f"{name} strides {tuple(t.stride)} are not stride-1 in D with 16-byte-aligned others: "
                "the flash kernels would copy it")
    return None


def _device_dtype_reason(site: AttentionSite) -> Optional[str]:
    for name in ("q", "k", "v"):
        t = getattr(site, name)
        if not t.device.startswith("cuda"):
            return f"{name} on {t.device}: the flash kernels need CUDA tensors"
        if t.dtype not in DTYPES:
            return f"dtype {t.dtype}: the flash kernels take fp16/bf16 (fp32 attention stays on SDPA)"
    return None


def _common_reason(site: AttentionSite) -> Optional[str]:
    for name in ("q", "k", "v"):
        reason = _blhd_reason(name, getattr(site, name))
        if reason:
            return reason
    return None


def order(major: int, site: AttentionSite) -> tuple[str, ...]:
    """The kernels to try, best first: the `attention_kernel` option's one, else the
    measured preference for this arch, head dim and key count (a symbolic key count is
    taken as long: self-attention's is the one that varies)."""
    choice = ATTENTION_KERNEL.get()
    if choice != "auto":
        return (choice,)
    lkv = site.k.shape[2]
    short = isinstance(lkv, int) and lkv < SHORT_KV
    if short and major in SHORT_ORDER:
        return SHORT_ORDER[major]
    return PREFERENCE.get((major, site.q.shape[-1], short), DEFAULT_ORDER)


def _head_dims_static(site: AttentionSite) -> Optional[str]:
    """Under dynamic shapes, specialize symbolic head dims to their values (a guard: head
    dims never vary between calls of one attention), so the kernels' head-dim limits and
    the layout rule (strides are multiples of D) are decided; B, H and L stay symbolic."""
    from torch.fx.experimental.symbolic_shapes import guard_int

    for t in (site.q, site.v):
        d = t.shape[-1]
        if not isinstance(d, int):
            try:
                guard_int(d)
            except Exception as exc:  # noqa: BLE001  (unbacked: no value to specialize to)
                return f"head dim {d} has no value to specialize to ({type(exc).__name__})"
    return None


def _ints(site: AttentionSite) -> AttentionSite:
    """The site with its (now specialized) head dims as ints."""
    def fix(t: TensorSpec) -> TensorSpec:
        shape = t.shape[:-1] + (int(t.shape[-1]),)
        return dataclasses.replace(t, shape=shape)
    return dataclasses.replace(site, q=fix(site.q), k=fix(site.k), v=fix(site.v))


def choose(site: AttentionSite) -> tuple[Optional[str], Optional[str]]:
    """(kernel name, None) for the kernel that computes this site, or (None, reason)."""
    reason = _device_dtype_reason(site) or _head_dims_static(site)
    if reason:
        return None, reason
    site = _ints(site)
    reason = _common_reason(site)
    if reason:
        return None, reason
    major = _major(site.q.device)
    if major is None:
        return None, "CUDA is not available at compile time"
    reasons, missing = [], []
    tried = order(major, site)
    for name in tried:
        kernel = KERNELS[name]
        why = kernel.available()
        if why:
            missing.append(why)
        else:
            why = kernel.limits(site, major) or _probe(name, site.q.device, site.q.dtype, site.q.shape[-1],
                                                       site.v.shape[-1], site.is_causal)
            if why is None:
                return name, None
        reasons.append(f"{name}: {why}")
    if missing and len(missing) == len(reasons) == len(KERNELS):
        _warn_none_installed(missing)
    reasons += [f"{n}: measured slower than cuDNN with {site.k.shape[2]} keys on SM{major}x"
                for n in KERNELS if n not in tried and ATTENTION_KERNEL.get() == "auto"]
    return None, "; ".join(reasons) + " (left on SDPA)"


def supports(site: AttentionSite) -> Optional[str]:
    return choose(site)[1]


def attention(q: Tensor, k: Tensor, v: Tensor, scale: Optional[float], is_causal: bool) -> tuple[Tensor, Tensor]:
    """The CUDA lowering's attention: the chosen kernel (traced with the site's tensors)."""
    site = AttentionSite(TensorSpec.of(q), TensorSpec.of(k), TensorSpec.of(v), scale, is_causal, True)
    name, reason = choose(site)
    if name is None:  # the pattern asked `supports` first: a different answer now is a bug
        raise RuntimeError(f"difffuse: attention site no longer eligible: {reason}")
    return torch.ops.difffuse.flash_attention(q, k, v, scale, is_causal, name)


# ------------------------------------------------------------------ probe
@functools.lru_cache(None)
def _probe(name: str, device: str, dtype: torch.dtype, d: int, dv: int, causal: bool) -> Optional[str]:
    """Run the kernel once on small random inputs of this configuration and compare with
    the reference op in fp32: an installed build may lack a dtype or head dim (FA3's build flags),
    which only running it tells. None if it ran and agreed, else why not."""
    from torch.utils._python_dispatch import _disable_current_modes

    try:
        with _disable_current_modes(), torch.no_grad():
            g = torch.Generator(device=device).manual_seed(0)
            shape = (1, 2, 128, d)
            q, k = (torch.randn(shape, device=device, dtype=dtype, generator=g) for _ in range(2))
            v = torch.randn((1, 2, 128, dv), device=device, dtype=dtype, generator=g)
            q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
            out, lse = flash_attention(q, k, v, None, causal, name)
            ref, ref_lse = attention_ref(q.float(), k.float(), v.float(), None, causal)
            err = ((out.float() - ref).norm() / ref.norm()).item()
            lse_err = (lse - ref_lse).abs().max().item()
    except Exception as exc:  # noqa: BLE001
        return f"{KERNELS[name].label} failed its probe run ({type(exc).__name__}: {str(exc).splitlines()[0][:160]})"
    if not (err < 2e-2 and lse_err < 1e-2):
        return f"{KERNELS[name].label} disagreed with the reference op on its probe (rel err {err:.1e}, lse err {lse_err:.1e})"
    return None
