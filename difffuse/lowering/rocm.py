"""The ROCm lowering: AMD aiter's RMSNorm and flash-attention kernels (PyPI `amd-aiter`;
PyPI `aiter` is an unrelated async-iterator package, which this module refuses).

Upstream calls, as read from ROCm/aiter `aiter/ops/rmsnorm.py` (checked at tag
v0.1.9.post1 and at main e404860, 2026-08):

- ``aiter.rmsnorm2d_fwd(input, weight, epsilon, use_model_sensitive_rmsnorm=0)`` returns
  a new tensor ``rmsnorm(input) * weight`` in input's dtype (fp32 accumulate); the weight
  must have input's dtype, be contiguous and hold ``hidden`` values; fp16/bf16 (main: also
  fp32). We pass 2-D contiguous ``[tokens, hidden]`` views.
- ``aiter.rmsnorm2d_fwd_with_add(out, input, residual_in, residual_out, weight, epsilon,
  ...)`` returns None and writes ``residual_out = input + residual_in`` and ``out =
  rmsnorm(residual_out) * weight``; every tensor in input's dtype and contiguous. The
  arguments after ``epsilon`` changed between releases (v0.1.9: ``use_model_sensitive_rmsnorm``;
  main: ``gemma_norm, use_model_sensitive_rmsnorm``), so we pass none of them
  positionally (none at all: the defaults are what we want).

Attention, as read from ROCm/aiter `aiter/ops/mha.py` and `csrc/py_itfs_ck/mha_fwd_kernels.cu`
(main e404860; the first twelve parameters are the same at tags v0.1.5, v0.1.9.post1,
v0.1.12 and v0.1.20.post1):

- ``aiter.flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False,
  window_size=(-1, -1, 0), bias=None, alibi_slopes=None, deterministic=True,
  return_lse=False, return_attn_probs=False, ...)`` on ``[B, L, H, D]`` tensors (v ``[B, L,
  H, Dv]``); ``softmax_scale=None`` means ``D ** -0.5``. With ``return_lse=True`` (and no
  attention probabilities) it returns ``(out, softmax_lse)``: ``out`` a new ``[B, Lq, H,
  Dv]`` tensor in q's dtype, ``softmax_lse`` a new fp32 ``[B, H, Lq]`` tensor, the natural-log
  logsumexp of each row of ``scale * q k^T`` (docstring; aiter's op test compares it with
  ``torch.logsumexp``).
- The Python wrapper zero-pads head dims that are not a multiple of 8 and slices ``out``
  back (so ``out`` may then be a non-contiguous view), and copies any input whose
  ``stride(-1) != 1``; other strides are read as given. The CK entry point then checks:
  fp16/bf16 (fp8 only with descales), q/k/v of one dtype, ``stride(-1) == 1``, head dims
  ``<= 256`` and multiples of 8, batch ``> 0``, query heads a multiple of key heads.
- ``causal=True`` aligns the mask to the bottom-right corner: the same as SDPA's top-left
  mask only when Lq == Lkv (the only causal calls the pattern sends).
- diffusers 0.42.1 (`models/attention_dispatch.py`, ``_aiter_flash_attention``, the
  ``aiter_fa2_hub`` backend, which loads the same function from the Hub kernel
  ``kernels-community/aiter-flash-attn-ck`` and admits bf16 only) calls it with ``q=, k=,
  v=, dropout_p=, softmax_scale=, causal=, return_lse=`` on ``[B, L, H, D]`` tensors and
  unpacks ``out, lse, *_``. We pass the same keywords, on ``[B, L, H, D]`` views of SDPA's
  ``[B, H, L, D]`` operands (no copy for diffusers' layout), and always ask for the lse
  (ring attention reads it; it costs one fp32 write per query row). ``supports`` states
  the CK limits; aiter's Triton fallback (a build without CK) is not modelled.

Families and sites the kernels cannot compute exactly (other dtypes, LayerNorm,
modulation, gates, scale_shift, qk_norm_rope, head dims over 256) are left to Inductor:
``supports`` returns the reason and the report shows it. The CUDA Triton lowering is not
used as a second choice here (it is another module's business; a site aiter refuses is
plain Inductor).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .sites import AttentionSite, NormScaleShiftSite, RMSNormSite, TensorSpec, known, specs

try:
    import aiter as _aiter
except ImportError as exc:
    raise ImportError(f"aiter (PyPI amd-aiter) is not importable: {exc}") from exc
if not all(hasattr(_aiter, f) for f in ("rmsnorm2d_fwd", "rmsnorm2d_fwd_with_add")):
    raise ImportError("the installed 'aiter' has no rmsnorm2d_fwd / rmsnorm2d_fwd_with_add: it is not AMD's "
                      "amd-aiter (PyPI 'aiter' is an unrelated package)")

DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _aiter_fn(name: str):
    """The aiter function, looked up when called."""
    import aiter

    return getattr(aiter, name)


def _define(name: str, fn, fake):
    """`difffuse::<name>` as a custom op; defined once per process (re-imports reuse it)."""
    if not hasattr(torch.ops.difffuse, name):
        op = torch.library.custom_op(f"difffuse::{name}", mutates_args=())(fn)
        op.register_fake(fake)
    return getattr(torch.ops.difffuse, name).default


def _rmsnorm2d(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    d = x.shape[-1]
    y = _aiter_fn("rmsnorm2d_fwd")(x.reshape(-1, d).contiguous(), weight.reshape(-1).contiguous(), eps)
    return y.reshape(x.shape)


def _rmsnorm2d_with_add(x: Tensor, residual: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    d = x.shape[-1]
    x2, r2 = x.reshape(-1, d).contiguous(), residual.reshape(-1, d).contiguous()
    out, residual_out = torch.empty_like(x2), torch.empty_like(x2)
    _aiter_fn("rmsnorm2d_fwd_with_add")(out, x2, r2, residual_out, weight.reshape(-1).contiguous(), eps)
    return out.reshape(x.shape), residual_out.reshape(x.shape)


def _like(x, *_):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


rmsnorm2d_fwd = _define("rocm_rmsnorm2d_fwd", _rmsnorm2d, _like)
rmsnorm2d_fwd_with_add = _define("rocm_rmsnorm2d_fwd_with_add", _rmsnorm2d_with_add,
                                 lambda x, residual, weight, eps: (_like(x), _like(x)))


def _weight(weight: Optional[Tensor], x: Tensor) -> Tensor:
    """The weight in x's dtype (`supports` allows only lossless casts); none = ones."""
    if weight is None:
        return torch.ones(x.shape[-1], dtype=x.dtype, device=x.device)
    return weight.to(x.dtype)


def rms_norm(x: Tensor, weight: Optional[Tensor], eps: float, out_dtype: torch.dtype) -> Tensor:
    """difffuse::rms_norm = aiter.rmsnorm2d_fwd(x2d, w in x's dtype, eps), cast to out_dtype."""
    return rmsnorm2d_fwd(x, _weight(weight, x), eps).to(out_dtype)


def norm_scale_shift(x, residual, gate, weight, bias, scale, shift, eps: float, k: float, is_rms: bool,
                     residual_dtype: torch.dtype, out_dtype: torch.dtype):
    """difffuse::norm_scale_shift, residual RMSNorm form only (no gate, bias or modulation):
    r = x + residual, out = rmsnorm(r) * w = aiter.rmsnorm2d_fwd_with_add."""
    out, r = rmsnorm2d_fwd_with_add(x, residual, _weight(weight, x), eps)
    return out.to(out_dtype), r


def _dense(t: Tensor) -> Tensor:
    """t with row-major strides, size-1 dims included (what the fake promises); copies only
    when t is not dense."""
    return t.contiguous().view(-1).view(t.shape)


def _flash_attn(q: Tensor, k: Tensor, v: Tensor, scale: Optional[float], is_causal: bool
                ) -> tuple[Tensor, Tensor]:
    """aiter.flash_attn_func on [B, L, H, D] views of the [B, H, L, D] operands, lse asked for;
    out comes back as [B, H, Lq, Dv] over dense [B, Lq, H, Dv] memory (the op's contract)."""
    q4, k4, v4 = (t.transpose(1, 2) for t in (q, k, v))
    out, lse = _aiter_fn("flash_attn_func")(q=q4, k=k4, v=v4, dropout_p=0.0, softmax_scale=scale,
                                            causal=is_causal, return_lse=True)
    return _dense(out).transpose(1, 2), _dense(lse)


def _attention_like(q, k, v, scale, is_causal):
    b, h, lq = q.shape[0], q.shape[1], q.shape[2]
    return q.new_empty((b, lq, h, v.shape[-1])).transpose(1, 2), q.new_empty((b, h, lq), dtype=torch.float32)


flash_attn = _define("rocm_flash_attn", _flash_attn, _attention_like)

IMPLS = {"rms_norm": rms_norm, "norm_scale_shift": norm_scale_shift, "attention": flash_attn}


# ------------------------------------------------------------------ eligibility
# Stated once per kernel, from the typed site record alone (lowering/sites.py). The norm
# kernels get contiguous 2-D copies (`_rmsnorm2d*`), so operand strides never matter.
def _weight_reason(weight: Optional[TensorSpec], x: TensorSpec) -> Optional[str]:
    if weight is None:
        return None
    d = x.shape[-1]
    if weight.ndim == 0 or weight.ndim > x.ndim or not known(weight.shape[-1] == d) or not known(weight.numel() == d):
        return f"weight of shape {tuple(weight.shape)} is not one value per column of x {tuple(x.shape)}"
    if weight.dtype == x.dtype:
        return None
    if x.dtype == torch.float32 and weight.dtype in (torch.float16, torch.bfloat16):
        return None  # widening the weight loses nothing
    return f"weight dtype {weight.dtype} != input dtype {x.dtype} (aiter takes the weight in the input's dtype)"


def _common(site) -> Optional[str]:
    for t in specs(site):
        if t.dtype not in DTYPES:
            return f"dtype {t.dtype}: aiter takes fp16/bf16/fp32"
        if t.has_zero_dim():
            return f"zero-size operand {tuple(t.shape)}: left to Inductor"
    if site.x.ndim == 0:
        return "0-d input"
    return None


def _rms_norm(site: RMSNormSite) -> Optional[str]:
    x = site.x
    reason = _common(site)
    if reason:
        return reason
    if site.out_dtype != x.dtype and x.dtype != torch.float32:
        return f"output dtype {site.out_dtype} wider than the {x.dtype} aiter writes"
    return _weight_reason(site.weight, x)


def _norm_scale_shift(site: NormScaleShiftSite) -> Optional[str]:
    if not site.is_rms:
        return "LayerNorm: aiter has no fused add + LayerNorm wired here"
    extra = [k for k in ("gate", "bias", "scale", "shift") if getattr(site, k) is not None]
    if extra:
        return f"has {', '.join(extra)}: rmsnorm2d_fwd_with_add is residual add + RMSNorm only"
    x, residual = site.x, site.residual
    if residual is None:
        return "no residual: plain rms_norm"
    reason = _common(site)
    if reason:
        return reason
    if len(residual.shape) != len(x.shape) or not all(known(a == b) for a, b in zip(residual.shape, x.shape)):
        return f"residual {tuple(residual.shape)} broadcasts against x {tuple(x.shape)}"
    if not (residual.dtype == x.dtype == site.residual_dtype == site.out_dtype):
        return (f"mixed dtypes (x {x.dtype}, residual {residual.dtype}, r {site.residual_dtype}, "
                f"out {site.out_dtype}): aiter computes everything in the input's dtype")
    return _weight_reason(site.weight, x)


ATTENTION_DTYPES = (torch.float16, torch.bfloat16)
MAX_HEAD_DIM = 256  # CK's check, after the wrapper pads to a multiple of 8 (so any D <= 256)


def _attention(site: AttentionSite) -> Optional[str]:
    if not hasattr(_aiter, "flash_attn_func"):
        return "the installed aiter has no flash_attn_func"
    q, k, v = site.q, site.k, site.v
    if len({q.dtype, k.dtype, v.dtype}) != 1 or q.dtype not in ATTENTION_DTYPES:
        return f"q/k/v dtypes {q.dtype}/{k.dtype}/{v.dtype}: aiter's flash_attn_func (CK) takes fp16/bf16"
    if any(t.has_zero_dim() for t in (q, k, v)):
        return "zero-size operand: left to Inductor"
    for name, d in (("q/k", q.shape[-1]), ("v", v.shape[-1])):
        if not known(d <= MAX_HEAD_DIM):
            return f"{name} head_dim {d}: aiter's CK flash attention takes at most {MAX_HEAD_DIM}"
    if site.is_causal and not known(q.shape[2] == k.shape[2]):
        return "causal with Lq != Lkv: aiter aligns the mask bottom-right, SDPA top-left"
    return None  # strides: the wrapper copies inputs with stride(-1) != 1; the lse is returned


_RULES = {RMSNormSite: _rms_norm, NormScaleShiftSite: _norm_scale_shift, AttentionSite: _attention}


def supports(site) -> Optional[str]:
    """None if aiter computes the site (a typed record) exactly as the reference op; else the reason."""
    rule = _RULES.get(type(site))
    return rule(site) if rule else f"no aiter kernel for {site.FAMILY}"
