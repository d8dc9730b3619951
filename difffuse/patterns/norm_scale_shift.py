"""norm_scale_shift: residual (+ gate) → LayerNorm/RMSNorm (± affine) → AdaLN modulation.

    r = res + x*gate | res + x | x                       (gate: tensor, the literal 1, or no residual)
        (─ convert(low) = the model's rounding of r ─)? ─ (convert fp32)?
    n = LN(r): var_mean(r,[-1]) → (r - mean) * rsqrt(var + eps)     |  RMS: r * rsqrt(mean(r²) + eps)
        (* w)? (+ b)?
    out = n * (scale + k) + shift                                     (optional) ─ (convert)?
      ==>  out, r = difffuse::norm_scale_shift(x, res, gate, w, b, scale, shift, eps, k, is_rms,
                                               r.dtype, out.dtype)

Both outputs are pattern outputs: `r` is the next residual when other nodes read it.
Casts at the inputs stay outside the fused op (it computes in fp32 either way); the
rounding of `r` inside the pattern is reproduced exactly (r is returned in r's dtype and
normalised from that rounded value). eps, k and the dtypes are read from the match.
Not matched: LN over another dim, eps outside the rsqrt, modulation before the norm,
scale/shift/weight that broadcast the output past the normalised shape, k a tensor.
A plain LN / RMSNorm with neither residual nor modulation is not this family.
"""
from __future__ import annotations

import itertools
import operator

import torch
from torch._inductor.pattern_matcher import CallFunction, KeywordArg, MultiOutputPattern

from .common import CONVERT, Family, Variant, aten, cast, is_last_dim_vector, is_number, val
from .rms_norm import ADD_EPS, rms_core

RESIDUALS = ("gate_xg", "gate_gx", "one", "none")  # larger first: the first match wins
ROUNDINGS = ("direct", "cast", "roundtrip")


def layer_norm(nin):
    """(nin - mean) * rsqrt(var + eps) from var_mean.correction(nin, [d], 0, keepdim)."""
    vm = CallFunction(aten.var_mean.correction, nin, KeywordArg("dims"), correction=0, keepdim=True, _users=2)
    var = CallFunction(operator.getitem, vm, 0)
    mean = CallFunction(operator.getitem, vm, 1)
    rs = CallFunction(aten.rsqrt.default, CallFunction(ADD_EPS, var, KeywordArg("eps")))
    return CallFunction(aten.mul.Tensor, CallFunction(aten.sub.Tensor, nin, mean), rs)


def build(residual: str, rounding: str, norm: str, affine: str, mod: bool, out_cast: bool):
    """One variant's pattern; returns (pattern, r_pattern or None)."""
    x = KeywordArg("x")
    r = None
    if residual == "none":
        nin = x
    else:
        if residual == "one":
            prod = x
        elif residual == "gate_xg":
            prod = CallFunction(aten.mul.Tensor, x, KeywordArg("gate"))
        else:
            prod = CallFunction(aten.mul.Tensor, KeywordArg("gate"), x)
        total = CallFunction(aten.add.Tensor, KeywordArg("residual"), prod)
        if rounding == "direct":
            r = nin = total
        elif rounding == "cast":
            r, nin = total, cast(total, users=2 if norm == "ln" else 2)
        else:
            r = cast(total)
            nin = cast(r, users=2)
    n = layer_norm(nin) if norm == "ln" else rms_core(nin, "pow", "mean", "x_r")
    if "w" in affine:
        n = CallFunction(aten.mul.Tensor, n, KeywordArg("weight"))
    if "b" in affine:
        n = CallFunction(aten.add.Tensor, n, KeywordArg("bias"))
    if mod:
        n = CallFunction(aten.add.Tensor, CallFunction(
            aten.mul.Tensor, n, CallFunction(aten.add.Tensor, KeywordArg("scale"), KeywordArg("k"))),
            KeywordArg("shift"))
    if out_cast:
        n = cast(n)
    return (MultiOutputPattern([n, r]) if r is not None else n), r


class NormScaleShiftPattern(Family):
    name = "norm_scale_shift"

    def variants(self):
        out = []
        for residual, rounding, norm, affine, mod, out_cast in itertools.product(
                RESIDUALS, ROUNDINGS, ("ln", "rms"), ("", "w", "wb"), (True, False), (True, False)):
            if residual == "none" and (rounding != "direct" or not mod):
                continue  # no residual: rounding is moot; and a bare norm is not this family
            if norm == "rms" and affine == "wb":
                continue
            pattern, _ = build(residual, rounding, norm, affine, mod, out_cast)
            name = "/".join([residual, rounding if residual != "none" else "-", norm, affine or "noaffine",
                             "mod" if mod else "nomod", "cast" if out_cast else "nocast"])
            out.append(Variant(name, pattern, dict(residual=residual, rounding=rounding, norm=norm,
                                                   affine=affine, mod=mod, out_cast=out_cast)))
        return out

    def anchor_of(self, match):
        return next((n for n in match.nodes if n.target in (aten.var_mean.correction, aten.rsqrt.default)), None)

    def anchors(self, graph):
        """LayerNorms (var_mean) that read a residual sum or feed a modulation."""
        found = []
        for vm in graph.find_nodes(op="call_function", target=aten.var_mean.correction):
            src = vm.args[0]
            while isinstance(src, torch.fx.Node) and src.target == CONVERT:
                src = src.args[0]
            has_residual = isinstance(src, torch.fx.Node) and src.target == aten.add.Tensor and all(
                isinstance(a, torch.fx.Node) for a in src.args)
            if has_residual or _feeds_modulation(vm):
                found.append(vm)
        return found

    def check(self, match, variant):
        kw, info = match.kwargs, variant.info
        outs = match.output_nodes()
        out_node, r_node = outs[0], (outs[1] if len(outs) > 1 else None)
        ov = val(out_node)
        x = val(kw["x"])
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            return "input is not a floating-point tensor"
        nin_shape = tuple(val(r_node).shape) if r_node is not None else tuple(x.shape)
        ndim, d = len(nin_shape), nin_shape[-1]
        dims = kw["dims"]
        if not (isinstance(dims, (list, tuple)) and len(dims) == 1 and dims[0] in (ndim - 1, -1)):
            return f"normalises over dims {dims} of a {ndim}-d tensor, not the last dim"
        if not is_number(kw["eps"]):
            return "eps is a tensor, not a constant"
        if "exponent" in kw and kw["exponent"] != 2:
            return f"mean of x**{kw['exponent']}, not of x**2"
        if info["mod"] and not is_number(kw["k"]):
            return "the k of (k + scale) is a tensor"
        if tuple(ov.shape) != nin_shape:
            return f"output {tuple(ov.shape)} is broadcast past the normalised shape {nin_shape}"
        for name in ("weight", "bias"):
            if name in kw and not is_last_dim_vector(kw[name], d):
                return f"{name} of shape {tuple(val(kw[name]).shape)} is not a last-dim vector"
        for name in ("scale", "shift", "gate", "residual"):
            t = val(kw.get(name))
            if name in kw and not isinstance(t, torch.Tensor):
                return f"{name} is not a tensor"
        if info["rounding"] == "roundtrip":
            low = val(r_node).dtype
            if torch.finfo(low).bits >= 32:
                return "the residual round trip is not through a narrower dtype"
        r_dtype = val(r_node).dtype if r_node is not None else x.dtype
        return dict(x=kw["x"], residual=kw.get("residual"), gate=kw.get("gate"), weight=kw.get("weight"),
                    bias=kw.get("bias"), scale=kw.get("scale"), shift=kw.get("shift"), eps=float(kw["eps"]),
                    k=float(kw["k"]) if info["mod"] else 0.0, is_rms=info["norm"] == "rms",
                    residual_dtype=r_dtype, out_dtype=ov.dtype, two_outputs=r_node is not None)

    def replace(self, match, variant, site, ctx):
        op = ctx.impl(self.name)
        names = [n for n in ("x", "residual", "gate", "weight", "bias", "scale", "shift") if site[n] is not None]
        consts = (site["eps"], site["k"], site["is_rms"], site["residual_dtype"], site["out_dtype"])

        def fused(*tensors):
            t = dict(zip(names, tensors))
            out, r = op(t["x"], t.get("residual"), t.get("gate"), t.get("weight"), t.get("bias"),
                        t.get("scale"), t.get("shift"), *consts)
            return (out, r) if site["two_outputs"] else out

        match.replace_by_example(fused, [site[n] for n in names])


def _feeds_modulation(vm: torch.fx.Node) -> bool:
    """A LayerNorm output (within a few elementwise steps) multiplied by (k + scale)."""
    frontier, seen = list(vm.users), 0
    while frontier and seen < 12:
        node = frontier.pop()
        seen += 1
        if node.target == aten.mul.Tensor and any(
                isinstance(a, torch.fx.Node) and a.target == aten.add.Tensor and is_number(a.args[1])
                for a in node.args):
            return True
        if node.target in (aten.mul.Tensor, aten.add.Tensor, aten.sub.Tensor, aten.rsqrt.default,
                           operator.getitem, CONVERT):
            frontier.extend(node.users)
    return False


FAMILY = NormScaleShiftPattern()
