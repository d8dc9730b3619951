"""The ROCm lowering: AMD aiter's RMSNorm kernels (PyPI `amd-aiter`; PyPI `aiter` is an
unrelated async-iterator package, which this module refuses).

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

Families and sites the kernels cannot compute exactly (other dtypes, LayerNorm,
modulation, gates, scale_shift, qk_norm_rope) are left to Inductor: ``supports`` returns
the reason and the report shows it. The CUDA Triton lowering is not used as a second
choice here (it is another module's business; a site aiter refuses is plain Inductor).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .sites import NormScaleShiftSite, RMSNormSite, TensorSpec, known, specs

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


IMPLS = {"rms_norm": rms_norm, "norm_scale_shift": norm_scale_shift}


# ------------------------------------------------------------------ eligibility
# Stated once per kernel, from the typed site record alone (lowering/sites.py). aiter gets
# contiguous 2-D copies (`_rmsnorm2d*`), so operand strides never matter.
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


_RULES = {RMSNormSite: _rms_norm, NormScaleShiftSite: _norm_scale_shift}


def supports(site) -> Optional[str]:
    """None if aiter computes the site (a typed record) exactly as the reference op; else the reason."""
    rule = _RULES.get(type(site))
    return rule(site) if rule else f"no aiter kernel for {site.FAMILY}"
