"""The CUDA lowering: Triton kernels for the four families, cuBLASLt's GELU epilogue for
Linear + tanh-GELU.

- rms_norm, scale_shift, norm_scale_shift, qk_norm_rope: `triton_kernels` (fp32 math,
  fp16/bf16/fp32 operands, strided/broadcast operands read in place, weights and biases
  through their strides too, D <= 8192; the qk kernel reads half or full rope tables).
- linear_gelu: ``aten._addmm_activation(bias, x, w.t(), use_gelu=True)``, which on CUDA is
  cuBLASLt's tanh-GELU epilogue (on CPU the same op computes erf-GELU, so CUDA tensors only).
- attention: FlashAttention-4 / -3 (`flash_attention.py`), where one is installed and
  takes the call; else the SDPA node stays (cuDNN).

Replacements are traced functionalized (`trace_replacement`), so each Triton launcher
decomposes into Inductor's user-defined-Triton-kernel node and the generated code
launches the kernel itself instead of calling an op through the dispatcher.
Under ``TRITON_INTERPRET=1`` (CPU tests) the launchers stay opaque op calls that run
the interpreted kernels eagerly.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import flash_attention as fa
from . import triton_kernels as tk
from .sites import (AttentionSite, LinearGeluSite, NormScaleShiftSite, QKNormRopeSite, RMSNormSite, RopeSite,
                    ScaleShiftSite, TensorSpec, known, specs)

INTERPRET = tk.INTERPRET
FLOATS = (torch.float16, torch.bfloat16, torch.float32)


def trace_replacement(fn, args):
    """Trace a replacement with Python functionalization, so `triton_op` launchers
    decompose into `triton_kernel_wrapper_functional` nodes (None under the interpreter)."""
    from torch._inductor.pattern_matcher import fwd_only
    from torch._subclasses.functional_tensor import dispatch_functionalize

    return fwd_only(dispatch_functionalize(fn), args)


if INTERPRET:
    trace_replacement = None  # noqa: F811  (opaque op calls; the interpreter runs eagerly)


def linear_gelu(x: Tensor, weight: Tensor, bias: Tensor, out_dtype: torch.dtype) -> Tensor:
    """gelu_tanh(x @ w.T + b) as one cuBLASLt GEMM with a GELU epilogue."""
    return torch.ops.aten._addmm_activation.default(bias, x, weight.t(), use_gelu=True).to(out_dtype)


def norm_scale_shift(x, residual, gate, weight, bias, scale, shift, eps: float, k: float, is_rms: bool,
                     residual_dtype: torch.dtype, out_dtype: torch.dtype):
    """difffuse::norm_scale_shift. Without a residual, r is only x upcast: it is left as an
    aten cast beside the kernel, so Inductor drops it when nothing reads it."""
    if residual is None and gate is None and torch.promote_types(x.dtype, residual_dtype) == residual_dtype:
        return tk.norm_modulate(x, weight, bias, scale, shift, eps, k, is_rms, out_dtype), x.to(residual_dtype)
    return tk.norm_scale_shift(x, residual, gate, weight, bias, scale, shift, eps, k, is_rms, residual_dtype,
                               out_dtype)


# The qk-norm+rope kernel: "triton" (the default, launched by Inductor's generated code) or
# "jit" (the NVRTC-compiled CUDA C++ kernel in cuda_jit.py, an opaque op call; it falls
# back to Triton where it cannot be built or does not take the site).
QK_KERNEL = "triton"


def qk_norm_rope(x, weight, cos, sin, eps: float, num_heads: int, across_heads: bool, interleaved: bool,
                 out_dtype: torch.dtype, bias=None, is_rms: bool = True, full_tables: bool = False, eps_t=None):
    """difffuse::qk_norm_rope through the kernel QK_KERNEL names; the JIT kernel only where
    `cuda_jit.supports` takes the call (judged on the same typed record), else Triton (which
    also takes eps as a 0-d tensor, `eps_t`)."""
    if QK_KERNEL == "jit" and not INTERPRET and eps_t is None:
        from . import cuda_jit

        site = QKNormRopeSite(*(TensorSpec.of(t) for t in (x, weight, cos, sin)), eps, num_heads, across_heads,
                              interleaved, out_dtype, TensorSpec.of(bias), is_rms, full_tables)
        if cuda_jit.available() is None and cuda_jit.supports(site) is None:
            return cuda_jit.jit_op(x, weight, cos, sin, eps, num_heads, across_heads, interleaved, out_dtype)
    return tk.qk_norm_rope(x, weight, cos, sin, eps, num_heads, across_heads, interleaved, out_dtype, bias, is_rms,
                           full_tables, eps_t)


def rope(x, cos, sin, interleaved: bool, out_dtype: torch.dtype, full_tables: bool = True) -> Tensor:
    """difffuse::rope as fp32 torch ops in the replacement graph: Inductor compiles them into
    one pointwise kernel (what it cannot do for the complex / fp64 spelling it replaces)."""
    from .ops import rope_ref

    return rope_ref(x, cos, sin, interleaved, full_tables).to(out_dtype)


IMPLS = {
    "rope": rope,
    "rms_norm": torch.ops.difffuse.triton_rms_norm.default,
    "scale_shift": torch.ops.difffuse.triton_scale_shift.default,
    "norm_scale_shift": norm_scale_shift,
    "qk_norm_rope": qk_norm_rope,
    "linear_gelu": linear_gelu,
    "attention": fa.attention,
}


# ------------------------------------------------------------------ eligibility
# Stated once per kernel, from the typed site record alone (lowering/sites.py).
def _common(site, what: str = "the Triton kernels") -> Optional[str]:
    """Device, dtype and size rule shared by every kernel."""
    for t in specs(site):
        if t.dtype not in FLOATS:
            return f"dtype {t.dtype}: {what} take fp16/bf16/fp32"
        if t.device != "cuda" and not INTERPRET:
            return f"tensor on {t.device}: {what} need CUDA tensors"
        if t.has_zero_dim():
            return f"zero-size operand {tuple(t.shape)}: left to Inductor"
    return None


def _width(d) -> Optional[str]:
    if not isinstance(d, int):
        return f"symbolic last dim {d}: the kernels need a static width"
    if d > tk.MAX_D:
        return f"last dim {d} > {tk.MAX_D}"
    return None


def _vector(t: Optional[TensorSpec], d, name: str) -> Optional[str]:
    """A weight or bias: one value per column (any stride: the kernels read it with its
    last dim's stride), leading dims of size 1."""
    if t is not None and (t.ndim == 0 or not known(t.shape[-1] == d) or not known(t.numel() == d)):
        return f"{name} of shape {tuple(t.shape)} is not one value per column ({d})"
    return None


def _lead(shape, inner: int = 1) -> Optional[str]:
    if len(shape) - inner > 3:
        return f"{len(shape)}-d operands: the kernels index at most 3 leading dims"
    return None


def _broadcast(*ts) -> Optional[tuple]:
    """The broadcast shape of the operands (TensorSpecs or shapes; None skipped), or None
    where they do not broadcast."""
    try:
        return tuple(torch.broadcast_shapes(*[getattr(t, "shape", t) for t in ts if t is not None]))
    except RuntimeError:
        return None


def _same(a, b) -> bool:
    return len(a) == len(b) and all(known(x == y) for x, y in zip(a, b))


def _computed_per_token(site, names, out_numel) -> Optional[str]:
    """A per-token modulation operand (a quarter of the output's values or more) that the
    graph computes (`TensorSpec.computed`, e.g. Wan 2.2 TI2V's `table + temb` chunks):
    Inductor fuses that computation into its own norm kernel, while ours would read it
    materialized, one extra write and read of the whole tensor. Measured slower on an H100
    (benchmarks/RESULTS.md), so left to Inductor."""
    for name in names:
        t = getattr(site, name)
        if t is not None and t.computed and known(4 * t.numel() >= out_numel):
            return (f"per-token {name} is computed in the graph: Inductor fuses it into its norm kernel, "
                    f"faster than materializing it for ours")
    return None


def _rms_norm(site: RMSNormSite) -> Optional[str]:
    shape = _broadcast(site.x, site.weight)
    if not shape:
        return f"x {tuple(site.x.shape)} and weight do not broadcast to a row of columns"
    d = shape[-1]
    return _common(site) or _width(d) or _lead(shape) or _vector(site.weight, d, "weight")


def _scale_shift(site: ScaleShiftSite) -> Optional[str]:
    shape = _broadcast(site.a, site.b, site.c)
    if not shape:
        return "a, b and c do not broadcast to a row of columns"
    return (_common(site) or _width(shape[-1]) or _lead(shape)
            or _computed_per_token(site, ("b",), site.a.numel()))


def _norm_scale_shift(site: NormScaleShiftSite) -> Optional[str]:
    r_shape = _broadcast(site.x, site.residual, site.gate)
    o_shape = _broadcast(site.x, site.residual, site.gate, site.weight, site.bias, site.scale, site.shift)
    if not r_shape or not o_shape:
        return "operands do not broadcast to a row of columns"
    if not _same(o_shape, r_shape):
        return f"modulation widens the output to {o_shape} from the residual's {r_shape}"
    d = r_shape[-1]
    return (_common(site) or _width(d) or _lead(r_shape) or _vector(site.weight, d, "weight")
            or _vector(site.bias, d, "bias") or _computed_per_token(site, ("gate", "scale", "shift"), site.x.numel()))


def _qk_norm_rope(site: QKNormRopeSite) -> Optional[str]:
    x, heads = site.x, site.num_heads
    if not isinstance(heads, int) or heads < 1:
        return f"number of heads {heads}"
    if not site.is_rms and site.across_heads:
        return "LayerNorm across heads: the Triton kernel normalises a LayerNorm per head only"
    if x.ndim < (1 if site.across_heads else 2):
        return f"{x.ndim}-d q/k"
    width = x.shape[-1]
    if site.across_heads and not known(width % heads == 0):
        return f"width {width} is not {heads} heads of one size"
    shape = site.out_shape
    hd = shape[-1]
    if not known(hd % 2 == 0):
        return f"odd head_dim {hd}"
    for t in (site.cos, site.sin):
        if not _same(_broadcast(t, shape) or (), shape):
            return f"cos/sin of shape {tuple(t.shape)} do not broadcast against q/k {tuple(shape)}"
    for name, t in (("weight", site.weight), ("bias", site.bias)):
        if t is not None and t.ndim > x.ndim:
            return f"{name} of shape {tuple(t.shape)} has more dims than q/k"
    return (_common(site) or _width(width) or _width(heads * hd) or _lead(shape, 2)
            or _vector(site.weight, width, "weight") or _vector(site.bias, width, "bias"))


def _linear_gelu(site: LinearGeluSite) -> Optional[str]:
    ts = specs(site)
    if any(t.device != "cuda" for t in ts):
        return "aten._addmm_activation computes erf-GELU off CUDA: tanh-GELU needs CUDA tensors"
    dtypes = {t.dtype for t in ts} | {site.out_dtype}
    if len(dtypes) != 1 or site.x.dtype not in FLOATS:
        return f"mixed or non-float dtypes {sorted(map(str, dtypes))}: cuBLASLt's epilogue takes one float dtype"
    return None


_RULES = {
    RMSNormSite: _rms_norm,
    ScaleShiftSite: _scale_shift,
    NormScaleShiftSite: _norm_scale_shift,
    QKNormRopeSite: _qk_norm_rope,
    LinearGeluSite: _linear_gelu,
    AttentionSite: fa.supports,
}


def _rope(site: RopeSite) -> Optional[str]:
    if not site.slow_spelling:
        return ("a real-valued rope alone is one pointwise kernel that Inductor already generates "
                "(difffuse fuses a rope with the norm before it, or rewrites complex / fp64 spellings)")
    return None


_RULES[RopeSite] = _rope


def supports(site) -> Optional[str]:
    """None if the CUDA lowering computes this site (a typed record, lowering/sites.py);
    else why it is left to Inductor."""
    rule = _RULES.get(type(site))
    return rule(site) if rule else f"no CUDA kernel for {site.FAMILY}"


# ------------------------------------------------------------------ fp8_quant (issue 29)
# A norm / modulation whose output torchao quantises to float8 per row: the plain kernel's
# fp8 twin (triton_kernels: the same math, then the row's amax, scale and e4m3 cast in
# registers), so the bf16 output is written only where something else reads it.
from .sites import FP8QuantSite  # noqa: E402


def fp8_quant(family: str, args: dict, store_y: bool, per_row: bool = True) -> tuple:
    """The fp8 twin of `family`'s op on its own arguments (by name): (y | empty, r | None, q, s).
    Per row: q and s from the kernel. Per tensor: the kernel writes y and each row's amax;
    the tensor's scale and the cast are torch ops here, which Inductor compiles (one small
    reduction and one pointwise kernel: the separate amax pass over y is what is saved)."""
    keep_y = store_y or not per_row
    if family == "rms_norm":
        y, q, s = tk.rms_norm_fp8(args["x"], args["weight"], args["eps"], args["out_dtype"], keep_y, per_row)
        r = None
    elif family == "scale_shift":
        y, q, s = tk.scale_shift_fp8(args["a"], args["b"], args["c"], args["k"], args["out_dtype"], keep_y, per_row)
        r = None
    else:
        a = dict(args)
        x, rdtype = a["x"], a["residual_dtype"]
        modulate_only = a["residual"] is None and a["gate"] is None and torch.promote_types(x.dtype, rdtype) == rdtype
        y, r, q, s = tk.norm_scale_shift_fp8(**a, store_r=not modulate_only, store_y=keep_y, per_row=per_row)
        r = x.to(rdtype) if modulate_only else r
    if not per_row:
        from .ops import FP8_INV_MAX, FP8_MAX

        amax = s.amax().reshape((1,) * y.ndim)  # every row's amax (exact in any order), NaN kept
        s = torch.where(amax == 0, torch.ones_like(amax), amax * FP8_INV_MAX)
        q = (y.float() / s).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return y, r, q, s


IMPLS["fp8_quant"] = fp8_quant


def _fp8_quant(site: FP8QuantSite) -> Optional[str]:
    if site.granularity not in ("row", "tensor"):
        return f"{site.granularity} quantisation: the fused kernels quantise per row or per tensor"
    rule = _RULES.get(type(site.inner))
    reason = rule(site.inner) if rule else f"no CUDA kernel for {site.inner.FAMILY}"
    if reason:
        return reason
    if site.y.dtype not in FLOATS:
        return f"output dtype {site.y.dtype}"
    if not known(site.y.numel() > 0):
        return "zero-size output"
    return None


_RULES[FP8QuantSite] = _fp8_quant


def _read_norm_kernel(t: dict, out_dtype, r_dtype) -> tuple:
    args = {"x": t["X"], "residual": t.get("RES"), "gate": t.get("G"), "weight": t.get("W"), "bias": t.get("BIAS"),
            "scale": t.get("SC"), "shift": t.get("SH"), "eps": t["eps"], "k": t["k"], "is_rms": t["IS_RMS"],
            "residual_dtype": r_dtype or torch.float32, "out_dtype": out_dtype}
    return "norm_scale_shift", args, {"y": "OUT", "r": "R" if t["STORE_R"] else None}


def _read_kernel(name: str, t: dict, dtypes: dict) -> Optional[tuple]:
    """(family, the op's arguments by name, {output: key}) of one of the plain kernels this
    lowering launched, from the launch's named arguments (`t`, tensors as opaque values)
    and its buffers' dtypes; None for any other kernel."""
    if name == "norm_scale_shift_kernel":
        return _read_norm_kernel(t, dtypes["OUT"], dtypes.get("R"))
    if name == "rms_norm_kernel":
        return "rms_norm", {"x": t["X"], "weight": t.get("W"), "eps": t["eps"], "out_dtype": dtypes["Y"]}, {"y": "Y"}
    if name == "scale_shift_kernel":
        return "scale_shift", {"a": t["A"], "b": t["B"], "c": t.get("C"), "k": t["k"],
                               "out_dtype": dtypes["Y"]}, {"y": "Y"}
    return None


def _read_op(name: str, a: dict) -> Optional[tuple]:
    """The same for this lowering's opaque op calls (the Triton interpreter's form)."""
    if name == "triton_norm_scale_shift":
        return "norm_scale_shift", a, {"y": 0, "r": 1}
    if name == "triton_norm_modulate":
        return "norm_scale_shift", {**a, "residual": None, "gate": None, "residual_dtype": torch.float32}, {"y": None}
    if name in ("triton_rms_norm", "triton_scale_shift"):
        return name[len("triton_"):], a, {"y": None}
    return None


# how the fp8_quant family reads back a call this lowering emitted
READ_BACK = {"kernel": _read_kernel, "op": _read_op}
