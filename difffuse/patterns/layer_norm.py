"""A plain LayerNorm over the last dim, as other families meet it (not a family of its
own): qk_norm_rope takes it as the norm before a rope (CogVideoX's q/k norms).

    x ─(convert fp32)?─ var_mean(·, [-1], correction=0, keepdim) ─ (x - mean) * rsqrt(var + eps)
      ─ (* w)? ─ (b +)? ─ (convert)?                     (nn.LayerNorm / F.layer_norm, post-grad)

(operand order as canonicalize.py writes it: the rsqrt and the weight second, the bias first)

Checks: the reduction is the last dim only, eps a constant read from the match, the
input cast an exact upcast, weight and bias last-dim vectors that are parameters (a
computed [.., D] factor is a modulation, not an affine), the output shaped like x.
"""
from __future__ import annotations

import itertools

import torch
from torch._inductor.pattern_matcher import CallFunction, KeywordArg

from .common import CONVERT, aten, cast, is_number, is_upcast, match_reason, reduces_last_dim, val
from .norm_scale_shift import affine_reason, layer_norm


def build(upcast: bool, affine: str, out_cast: bool):
    x = KeywordArg("x")
    n = layer_norm(cast(x, users=2) if upcast else x)
    if "w" in affine:
        n = CallFunction(aten.mul.Tensor, n, KeywordArg("weight"))
    if "b" in affine:  # `n * w + b`: canonicalize.py puts the product second
        n = CallFunction(aten.add.Tensor, KeywordArg("bias"), n)
    return cast(n) if out_cast else n


# (upcast, affine, out_cast) -> pattern; larger first
PATTERNS = [((up, aff, oc), build(up, aff, oc))
            for up, aff, oc in itertools.product((True, False), ("wb", "w", ""), (True, False))]


def check(match, upcast: bool) -> dict | str:
    kw = match.kwargs
    x, out = kw["x"], match.output_node()
    xv, ov = val(x), val(out)
    if not isinstance(xv, torch.Tensor) or not xv.is_floating_point():
        return "LayerNorm input is not a floating-point tensor"
    if upcast and not is_upcast(next(n for n in match.nodes if n.target == CONVERT and n.args[0] is x)):
        return "the cast before the LayerNorm narrows its input"
    if not reduces_last_dim(kw["dims"], xv.ndim):
        return f"LayerNorm over dims {kw['dims']} of a {xv.ndim}-d tensor, not the last dim"
    if not is_number(kw["eps"]):
        return "LayerNorm eps is a tensor, not a constant"
    if tuple(ov.shape) != tuple(xv.shape):
        return f"LayerNorm output {tuple(ov.shape)} is broadcast past its input {tuple(xv.shape)}"
    reason = affine_reason(kw, xv.shape[-1], "LayerNorm ")
    if reason:
        return reason
    return {"x": x, "weight": kw.get("weight"), "bias": kw.get("bias"), "eps": float(kw["eps"]),
            "is_rms": False, "out_dtype": ov.dtype}


def match_at(node) -> tuple[dict | str, list] | None:
    """(site or reason, matched nodes) for a LayerNorm ending at `node`; None if none does."""
    for (upcast, _, _), pattern in PATTERNS:
        m = pattern.match(node)
        if m:
            return match_reason(m) or check(m, upcast), list(m.nodes)
    return None
