"""rms_norm: RMSNorm written any of the ways real code writes it.

    x ─┬─ pow(·, 2) | mul(·, ·) ─ mean.dim([-1], keepdim) | sum/D ─ add(eps) ─ rsqrt ─┐
       └──────────────────────────────────────────────── mul ◀──────────────────────┘
        ─ (convert)? ─ (mul w)? ─ (convert)?
      ==>  difffuse::rms_norm(x, w, eps, out_dtype)

nn.RMSNorm / F.rms_norm decompose to the pow/mean/add.Scalar form; hand-written code
gives add.Tensor; `x*x` and `sum/n` stay separate nodes; diffusers' RMSNorm casts to the
weight's dtype before the weight multiply. eps, D and the dtypes are read from the match.
Spellings canonicalize.py makes one graph before matching, so they need no variant here:
the product order (`rsqrt(.) * x`, `w * norm`: the rsqrt and the weight go second), and
where `x.float()` is written (once, once per use, or only on the squared side with the
mixed-dtype `x * rsqrt(.)` of diffusers' RMSNorm: one cast node read by both). `x` is the
norm's input as the graph has it, an upcast included; the op reads the tensor before an
exact upcast (it computes in fp32 anyway), and a narrowing cast's output as it is (the
model normalises the rounded values).
eps: a number. Under `dynamic=True` a Python float written as `+ self.eps` is no number but
a 0-d tensor input (Dynamo lifts it and does not guard its value): the tensor-parallel
module's variance/rsqrt_mul ops take it where the lowering has them (rms_norm_tp.py),
otherwise it is reported with that reason.
Not matched: reduction over another dim, a mean that is not of x squared, eps outside
the rsqrt, a weight that broadcasts over another dim.
"""
from __future__ import annotations

import itertools

import torch
from torch._inductor.pattern_matcher import CallFunction, KeywordArg

from .canonical_forms import is_scalar_tensor, squared_input
from .common import (CONVERT, FLOAT_TYPES, Family, Variant, aten, cast, is_last_dim_vector, is_number, is_upcast,
                     val)
from .scale_shift import strip_upcast

ADD_EPS = [aten.add.Scalar, aten.add.Tensor]


def rms_core(x, square: str, reduce: str):
    """The normalisation `x * rsqrt(mean(x²) + eps)` (canonical order: x first)."""
    if square == "pow":
        sq = CallFunction(aten.pow.Tensor_Scalar, x, KeywordArg("exponent"))
    else:
        sq = CallFunction(aten.mul.Tensor, x, x)
    if reduce == "mean":
        red = CallFunction(aten.mean.dim, sq, KeywordArg("dims"), True)
    else:
        red = CallFunction(aten.div.Tensor, CallFunction(aten.sum.dim_IntList, sq, KeywordArg("dims"), True),
                           KeywordArg("n"))
    rs = CallFunction(aten.rsqrt.default, CallFunction(ADD_EPS, red, KeywordArg("eps")))
    return CallFunction(aten.mul.Tensor, x, rs)


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


EPS_TENSOR = ("eps is a 0-d tensor input, not a constant: a Python float (`+ self.eps`) that Dynamo lifted to a "
              "graph input under dynamic shapes, its value not guarded, and the fused op takes eps as a constant")


def check_rms_core(match, x_node) -> dict | str:
    """The checks every RMSNorm core needs; returns {eps, D} or a reason. A 0-d tensor eps
    (see the module docstring) is returned as the node itself under "eps_node"."""
    kw = match.kwargs
    xv = val(x_node)
    if not isinstance(xv, torch.Tensor) or not xv.is_floating_point() or xv.ndim < 1:
        return "input is not a floating-point tensor"
    ndim, d = xv.ndim, xv.shape[-1]
    if not (isinstance(kw["dims"], (list, tuple)) and len(kw["dims"]) == 1 and kw["dims"][0] in (ndim - 1, -1)):
        return f"reduces over dims {kw['dims']} of a {ndim}-d tensor, not the last dim"
    if "exponent" in kw and kw["exponent"] != 2:
        return f"mean of x**{kw['exponent']}, not of x**2"
    if "n" in kw and not (is_number(kw["n"]) and kw["n"] == d):
        return f"sum divided by {kw['n']}, not by the reduced size {d}"
    if is_scalar_tensor(kw["eps"]):
        return {"eps_node": kw["eps"], "D": d}
    if not is_number(kw["eps"]):
        return "eps is a tensor, not a constant"
    return {"eps": float(kw["eps"]), "D": d}


class RMSNormPattern(Family):
    name = "rms_norm"

    def variants(self) -> list[Variant]:
        out = []
        for square, reduce, tail in itertools.product(("pow", "mul"), ("mean", "sum_div"), TAILS):
            p = with_tail(rms_core(KeywordArg("x"), square, reduce), tail)
            out.append(Variant("/".join([square, reduce, tail]), p, {"tail": tail}))
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

    def check(self, match, variant, lifted_eps: bool = False):
        """`lifted_eps`: the caller's op takes a 0-d tensor eps (site["eps_node"], eps_tensor
        True); otherwise such an eps is a miss here (rms_norm_tp's family takes it where the
        lowering can)."""
        x = match.kwargs["x"]
        site = check_rms_core(match, x)
        if isinstance(site, str):
            return site
        if "eps_node" in site:
            if not lifted_eps:
                return EPS_TENSOR
            site = {**site, "eps": 0.0, "eps_tensor": True}
        return self.check_rest(match, variant, site)

    def check_rest(self, match, variant, site):
        """The checks after the core's: shapes, the weight, the cast before the weight."""
        x = match.kwargs["x"]
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
        site.update(x=_op_input(x, ov.dtype), weight=w, out_dtype=ov.dtype)
        return site

    def replace(self, match, variant, site, ctx):
        op, eps, out_dtype = ctx.impl(self.name), site["eps"], site["out_dtype"]
        if site["weight"] is None:
            ctx.replace(match, lambda x: op(x, None, eps, out_dtype), [site["x"]])
        else:
            ctx.replace(match, lambda x, w: op(x, w, eps, out_dtype), [site["x"], site["weight"]])


def _op_input(x, out_dtype):
    """What the op reads for the norm's input x: the tensor before an exact upcast to fp32
    (the op computes in fp32 anyway), or before an upcast to fp64 whose norm is rounded back
    to fp32 or narrower (design §9: fp64 math rounded back may be computed in fp32)."""
    if (isinstance(x, torch.fx.Node) and x.target == CONVERT and x.args[1] == torch.float64
            and out_dtype != torch.float64 and is_upcast(x)):
        return x.args[0]
    return strip_upcast(x)


def why_not(rsqrt: torch.fx.Node) -> str | None:
    """Why an RMSNorm anchor no variant matched is no site, where the graph says it plainly:
    the norm squares one tensor and multiplies another (or a cast of it)."""
    m = next((u for u in rsqrt.users if u.target == aten.mul.Tensor and len(u.args) == 2), None)
    sq = squared_input(rsqrt)
    if m is None or not isinstance(sq, torch.fx.Node):
        return None
    a = m.args[0] if m.args[1] is rsqrt else m.args[1]

    def base(n):
        while isinstance(n, torch.fx.Node) and n.target == CONVERT:
            n = n.args[0]
        return n
    if base(a) is not base(sq):
        return f"the norm squares {sq.name} but multiplies {getattr(a, 'name', a)}: not one tensor normalised"
    for side, c in (("squared", sq), ("multiplied", a)):
        if c.target == CONVERT and c.args[1] not in FLOAT_TYPES:
            return f"the {side} x is cast to {c.args[1]}: the fused op computes in floating point"
    if a is not sq:
        return f"the norm squares x as {val(sq).dtype} but multiplies it as {val(a).dtype}"
    return None


FAMILY = RMSNormPattern()
