"""scale_shift: AdaLN modulation and gated residuals, `out = c + a * (k + b)`.

    add(c, mul(a, add(b, k)))                                     AdaLN `x*(1+scale)+shift`, k read from the match
    add(c, mul(a, g))                                             gated residual `res + x*gate`, k = 0 (no add node)
        ─ (convert)?                                              `.type_as(h)` / `.to(dtype)`
      ==>  difffuse::scale_shift(a, b, c, k, out_dtype)

One operand order: canonicalize.py puts the product second in the add and the `b + k`
factor second in the product, so `x*(1+s) + shift`, `shift + (1+s)*x`, `res + gate*x` and
ComfyUI's `addcmul(shift, x, 1 + s)` / `addcmul(res, y, gate)` are these two forms. A
scale-only modulation `x * (1 + scale)` (no shift) is completed for this family's matching
with a -0.0 shift (canonical_forms.Completions: exact) and fused with c = None; only where the
scale is a modulation (a chunk of a table, or one value per sample), so a GELU's
`0.5*h * (1 + tanh(.))` or a layer scale is left alone, and only where the product starts
and ends its arithmetic (`c - x*(1 + s)` and `(c + x)*(1 + s)` stay one Inductor kernel).
k: a number, or a 0-d tensor (a Python float that Dynamo lifted to a graph input under
dynamic shapes, `x * (self.scale_constant + scale)`: its value is not guarded, so it is
not read as a constant): then the op's b is the model's own `b + k` computed in the graph
and k = -0.0 (b' + (-0.0) == b' exactly).

`a` is the full-size operand ([B, L, D], or [B, F, L/F, D] for per-frame tables); `b`
and `c` broadcast against it as a scalar, [D] / [1, 1, D], per batch [B, 1, D], per
token [B, L, D] or per frame [B, F, 1, D]. Real graphs, and why each spelling is here:
  - Wan's FFN residual `(h.float() + ff.float() * c_gate).type_as(h)` is add → convert
    with the upcasts at the inputs; bf16 `attn * gate_msa(fp32)` is mixed-dtype with no
    convert node at all (the product is fp32 by promotion).
  - Exact upcasts of an input (`h.float()` of a bf16 `h`) are not passed to the op: it
    computes in fp32 anyway, so the op reads the bf16 tensor and the fp32 copy is never
    written (DCE drops it when nothing else reads it).
  - A full-size or frame-shaped `b` (and a gate) must come from a modulation table: a
    chunk/split/unbind of it, through views, squeezes and casts (Wan 2.2 TI2V's per-token
    `(table + temb).chunk(6, dim=2)[i].squeeze(2)`). Otherwise `c + a*b` of full tensors
    is a generic multiply-add that Inductor fuses better (rope's `x1*sin + x2*cos`, a GELU's
    `h + y*(1 + tanh(·))`): those are left alone.
  - k = 0 needs a full-size `c` (the residual): `n*w + bias` with vectors is a norm's
    affine tail, which Inductor fuses into the norm.
Not matched: `c - a*(k+b)`, `(c + a)*(k+b)`, k a tensor of rank >= 1, other broadcasts
(reported with their shapes).
"""
from __future__ import annotations

import operator

import torch
from torch._inductor.pattern_matcher import CallFunction, KeywordArg

from .canonical_forms import (IDENTITY_CAST, CompletedPass, Completions, ends_arithmetic, is_identity,
                                        is_k_plus, is_scalar_tensor)
from .common import CONVERT, VIEW_OPS, Family, Variant, aten, cast, inserted, is_number, val

FORMS = {
    # name: (builder, has k)
    "c+a*(b+k)": (lambda a, b, c: CallFunction(aten.add.Tensor, c, CallFunction(
        aten.mul.Tensor, a, CallFunction(aten.add.Tensor, b, KeywordArg("k")))), True),
    "c+a*b": (lambda a, b, c: CallFunction(aten.add.Tensor, c, CallFunction(aten.mul.Tensor, a, b)), False),
}

# ops a modulation chunk passes through on its way from the split to the multiply
_PASS_THROUGH = set(VIEW_OPS) | {CONVERT, aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default,
                                 aten.unsqueeze.default, aten.expand.default, aten.clone.default}
_SPLITS = (aten.split.Tensor, aten.split_with_sizes.default, aten.unbind.int, aten.chunk.default)


def strip_upcast(node):
    """The tensor an exact upcast to fp32 reads (the ops compute in fp32 anyway), else node.
    An identity cast a completion put in stays (canonical_forms.Completions.casts): it is the
    one reader of a norm output another site may still match, and is taken out afterwards."""
    if isinstance(node, torch.fx.Node) and node.meta.get(IDENTITY_CAST):
        return node
    if isinstance(node, torch.fx.Node) and node.target == CONVERT and node.args[1] == torch.float32:
        src = val(node.args[0])
        if isinstance(src, torch.Tensor) and src.dtype in (torch.float16, torch.bfloat16, torch.float32):
            return node.args[0]
    return node


def from_modulation_table(node, depth: int = 8) -> bool:
    """node is a chunk of a modulation table: getitem(split/unbind(...)), or one row picked
    by index (`mod[:, 2]`: select), through views/casts."""
    while depth and isinstance(node, torch.fx.Node):
        if node.target == aten.select.int:
            return True
        if node.target == operator.getitem:
            src = node.args[0]
            return isinstance(src, torch.fx.Node) and src.target in _SPLITS
        if node.target not in _PASS_THROUGH:
            return False
        node, depth = node.args[0], depth - 1
    return False


def broadcast_kind(shape, out_shape) -> str | None:
    """How `shape` broadcasts against `out_shape`: full, scalar, channel, batch, frame, or None."""
    shape, out_shape = tuple(shape), tuple(out_shape)
    if shape == out_shape:
        return "full"
    n = len(out_shape)
    if len(shape) > n:
        return None
    s = (1,) * (n - len(shape)) + shape
    if all(x == 1 for x in s):
        return "scalar"
    if s[-1] != out_shape[-1] or any(x not in (1, o) for x, o in zip(s, out_shape)):
        return None
    if all(x == 1 for x in s[:-1]):
        return "channel"
    if n >= 3 and s[0] == out_shape[0] and all(x == 1 for x in s[1:-1]):
        return "batch"
    if n == 4 and s[:2] == out_shape[:2] and s[2] == 1:
        return "frame"
    return None


def _top_add(nodes) -> torch.fx.Node | None:
    """The outer `c + a*(...)` add of a candidate site (the node misses are reported on)."""
    return next((n for n in nodes if n.target == aten.add.Tensor and any(
        isinstance(a, torch.fx.Node) and a.target == aten.mul.Tensor for a in n.args)
        and not any(isinstance(u, torch.fx.Node) and u in nodes and u.target == aten.mul.Tensor
                    for u in n.users)), None)


class ScaleShiftPattern(Family):
    name = "scale_shift"

    def variants(self):
        out = []
        for form, (builder, has_k) in FORMS.items():
            for out_cast in (True, False):  # the cast variant first: it covers the larger subgraph
                p = builder(KeywordArg("a"), KeywordArg("b"), KeywordArg("c"))
                out.append(Variant(f"{form}/{'cast' if out_cast else 'nocast'}", cast(p) if out_cast else p,
                                   {"has_k": has_k}))
        return out

    def build_pass(self, get_ctx):
        return CompletedPass(super().build_pass(get_ctx), complete)

    def anchor_of(self, match):
        top = _top_add(match.nodes)
        if top is not None and is_identity(top.args[0]):
            return top.args[1]  # a completed scale-only site: its multiply is what anchors() finds
        return top

    def anchors(self, graph):
        """Leftover `x*(k+scale)+shift` (k ≠ 0), scale-only modulations `x*(k+scale)`, and
        gated residuals `res + x*gate` whose gate is per batch or a modulation chunk."""
        found = []
        for n in graph.find_nodes(op="call_function", target=aten.add.Tensor):
            if not n.users or len(n.args) != 2 or inserted(n):
                continue
            for i, m in enumerate(n.args):
                other = n.args[1 - i]
                if not (isinstance(m, torch.fx.Node) and m.target == aten.mul.Tensor
                        and isinstance(other, torch.fx.Node)):
                    continue
                if any(is_k_plus(f, strict=False) and not (is_number(f.args[1]) and f.args[1] == 0) for f in m.args):
                    found.append(n)
                    break
                if _looks_gated(n, m, other):
                    found.append(n)
                    break
        for m in graph.find_nodes(op="call_function", target=aten.mul.Tensor):
            if m.users and not inserted(m) and _scale_only(m) and ends_arithmetic(m):
                found.append(m)
        return found

    def check(self, match, variant):
        kw = match.kwargs
        tensors = [val(kw[n]) for n in ("a", "b", "c")]
        if not all(isinstance(t, torch.Tensor) and t.is_floating_point() for t in tensors):
            return "an operand is not a floating-point tensor"
        a, b, c = tensors
        out = val(match.output_node())
        names = {"a": kw["a"], "b": kw["b"], "c": kw["c"]}
        k, k_node = 0.0, None
        if variant.info["has_k"]:
            if is_scalar_tensor(kw["k"]):  # the op's b is the model's own `b + k` (module docstring)
                k, k_node = -0.0, kw["k"]
            elif not is_number(kw["k"]):
                return f"k in (k + b) is a tensor of shape {tuple(val(kw['k']).shape)}, not a scalar"
            else:
                k = float(kw["k"])
        elif tuple(a.shape) != tuple(out.shape) or (
                tuple(b.shape) == tuple(out.shape) and from_modulation_table(kw["a"])
                and not from_modulation_table(kw["b"])):
            names["a"], names["b"] = kw["b"], kw["a"]  # the gate is the broadcast (or table) operand
            a, b = b, a
        if tuple(a.shape) != tuple(out.shape):
            return f"scaled operand {tuple(a.shape)} is not the full output shape {tuple(out.shape)}"
        kb, kc = broadcast_kind(b.shape, out.shape), broadcast_kind(c.shape, out.shape)
        if kb is None or kc is None:
            return (f"scale {tuple(b.shape)} / shift {tuple(c.shape)} do not broadcast as a modulation "
                    f"against {tuple(out.shape)}")
        if kb in ("full", "frame") and not from_modulation_table(names["b"]):
            what = "scale" if variant.info["has_k"] else "gate"
            return f"a {kb}-shaped {what} {tuple(b.shape)} that is not a chunk of a modulation table"
        if not variant.info["has_k"] and kc != "full":
            return "`c + a*b` with a broadcast c is an affine, not a gated residual"
        site = {"a": strip_upcast(names["a"]), "b": strip_upcast(names["b"]),
                "c": None if is_identity(names["c"]) else strip_upcast(names["c"]),  # scale-only: no shift
                "k": k, "out_dtype": out.dtype, "b_kind": kb, "c_kind": kc}
        if k_node is not None:
            site.update(b=names["b"], k_node=k_node)  # exactly the operands of the model's `b + k`
        return site

    def replace(self, match, variant, site, ctx):
        op, k, out_dtype = ctx.impl(self.name), site["k"], site["out_dtype"]
        names = [n for n in ("a", "b", "c", "k_node") if site.get(n) is not None]

        def fused(*tensors):
            t = dict(zip(names, tensors))
            b = t["b"] + t["k_node"] if "k_node" in t else t["b"]
            return op(t["a"], b, t.get("c"), k, out_dtype)

        ctx.replace(match, fused, [site[n] for n in names])


def _scale_only(y: torch.fx.Node) -> bool:
    """`y = a * (b + k)` is a modulation without a shift: a full-size a, and b a chunk of a
    modulation table or one value per sample (not a GELU's `1 + tanh(.)`, not a layer
    scale); a is no pointwise result (`(c + x) * (1 + s)` is one Inductor kernel, which an
    op reading a computed `c + x` would split in two)."""
    if not (len(y.args) == 2 and not y.kwargs and is_k_plus(y.args[1], strict=False)):
        return False
    if isinstance(y.args[0], torch.fx.Node) and y.args[0].target in _POINTWISE:
        return False
    yv, av, b = val(y), val(y.args[0]), y.args[1].args[0]
    if not (isinstance(yv, torch.Tensor) and isinstance(av, torch.Tensor)) or tuple(av.shape) != tuple(yv.shape):
        return False
    return from_modulation_table(b) or broadcast_kind(val(b).shape, yv.shape) == "batch"


_POINTWISE = {aten.add.Tensor, aten.sub.Tensor, aten.mul.Tensor, aten.div.Tensor, aten.neg.default}


def complete(graph) -> Completions:
    """Scale-only modulations completed with a -0.0 shift for this family's matching."""
    done = Completions(graph)
    done.scale_only(lambda a, y: _scale_only(y))
    return done


def _looks_gated(add: torch.fx.Node, mul: torch.fx.Node, res: torch.fx.Node) -> bool:
    """`res + x*gate` with a full-size res and x and a gate check() would take: broadcast
    (scalar, per channel, per batch), or full-size / per-frame from a modulation table."""
    ov, rv = val(add), val(res)
    if not (isinstance(ov, torch.Tensor) and isinstance(rv, torch.Tensor)) or tuple(rv.shape) != tuple(ov.shape):
        return False
    ops = [a for a in mul.args if isinstance(a, torch.fx.Node) and isinstance(val(a), torch.Tensor)]
    if len(ops) != 2:
        return False
    for x, g in (ops, ops[::-1]):
        if tuple(val(x).shape) == tuple(ov.shape):
            # the gates check() accepts: any broadcast one, a full or per-frame one from a table
            kind = broadcast_kind(val(g).shape, ov.shape)
            if kind in ("scalar", "channel", "batch") or (kind in ("full", "frame") and from_modulation_table(g)):
                return True
    return False


FAMILY = ScaleShiftPattern()
