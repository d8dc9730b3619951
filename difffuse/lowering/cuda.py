"""The CUDA lowering: Triton kernels for the four families, cuBLASLt's GELU epilogue for
Linear + tanh-GELU.

- rms_norm, scale_shift, norm_scale_shift, qk_norm_rope: `triton_kernels` (fp32 math,
  fp16/bf16/fp32 operands, strided/broadcast operands read in place, D <= 8192).
- linear_gelu: ``aten._addmm_activation(bias, x, w.t(), use_gelu=True)``, which on CUDA is
  cuBLASLt's tanh-GELU epilogue (on CPU the same op computes erf-GELU, so CUDA tensors only).

Replacements are traced functionalized (`trace_replacement`), so each Triton launcher
decomposes into Inductor's user-defined-Triton-kernel node and the generated code
launches the kernel itself instead of calling an op through the dispatcher.
Under ``TRITON_INTERPRET=1`` (CPU tests) the launchers stay opaque op calls that run
the interpreted kernels eagerly.
"""
from __future__ import annotations

from typing import Optional

import operator

import torch
from torch import Tensor

from ..patterns.common import aten, val
from . import triton_kernels as tk

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
                 out_dtype: torch.dtype, bias=None, is_rms: bool = True):
    """difffuse::qk_norm_rope through the kernel QK_KERNEL names (the JIT kernel: RMSNorm only)."""
    if QK_KERNEL == "jit" and not INTERPRET and is_rms and bias is None:
        from . import cuda_jit

        if cuda_jit.available() is None and cuda_jit.reason(x, num_heads, across_heads, cos, sin, weight) is None:
            return cuda_jit.jit_op(x, weight, cos, sin, eps, num_heads, across_heads, interleaved, out_dtype)
    return tk.qk_norm_rope(x, weight, cos, sin, eps, num_heads, across_heads, interleaved, out_dtype, bias, is_rms)


IMPLS = {
    "rms_norm": torch.ops.difffuse.triton_rms_norm.default,
    "scale_shift": torch.ops.difffuse.triton_scale_shift.default,
    "norm_scale_shift": norm_scale_shift,
    "qk_norm_rope": qk_norm_rope,
    "linear_gelu": linear_gelu,
}


# ------------------------------------------------------------------ eligibility
def _tensors(site: dict, names) -> list[Optional[Tensor]]:
    out = []
    for n in names:
        t = val(site.get(n))
        out.append(t if isinstance(t, torch.Tensor) else None)
    return out


def _common(ts, what: str = "the Triton kernels") -> Optional[str]:
    """Device and dtype rule shared by every kernel."""
    for t in ts:
        if t is None:
            continue
        if t.dtype not in FLOATS:
            return f"dtype {t.dtype}: {what} take fp16/bf16/fp32"
        if t.device.type != "cuda" and not INTERPRET:
            return f"tensor on {t.device.type}: {what} need CUDA tensors"
    return None


def _width(d) -> Optional[str]:
    if not isinstance(d, int):
        return f"symbolic last dim {d}: the kernels need a static width"
    if d > tk.MAX_D:
        return f"last dim {d} > {tk.MAX_D}"
    return None


def _vector(t: Optional[Tensor], d: int, name: str) -> Optional[str]:
    if t is not None and t.numel() != d:
        return f"{name} of shape {tuple(t.shape)} is not one value per column ({d})"
    return None


def _lead(shape, inner: int = 1) -> Optional[str]:
    if len(shape) - inner > 3:
        return f"{len(shape)}-d operands: the kernels index at most 3 leading dims"
    return None


def _rms_norm(site) -> Optional[str]:
    x, w = _tensors(site, ("x", "weight"))
    d = x.shape[-1]
    return _common([x, w]) or _width(d) or _lead(x.shape) or _vector(w, d, "weight")


_VIEWS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.squeeze.dim,
          aten.squeeze.dims, aten.unsqueeze.default, aten.expand.default, aten.permute.default,
          aten.slice.Tensor, aten.select.int, aten.split.Tensor, aten.split_with_sizes.default,
          aten.unbind.int, operator.getitem}


def _computed_per_token(site: dict, names, out_numel) -> Optional[str]:
    """A per-token modulation operand (as many values as the output) that the graph computes
    (e.g. Wan 2.2 TI2V's `table + temb` chunks): Inductor fuses that computation into its own
    norm kernel, while ours would read it materialized, one extra write and read of the whole
    tensor. Measured slower on an H100 (benchmarks/RESULTS.md), so left to Inductor."""
    for name in names:
        node = site.get(name)
        t = val(node)
        if not isinstance(t, torch.Tensor) or 4 * t.numel() < out_numel:
            continue
        while isinstance(node, torch.fx.Node) and node.target in _VIEWS:
            node = node.args[0]
        if isinstance(node, torch.fx.Node) and node.op == "call_function":
            return (f"per-token {name} is computed in the graph ({node.target}): Inductor fuses it into its "
                    f"norm kernel, faster than materializing it for ours")
    return None


def _scale_shift(site) -> Optional[str]:
    a, b, c = _tensors(site, ("a", "b", "c"))
    shape = torch.broadcast_shapes(*[t.shape for t in (a, b, c) if t is not None])
    return (_common([a, b, c]) or _width(shape[-1]) or _lead(shape)
            or _computed_per_token(site, ("b",), a.numel()))


def _norm_scale_shift(site) -> Optional[str]:
    ts = _tensors(site, ("x", "residual", "gate", "weight", "bias", "scale", "shift"))
    x, residual, gate, weight, bias, scale, shift = ts
    r_shape = torch.broadcast_shapes(*[t.shape for t in (x, residual, gate) if t is not None])
    o_shape = torch.broadcast_shapes(r_shape, *[t.shape for t in (weight, bias, scale, shift) if t is not None])
    if tuple(o_shape) != tuple(r_shape):
        return f"modulation widens the output to {tuple(o_shape)} from the residual's {tuple(r_shape)}"
    d = r_shape[-1]
    return (_common(ts) or _width(d) or _lead(r_shape) or _vector(weight, d, "weight")
            or _vector(bias, d, "bias") or _computed_per_token(site, ("gate", "scale", "shift"), x.numel()))


def _qk_norm_rope(site) -> Optional[str]:
    x, w, b, cos, sin = _tensors(site, ("x", "weight", "bias", "cos", "sin"))
    heads = site["num_heads"]
    if not site.get("is_rms", True) and site["across_heads"]:
        return "LayerNorm across heads: the Triton kernel normalises a LayerNorm per head only"
    if site["across_heads"]:
        shape = (*x.shape[:-1], heads, x.shape[-1] // heads)
        width = x.shape[-1]
    else:
        shape = tuple(x.shape)
        width = shape[-1]
    hd = shape[-1]
    if isinstance(hd, int) and hd % 2:
        return f"odd head_dim {hd}"
    for t in (cos, sin):
        try:
            torch.broadcast_shapes(t.shape, shape)
        except RuntimeError:
            return f"cos/sin of shape {tuple(t.shape)} do not broadcast against q/k {tuple(shape)}"
    return (_common([x, w, b, cos, sin]) or _width(width) or _width(heads * hd) or _lead(shape, 2)
            or _vector(w, width, "weight") or _vector(b, width, "bias"))


def _linear_gelu(site) -> Optional[str]:
    x, w, b = _tensors(site, ("x", "weight", "bias"))
    for t in (x, w, b):
        if t.device.type != "cuda":
            return "aten._addmm_activation computes erf-GELU off CUDA: tanh-GELU needs CUDA tensors"
    dtypes = {x.dtype, w.dtype, b.dtype, site["out_dtype"]}
    if len(dtypes) != 1 or x.dtype not in FLOATS:
        return f"mixed or non-float dtypes {sorted(map(str, dtypes))}: cuBLASLt's epilogue takes one float dtype"
    return None


_RULES = {
    "rms_norm": _rms_norm,
    "scale_shift": _scale_shift,
    "norm_scale_shift": _norm_scale_shift,
    "qk_norm_rope": _qk_norm_rope,
    "linear_gelu": _linear_gelu,
}


def supports(family: str, site: dict) -> Optional[str]:
    """None if the CUDA kernel computes this site; else why it is left to Inductor."""
    rule = _RULES.get(family)
    return rule(site) if rule else f"no CUDA kernel for {family}"
