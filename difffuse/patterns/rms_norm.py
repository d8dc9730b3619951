"""rms_norm: RMSNorm written any of the ways real code writes it.

    x ─(convert fp32)?─┬─ pow(·, 2) | mul(·, ·) ─ mean.dim([-1], keepdim) | sum/D ─ add(eps) ─ rsqrt ─┐
                       └──────────────────────────────────────────── mul ◀──────────────────────────┘
                        ─ (convert)? ─ (mul w)? ─ (convert)?
      ==>  difffuse::rms_norm(x, w, eps, out_dtype)

nn.RMSNorm / F.rms_norm decompose to the pow/mean/add.Scalar form; hand-written code
gives add.Tensor; `x*x` and `sum/n` stay separate nodes; diffusers' RMSNorm casts to the
weight's dtype before the weight multiply. eps, D and the dtypes are read from the match.
Not matched: reduction over another dim, a mean that is not of x squared, eps outside
the rsqrt, a weight that broadcasts over another dim, a narrowing cast before the norm.
"""
from __future__ import annotations

import itertools

import torch
from torch._inductor.pattern_matcher import CallFunction, KeywordArg

from .common import CONVERT, Family, Variant, aten, cast, is_last_dim_vector, is_number, is_upcast, val

ADD_EPS = [aten.add.Scalar, aten.add.Tensor]


def rms_core(x, square: str, reduce: str, order: str, xs=None):
    """The normalisation `x * rsqrt(mean(xs²) + eps)`; `xs` (default `x`) is what is
    squared: diffusers squares `x.float()` but multiplies the uncast `x`."""
    xs = x if xs is None else xs
    if square == "pow":
        sq = CallFunction(aten.pow.Tensor_Scalar, xs, KeywordArg("exponent"))
    else:
        sq = CallFunction(aten.mul.Tensor, xs, xs)
    if reduce == "mean":
        red = CallFunction(aten.mean.dim, sq, KeywordArg("dims"), True)
    else:
        red = CallFunction(aten.div.Tensor, CallFunction(aten.sum.dim_IntList, sq, KeywordArg("dims"), True),
                           KeywordArg("n"))
    rs = CallFunction(aten.rsqrt.default, CallFunction(ADD_EPS, red, KeywordArg("eps")))
    return CallFunction(aten.mul.Tensor, x, rs) if order == "x_r" else CallFunction(aten.mul.Tensor, rs, x)


TAILS = ("cast_w_cast", "w_cast", "cast_w", "w", "cast", "none")


def with_tail(p, tail: str):
    """What follows the normalisation: the weight multiply (before/after a cast) and a final cast."""
    if tail.startswith("cast_w"):
        p = CallFunction(aten.mul.Tensor, cast(p), KeywordArg("w"))
    elif tail.startswith("w"):
        p = CallFunction(aten.mul.Tensor, p, KeywordArg("w"))
    if tail.endswith("cast"):
        p = cast(p)
    return p


def check_rms_core(match, x_node, upcast_node=None) -> dict | str:
    """The checks every RMSNorm core needs; returns {x, D, eps} or a reason."""
    kw = match.kwargs
    xv = val(x_node)
    if not isinstance(xv, torch.Tensor) or not xv.is_floating_point() or xv.ndim < 1:
        return "input is not a floating-point tensor"
    if upcast_node is not None and not is_upcast(upcast_node):
        return "the cast before the norm narrows the input"
    ndim, d = xv.ndim, xv.shape[-1]
    if not (isinstance(kw["dims"], (list, tuple)) and len(kw["dims"]) == 1 and kw["dims"][0] in (ndim - 1, -1)):
        return f"reduces over dims {kw['dims']} of a {ndim}-d tensor, not the last dim"
    if "exponent" in kw and kw["exponent"] != 2:
        return f"mean of x**{kw['exponent']}, not of x**2"
    if "n" in kw and not (is_number(kw["n"]) and kw["n"] == d):
        return f"sum divided by {kw['n']}, not by the reduced size {d}"
    if not is_number(kw["eps"]):
        return "eps is a tensor, not a constant"
    return {"eps": float(kw["eps"]), "D": d}


class RMSNormPattern(Family):
    name = "rms_norm"

    def variants(self) -> list[Variant]:
        out = []
        for x_cast, square, reduce, order, tail in itertools.product(
                ("both", "separate", "square", "none"), ("pow", "mul"), ("mean", "sum_div"), ("x_r", "r_x"),
                ("cast_w_cast", "w_cast", "cast_w", "w", "cast", "none")):
            # x_cast: where `x.float()` feeds in: one cast for both uses, one cast per use
            # (two `.float()` calls are not CSE'd), only the square (diffusers), or nowhere
            x = KeywordArg("x")
            if x_cast == "both":
                p = rms_core(cast(x, users=2), square, reduce, order)
            elif x_cast == "separate":
                p = rms_core(cast(x), square, reduce, order, xs=cast(x))
            elif x_cast == "square":
                p = rms_core(x, square, reduce, order, xs=cast(x))
            else:
                p = rms_core(x, square, reduce, order)
            p = with_tail(p, tail)
            name = "/".join([f"cast_{x_cast}", square, reduce, order, tail])
            out.append(Variant(name, p, {"x_cast": x_cast, "tail": tail}))
        return out

    def anchor_of(self, match):
        return next((n for n in match.nodes if n.target == aten.rsqrt.default), None)

    def anchors(self, graph):
        found = []
        for n in graph.find_nodes(op="call_function", target=aten.rsqrt.default):
            add = n.args[0]
            if (isinstance(add, torch.fx.Node) and add.target in ADD_EPS and isinstance(add.args[0], torch.fx.Node)
                    and add.args[0].target in (aten.mean.dim, aten.div.Tensor)):
                found.append(n)
        return found

    def check(self, match, variant):
        x = match.kwargs["x"]
        upcast = next((n for n in match.nodes if n.target == CONVERT and n.args[0] is x), None)
        site = check_rms_core(match, x, upcast if variant.info["x_cast"] != "none" else None)
        if isinstance(site, str):
            return site
        out = match.output_node()
        ov = val(out)
        xv = val(x)
        if tuple(ov.shape) != tuple(xv.shape):
            return f"output shape {tuple(ov.shape)} differs from input {tuple(xv.shape)} (broadcast weight)"
        w = match.kwargs.get("w")
        if w is not None and not isinstance(val(w), torch.Tensor):
            return f"the weight is the number {w!r}, not a tensor: a scaled norm, not an affine weight"
        if w is not None and not is_last_dim_vector(w, site["D"]):
            return f"weight of shape {tuple(val(w).shape)} does not broadcast along the last dim only"
        if variant.info["tail"].startswith("cast_w"):
            inner = next(n for n in match.nodes if n.target == aten.mul.Tensor and w in n.args)
            pre = inner.args[0]
            if val(pre).dtype != val(inner).dtype:
                return "the cast before the weight multiply is not to the product's dtype"
        site.update(x=x, weight=w, out_dtype=ov.dtype)
        return site

    def replace(self, match, variant, site, ctx):
        op, eps, out_dtype = ctx.impl(self.name), site["eps"], site["out_dtype"]
        if site["weight"] is None:
            ctx.replace(match, lambda x: op(x, None, eps, out_dtype), [site["x"]])
        else:
            ctx.replace(match, lambda x, w: op(x, w, eps, out_dtype), [site["x"], site["weight"]])


FAMILY = RMSNormPattern()
