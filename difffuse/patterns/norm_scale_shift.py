"""norm_scale_shift: residual (+ gate) → LayerNorm/RMSNorm (± affine) → AdaLN modulation.

    r = res + x*gate | res + x | x                       (gate: tensor, the literal 1, or no residual)
        (─ convert(low) = the model's rounding of r ─)? ─ (convert fp32)?
    n = LN(r): var_mean(r,[-1]) → (r - mean) * rsqrt(var + eps)     |  RMS: r * rsqrt(mean(r²) + eps)
        (* w)? (b +)? (─ convert)?
    out = shift + n * (scale + k)                                     (optional) ─ (convert)?
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
norm3 in bf16; also diffusers' RMSNorm, which squares `r.float()` and multiplies the bf16
r by the fp32 rsqrt: canonicalize.py writes that product's upcast down) and "roundtrip"
(r computed in fp32, rounded by `.type_as(h)`, upcast for the norm: norm2 and
norm1-after-FFN in bf16); the op returns r in r's dtype and normalises that rounded value.
A cast between the norm and the modulation (nn.LayerNorm in bf16 rounds its output before
a bf16 modulation) is absorbed (the op stays in fp32), and so is a cast at the end: both
are in every pattern, an identity `convert(o, o.dtype)` standing in where the model has
none. Exact upcasts at the inputs are not passed to the op (it computes in fp32 anyway).
Both outputs are pattern outputs: `r` is the next residual when other nodes read it.

One spelling per structure: canonicalize.py fixes the operand order (`(1 + scale) * LN(x)
+ shift` of FLUX.2, `x * gate` / `gate * x`, `addcmul(shift, n, 1 + scale)` of ComfyUI are
the forms above), and around this family's matching it completes (`Completions`, exact
identities, taken out again where nothing matched):
  - scale-only `n * (1 + scale)` (Lumina2, Z-Image): shift = -0.0, the op gets shift=None;
  - shift-only `n + shift`, shift a chunk of a modulation table: scale = -0.0 with k = 1,
    the op gets scale=None (a [D] parameter added to a norm is its affine bias, not this);
  - a norm output read by two modulations (SD3.5's AdaLayerNormZeroX): one norm copy per
    modulation, so each fuses (the op recomputes the norm; the norm's input is read twice
    instead of its output three times);
  - the casts: an identity cast after a norm output or modulation the model does not cast.
k: a number, or a 0-d tensor (a Python float `scale_constant` that Dynamo lifted to a graph
input under dynamic shapes, its value not guarded): then the op gets the model's own
`scale + k` computed in the graph as its scale, and k = -0.0 (s + (-0.0) == s exactly).
Not matched: LN over another dim, eps outside the rsqrt, eps a tensor (the op takes a
constant), modulation before the norm (a gate of the form `k + scale`), a norm that reads r
narrowed or in another dtype than r was rounded to, a residual / x that is not full-size,
scale/shift/weight that broadcast the output past the normalised shape, k a tensor of rank
>= 1. A plain LN / RMSNorm with neither residual nor modulation is not this family.
"""
from __future__ import annotations

import itertools
import operator

import torch
from torch._inductor.pattern_matcher import CallFunction, KeywordArg, MultiOutputPattern

from .canonical_forms import (CompletedPass, Completions, is_identity, is_k_plus, is_scalar_tensor,
                                        norm_output)
from .common import (CONVERT, VIEW_OPS, Family, Variant, aten, cast, inserted, inserted_by, is_last_dim_vector,
                     is_number, is_upcast, left_by, val)
from .rms_norm import ADD_EPS, EPS_TENSOR, rms_core
from .scale_shift import broadcast_kind, from_modulation_table, strip_upcast

RESIDUALS = ("gate", "one", "none")  # larger first: the first match wins
ROUNDINGS = ("direct", "cast", "roundtrip")
# (modulation, cast between norm and modulation, cast at the end): the casts are always there
# for this family's matching (a model's own, or an identity one: Completions.casts)
TAILS = ((True, True, True), (False, False, True))


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
        # `x * gate`: KeywordArgs match either operand order (check() tells them apart by shape)
        prod = x if residual == "one" else CallFunction(aten.mul.Tensor, x, KeywordArg("gate"))
        total = CallFunction(aten.add.Tensor, KeywordArg("residual"), prod)
        if rounding == "direct":
            r = nin = total
        elif rounding == "cast":
            r, nin = total, cast(total, users=2)  # both LN (var_mean, sub) and RMS (pow, mul) read it twice
        else:
            r = cast(total)
            nin = cast(r, users=2)
    n = layer_norm(nin) if norm == "ln" else rms_core(nin, "pow", "mean")
    if "w" in affine:
        n = CallFunction(aten.mul.Tensor, n, KeywordArg("weight"))
    if "b" in affine:
        n = CallFunction(aten.add.Tensor, KeywordArg("bias"), n)
    if mid_cast:
        n = cast(n)
    if mod:
        n = CallFunction(aten.add.Tensor, KeywordArg("shift"), CallFunction(
            aten.mul.Tensor, n, CallFunction(aten.add.Tensor, KeywordArg("scale"), KeywordArg("k"))))
    if out_cast:
        n = cast(n)
    return MultiOutputPattern([n, r]) if r is not None else n


def complete(graph) -> Completions:
    """The identity completions this family matches with (module docstring)."""
    done = Completions(graph)
    done.twice_read_norms()
    done.scale_only(lambda a, y: norm_output(a))
    done.shift_only(lambda shift, t: from_modulation_table(shift))
    done.casts(lambda t, d: isinstance(t, torch.fx.Node) and affine_reason({"weight": t}, d) is None)
    return done


class NormScaleShiftPattern(Family):
    name = "norm_scale_shift"

    def variants(self):
        out = []
        # the modulation tails come first: `n * (1+scale) + shift` must not be taken for an affine
        for residual, rounding, norm, (mod, mid_cast, out_cast), affine in itertools.product(
                RESIDUALS, ROUNDINGS, ("ln", "rms"), TAILS, ("wb", "w", "")):
            if residual == "none" and (rounding != "direct" or not mod):
                continue  # no residual: rounding is moot; and a bare norm is not this family
            if norm == "rms" and affine == "wb":
                continue
            pattern = build(residual, rounding, norm, affine, mod, mid_cast, out_cast)
            tail = "mod" if mod else "nomod"
            name = "/".join([residual, rounding if residual != "none" else "-", norm, affine or "noaffine", tail])
            out.append(Variant(name, pattern, dict(residual=residual, rounding=rounding, norm=norm,
                                                   affine=affine, mod=mod, mid_cast=mid_cast)))
        return out

    def build_pass(self, get_ctx):
        def explain(graph):
            rejected = get_ctx().rejected
            for vm in self.anchors(graph):
                if vm not in rejected:
                    reason = _why_not(vm)
                    if reason:
                        rejected[vm] = reason
        return CompletedPass(super().build_pass(get_ctx), complete, explain)

    def anchor_of(self, match):
        # only LayerNorm sites: an RMSNorm's rsqrt is the rms_norm family's anchor
        return next((n for n in match.nodes if n.target == aten.var_mean.correction), None)

    def anchors(self, graph):
        """LayerNorms (var_mean) that read a residual sum or feed a modulation, and the RMSNorm
        + modulation sites this family turned away whose norm and modulation other families
        may fuse apart (`_split_apart`: reported even where nothing of them is left)."""
        found = list(left_by(graph, self.name))
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
        if is_scalar_tensor(kw["eps"]):
            reason = f"{EPS_TENSOR} (RMSNorm: the rms_norm family may take the norm alone)"
            if info["mod"]:
                _split_apart(match, reason)
            return reason
        if not is_number(kw["eps"]):
            return "eps is a tensor, not a constant"
        if "exponent" in kw and kw["exponent"] != 2:
            return f"mean of x**{kw['exponent']}, not of x**2"
        if info["mod"] and not (is_number(kw["k"]) or is_scalar_tensor(kw["k"])):
            return f"the k of (k + scale) is a tensor of shape {tuple(val(kw['k']).shape)}, not a scalar"
        if tuple(ov.shape) != nin_shape:
            return f"output {tuple(ov.shape)} is broadcast past the normalised shape {nin_shape}"
        reason = affine_reason(kw, d)
        if reason:
            return reason
        xn, gate = kw["x"], kw.get("gate")
        if r_node is not None:
            reason = _check_residual(match, info, kw, r_node, nin_shape)
            if isinstance(reason, str):
                return reason
            xn, gate = reason
        r_dtype = val(r_node).dtype if r_node is not None else x.dtype
        scale, shift, k, k_node = kw.get("scale"), kw.get("shift"), 0.0, None
        if info["mod"]:
            if is_identity(scale):
                scale = None  # a shift-only modulation (the completion's -0.0 scale, k = 1)
            elif is_number(kw["k"]):
                k = float(kw["k"])
            else:  # a 0-d tensor k: the op's scale is the model's `scale + k`, computed in the graph
                k, k_node = -0.0, kw["k"]
            if is_identity(shift):
                shift = None  # a scale-only modulation (the completion's -0.0 shift)
        site = dict(x=xn, residual=kw.get("residual"), gate=gate, weight=kw.get("weight"), bias=kw.get("bias"),
                    scale=scale, shift=shift)
        site = {name: (strip_upcast(v) if v is not None else None) for name, v in site.items()}
        if k_node is not None:
            site.update(scale=kw["scale"], k_node=k_node)  # exactly the operands of the model's add
        site.update(eps=float(kw["eps"]), k=k, is_rms=info["norm"] == "rms",
                    residual_dtype=r_dtype, out_dtype=ov.dtype, two_outputs=r_node is not None)
        return site

    def replace(self, match, variant, site, ctx):
        op = ctx.impl(self.name)
        names = [n for n in ("x", "residual", "gate", "weight", "bias", "scale", "shift", "k_node")
                 if site.get(n) is not None]
        consts = (site["eps"], site["k"], site["is_rms"], site["residual_dtype"], site["out_dtype"])

        def fused(*tensors):
            t = dict(zip(names, tensors))
            scale = t["scale"] + t["k_node"] if "k_node" in t else t.get("scale")
            out, r = op(t["x"], t.get("residual"), t.get("gate"), t.get("weight"), t.get("bias"),
                        scale, t.get("shift"), *consts)
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
    if any(is_k_plus(f) for f in (xn, gate)) or any(
            t.target == aten.mul.Tensor and any(is_k_plus(f) for f in t.args) for t in (xn, kw["residual"])):
        return "the sum is `shift + x*(k + scale)`: modulation before the norm, not a residual"
    if gate is not None:
        if broadcast_kind(val(gate).shape, r_shape) is None:
            return f"gate {tuple(val(gate).shape)} does not broadcast as a gate against {r_shape}"
    up = next((n for n in match.nodes if n.target == CONVERT and n.args[0] is r_node), None)
    if info["rounding"] == "cast":
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


_NORM_STEPS = (aten.mul.Tensor, aten.add.Tensor, aten.sub.Tensor, aten.rsqrt.default, operator.getitem, CONVERT,
               *VIEW_OPS, aten.unsqueeze.default, aten.squeeze.dim, aten.clone.default)


def _split_apart(match, reason: str) -> None:
    """An RMSNorm + modulation this family cannot take (its anchors are LayerNorms only, and
    rms_norm and scale_shift may fuse the two parts apart, leaving no node to report at): its
    rsqrt is kept on the graph as an anchor (`left_by`), with the reason in its meta."""
    rs = next((n for n in match.nodes if n.target == aten.rsqrt.default), None)
    if rs is None:
        return
    rs.meta["difffuse_miss_reason"] = reason
    kept = left_by(match.graph, "norm_scale_shift")
    if rs not in kept:
        kept.append(rs)


def _feeds_modulation(vm: torch.fx.Node) -> bool:
    """A LayerNorm output (within a few elementwise steps and views) multiplied by
    (k + scale), or read by a modulation another family fused (`difffuse::scale_shift`
    with k != 0: the norm itself was left, and is reported)."""
    frontier, seen = list(vm.users), 0
    while frontier and seen < 16:
        node = frontier.pop()
        seen += 1
        if node.target == aten.mul.Tensor and any(is_k_plus(a, strict=False) for a in node.args):
            return True
        if _fused_by_scale_shift(node, with_k=True):
            return True
        if node.target in _NORM_STEPS:
            frontier.extend(node.users)
    return False


def _why_not(vm: torch.fx.Node) -> str | None:
    """Why a LayerNorm anchor no variant tried is no site, where the graph says it plainly:
    its output has other readers, or its modulation goes on into more arithmetic."""
    n = next((u for u in vm.users if u.target == operator.getitem and u.args[1] == 1), None)
    n = next((u for u in n.users if u.target == aten.sub.Tensor), None) if n is not None else None
    n = next(iter(n.users), None) if n is not None and len(n.users) == 1 else None
    while n is not None and len(n.users) == 1:  # through the affine and a cast
        u = next(iter(n.users))
        if not (u.target == CONVERT or u.target == aten.mul.Tensor and u.args[0] is n and not is_k_plus(u.args[1])
                or u.target == aten.add.Tensor and u.args[1] is n):
            break
        n = u
    if n is None:
        return None
    users = list(n.users)
    if len(users) > 1:
        what = ", ".join(sorted({_op(u) for u in users}))
        return (f"the norm's output is read {len(users)} times ({what}), not by one modulation: the op "
                f"returns the modulated value only")
    y = users[0] if users else None
    if y is not None and y.target == aten.mul.Tensor and len(y.args) == 2 and is_k_plus(y.args[1]):
        on = [u for u in y.users if not (u.target == aten.add.Tensor and len(u.args) == 2 and u.args[1] is y)]
        if on and any(u.target in (aten.sub.Tensor, aten.mul.Tensor, aten.div.Tensor, aten.add.Tensor) for u in on):
            return (f"the modulation `n * (k + scale)` goes on into {_op(on[0])} (`c - n*(k + scale)` and the like): "
                    f"no `shift + n * (k + scale)`, and a scale-only modulation ends there")
    return None


def _op(node) -> str:
    return str(getattr(node.target, "__name__", node.target))


FAMILY = NormScaleShiftPattern()
