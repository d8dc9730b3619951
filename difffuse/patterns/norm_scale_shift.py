"""norm_scale_shift: residual (+ gate) → LayerNorm/RMSNorm (± affine) → AdaLN modulation.

    r = res + x*gate | res + x | x                       (gate: tensor, the literal 1, or no residual)
        (─ convert(low) = the model's rounding of r ─)? ─ (convert fp32)?
    n = LN(r): var_mean(r,[-1]) → (r - mean) * rsqrt(var + eps)     |  RMS: r * rsqrt(mean(r²) + eps)
        (* w)? (+ b)? (─ convert)?
    out = n * (scale + k) + shift                                     (optional) ─ (convert)?
      ==>  out, r = difffuse::norm_scale_shift(x, res, gate, w, b, scale, shift, eps, k, is_rms,
                                               r.dtype, out.dtype)

The Wan block has all three forms (diffusers transformer_wan.py):
  norm1: `(norm1(h.float()) * (1 + scale_msa) + shift_msa).type_as(h)`      no residual
  norm2: `h = (h.float() + attn * gate_msa).type_as(h)`; `norm2(h.float())`  gate → affine LN
  norm3: `h = h + attn`; `(norm3(h.float()) * (1 + c_scale) + c_shift).type_as(h)`   gate 1
and in a full-model compile a block's FFN residual `(h.float() + ff.float()*c_gate).type_as(h)`
feeds the next block's norm1 (or norm_out), the gate → LN → modulation form.
Rounding of r, exactly as the model does it (design §3.4): "direct" (the norm reads r as
computed: fp32 graphs), "cast" (r in the model's dtype, the norm reads its exact upcast:
norm3 in bf16) and "roundtrip" (r computed in fp32, rounded by `.type_as(h)`, upcast for
the norm: norm2 and norm1-after-FFN in bf16); the op returns r in r's dtype and
normalises that rounded value. A cast between the norm and the modulation (nn.LayerNorm
in bf16 rounds its output before a bf16 modulation) is absorbed (the op stays in fp32).
Exact upcasts at the inputs are not passed to the op (it computes in fp32 anyway).
"mixed" (RMS): diffusers' RMSNorm in bf16 squares `r.float()` but multiplies the bf16 r
by the fp32 rsqrt (a mixed-dtype product, exact in fp32): LTX's norm1/norm2.
Both outputs are pattern outputs: `r` is the next residual when other nodes read it.
Not matched: LN over another dim, eps outside the rsqrt, modulation before the norm (a
gate of the form `k + scale`), a norm that reads r narrowed or in another dtype than r
was rounded to, a residual / x that is not full-size, scale/shift/weight that broadcast
the output past the normalised shape, k a tensor. A plain LN / RMSNorm with neither
residual nor modulation is not this family.
"""
from __future__ import annotations

import itertools
import operator

import torch
from torch._inductor.pattern_matcher import CallFunction, KeywordArg, MultiOutputPattern

from .common import (CONVERT, VIEW_OPS, Family, Variant, aten, cast, inserted, inserted_by, is_last_dim_vector,
                     is_number, is_upcast, val)
from .rms_norm import ADD_EPS, rms_core
from .scale_shift import broadcast_kind, strip_upcast

RESIDUALS = ("gate_xg", "gate_gx", "one", "none")  # larger first: the first match wins
ROUNDINGS = ("direct", "cast", "roundtrip", "mixed")
# (modulation, cast between norm and modulation, cast at the end)
TAILS = ((True, True, True), (True, False, True), (True, True, False), (True, False, False), (False, False, True),
         (False, False, False))


def layer_norm(nin):
    """(nin - mean) * rsqrt(var + eps) from var_mean.correction(nin, [d], 0, keepdim)."""
    vm = CallFunction(aten.var_mean.correction, nin, KeywordArg("dims"), correction=0, keepdim=True, _users=2)
    var = CallFunction(operator.getitem, vm, 0)
    mean = CallFunction(operator.getitem, vm, 1)
    rs = CallFunction(aten.rsqrt.default, CallFunction(ADD_EPS, var, KeywordArg("eps")))
    return CallFunction(aten.mul.Tensor, CallFunction(aten.sub.Tensor, nin, mean), rs)


def affine_reason(kw, d, what: str = "") -> str | None:
    """A norm's weight / bias (where matched) must be last-dim vectors that are parameters:
    a computed [.., D] factor is a modulation, not an affine."""
    for name in ("weight", "bias"):
        if name in kw and not isinstance(val(kw[name]), torch.Tensor):
            return f"{what}{name} is the number {kw[name]!r}, not a parameter tensor"
        if name in kw and not is_last_dim_vector(kw[name], d):
            return f"{what}{name} of shape {tuple(val(kw[name]).shape)} is not a last-dim vector"
        if name in kw and strip_upcast(kw[name]).op not in ("placeholder", "get_attr"):
            return f"{what}{name} is computed in the graph (a modulation?), not a parameter"
    return None


def build(residual: str, rounding: str, norm: str, affine: str, mod: bool, mid_cast: bool, out_cast: bool):
    """One variant's pattern: out alone, or MultiOutputPattern([out, r])."""
    x = KeywordArg("x")
    r = None
    if residual == "none":
        nin = x
    else:
        prod = {"one": x, "gate_xg": CallFunction(aten.mul.Tensor, x, KeywordArg("gate")),
                "gate_gx": CallFunction(aten.mul.Tensor, KeywordArg("gate"), x)}[residual]
        total = CallFunction(aten.add.Tensor, KeywordArg("residual"), prod)
        if rounding in ("direct", "mixed"):
            r = nin = total
        elif rounding == "cast":
            r, nin = total, cast(total, users=2)  # both LN (var_mean, sub) and RMS (pow, mul) read it twice
        else:
            r = cast(total)
            nin = cast(r, users=2)
    # "mixed" (no residual): diffusers' RMSNorm squares x.float() but multiplies x itself
    n = layer_norm(nin) if norm == "ln" else rms_core(nin, "pow", "mean", "x_r",
                                                      xs=cast(nin) if rounding == "mixed" else None)
    if "w" in affine:
        n = CallFunction(aten.mul.Tensor, n, KeywordArg("weight"))
    if "b" in affine:
        n = CallFunction(aten.add.Tensor, n, KeywordArg("bias"))
    if mid_cast:
        n = cast(n)
    if mod:
        n = CallFunction(aten.add.Tensor, CallFunction(
            aten.mul.Tensor, n, CallFunction(aten.add.Tensor, KeywordArg("scale"), KeywordArg("k"))),
            KeywordArg("shift"))
    if out_cast:
        n = cast(n)
    return MultiOutputPattern([n, r]) if r is not None else n


class NormScaleShiftPattern(Family):
    name = "norm_scale_shift"

    def variants(self):
        out = []
        # the modulation tails come first: `n * (1+scale) + shift` must not be taken for an affine
        for residual, rounding, norm, (mod, mid_cast, out_cast), affine in itertools.product(
                RESIDUALS, ROUNDINGS, ("ln", "rms"), TAILS, ("wb", "w", "")):
            if residual == "none" and (rounding not in ("direct", "mixed") or not mod):
                continue  # no residual: rounding is moot; and a bare norm is not this family
            if rounding == "mixed" and norm != "rms":
                continue
            if norm == "rms" and affine == "wb":
                continue
            pattern = build(residual, rounding, norm, affine, mod, mid_cast, out_cast)
            tail = ("mod" if mod else "nomod") + ("/midcast" if mid_cast else "") + ("/cast" if out_cast else "")
            name = "/".join([residual, rounding if residual != "none" or rounding == "mixed" else "-", norm,
                             affine or "noaffine", tail])
            out.append(Variant(name, pattern, dict(residual=residual, rounding=rounding, norm=norm,
                                                   affine=affine, mod=mod, mid_cast=mid_cast)))
        return out

    def anchor_of(self, match):
        # only LayerNorm sites: an RMSNorm's rsqrt is the rms_norm family's anchor
        return next((n for n in match.nodes if n.target == aten.var_mean.correction), None)

    def anchors(self, graph):
        """LayerNorms (var_mean) that read a residual sum or feed a modulation."""
        found = []
        for vm in graph.find_nodes(op="call_function", target=aten.var_mean.correction):
            if inserted(vm):
                continue  # a lowering's own LayerNorm
            src = vm.args[0]
            while isinstance(src, torch.fx.Node) and src.target in (CONVERT, aten.clone.default):
                src = src.args[0]
            has_residual = isinstance(src, torch.fx.Node) and (src.target == aten.add.Tensor and all(
                isinstance(a, torch.fx.Node) for a in src.args) or _is_fused_residual(src))
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
        for name in ("scale", "shift", "gate", "residual"):
            if name in kw and not (isinstance(val(kw[name]), torch.Tensor) and val(kw[name]).is_floating_point()):
                return f"{name} is not a floating-point tensor"
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
        reason = affine_reason(kw, d)
        if reason:
            return reason
        xn, gate = kw["x"], kw.get("gate")
        if info["rounding"] == "mixed" and info["residual"] == "none":
            up = next(n for n in match.nodes if n.target == CONVERT and n.args[0] is kw["x"])
            if not is_upcast(up):
                return f"the norm squares x converted to {up.args[1]}, not its exact upcast"
        if r_node is not None:
            reason = _check_residual(match, info, kw, r_node, nin_shape)
            if isinstance(reason, str):
                return reason
            xn, gate = reason
        r_dtype = val(r_node).dtype if r_node is not None else x.dtype
        site = dict(x=xn, residual=kw.get("residual"), gate=gate, weight=kw.get("weight"), bias=kw.get("bias"),
                    scale=kw.get("scale"), shift=kw.get("shift"))
        site = {k: (strip_upcast(v) if v is not None else None) for k, v in site.items()}
        site.update(eps=float(kw["eps"]), k=float(kw["k"]) if info["mod"] else 0.0, is_rms=info["norm"] == "rms",
                    residual_dtype=r_dtype, out_dtype=ov.dtype, two_outputs=r_node is not None)
        return site

    def replace(self, match, variant, site, ctx):
        op = ctx.impl(self.name)
        names = [n for n in ("x", "residual", "gate", "weight", "bias", "scale", "shift") if site[n] is not None]
        consts = (site["eps"], site["k"], site["is_rms"], site["residual_dtype"], site["out_dtype"])

        def fused(*tensors):
            t = dict(zip(names, tensors))
            out, r = op(t["x"], t.get("residual"), t.get("gate"), t.get("weight"), t.get("bias"),
                        t.get("scale"), t.get("shift"), *consts)
            return (out, r) if site["two_outputs"] else out

        ctx.replace(match, fused, [site[n] for n in names])


def _check_residual(match, info, kw, r_node, r_shape):
    """The residual half's checks; returns (x, gate) — x the full-size factor — or a reason."""
    xn, gate = kw["x"], kw.get("gate")
    if gate is not None and tuple(val(xn).shape) != r_shape and tuple(val(gate).shape) == r_shape:
        xn, gate = gate, xn  # `gate * x` written with the broadcast factor first
    if tuple(val(xn).shape) != r_shape or tuple(val(kw["residual"]).shape) != r_shape:
        return (f"residual {tuple(val(kw['residual']).shape)} / x {tuple(val(xn).shape)} are not both the "
                f"full shape {r_shape}")
    if any(_is_k_plus(f) for f in (xn, gate)) or any(
            t.target == aten.mul.Tensor and any(_is_k_plus(f) for f in t.args) for t in (xn, kw["residual"])):
        return "the sum is `shift + x*(k + scale)`: modulation before the norm, not a residual"
    if gate is not None:
        if broadcast_kind(val(gate).shape, r_shape) is None:
            return f"gate {tuple(val(gate).shape)} does not broadcast as a gate against {r_shape}"
    up = next((n for n in match.nodes if n.target == CONVERT and n.args[0] is r_node), None)
    if info["rounding"] in ("cast", "mixed"):
        if not is_upcast(up):
            return f"the norm reads r narrowed to {up.args[1]} (r is {val(r_node).dtype})"
    if info["rounding"] == "roundtrip":
        low, total = val(r_node).dtype, val(r_node.args[0]).dtype
        if not (torch.finfo(low).bits < torch.finfo(total).bits):
            return "the residual round trip is not through a narrower dtype"
        if not is_upcast(up):
            return f"the norm reads r converted to {up.args[1]}, not its exact upcast"
    return xn, gate


def _fused_by_scale_shift(node, with_k: bool) -> bool:
    """node is part of a scale_shift replacement: a modulation `a*(k+b)+c` (with_k) or a
    gated residual `c + a*b` (the variants say which)."""
    by = inserted_by(node)
    return len(by) == 2 and by[0] == "scale_shift" and ("+k)" in by[1]) == with_k


def _is_fused_residual(node) -> bool:
    """node is a gated residual `c + a*b` that scale_shift fused."""
    return _fused_by_scale_shift(node, with_k=False)


def _is_k_plus(node) -> bool:
    """node is `scale + k` with a literal k (the AdaLN factor)."""
    return isinstance(node, torch.fx.Node) and node.target == aten.add.Tensor and any(is_number(a) for a in node.args)


_NORM_STEPS = (aten.mul.Tensor, aten.add.Tensor, aten.sub.Tensor, aten.rsqrt.default, operator.getitem, CONVERT,
               *VIEW_OPS, aten.unsqueeze.default, aten.squeeze.dim, aten.clone.default)


def _feeds_modulation(vm: torch.fx.Node) -> bool:
    """A LayerNorm output (within a few elementwise steps and views) multiplied by
    (k + scale), or read by a modulation another family fused (`difffuse::scale_shift`
    with k != 0: the norm itself was left, and is reported)."""
    frontier, seen = list(vm.users), 0
    while frontier and seen < 16:
        node = frontier.pop()
        seen += 1
        if node.target == aten.mul.Tensor and any(
                isinstance(a, torch.fx.Node) and a.target == aten.add.Tensor and is_number(a.args[1])
                for a in node.args):
            return True
        if _fused_by_scale_shift(node, with_k=True):
            return True
        if node.target in _NORM_STEPS:
            frontier.extend(node.users)
    return False


FAMILY = NormScaleShiftPattern()
