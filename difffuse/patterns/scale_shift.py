"""scale_shift: AdaLN modulation and gated residuals, `out = c + a * (k + b)`.

    add(c, mul(a, add(b, k)))  |  add(mul(a, add(b, k)), c)        k ≠ 0 read from the match
    add(c, mul(a, b))          |  add(c, mul(b, a)) | add(mul(a, b), c)      k = 0: no add node
        ─ (convert)?
      ==>  difffuse::scale_shift(a, b, c, k, out_dtype)

`a` is the full-size operand ([B, L, D], or [B, F, L/F, D] for per-frame tables); `b`
and `c` broadcast against it as a scalar, [D], [1, 1, D], per batch [B, 1, D], per frame
[B, F, 1, D], or (b with k ≠ 0, and c) per token [B, L, D]. With k = 0 the gate `b` must
be a scalar, [D] or per batch and `c` the full-size residual: a product of two full-size tensors is a generic
multiply-add and a frame-shaped one is also rope's `x1*sin + x2*cos`; those stay with
Inductor (so a per-token gated residual, Wan 2.2 TI2V's, is not taken).
Not matched: `c - a*(k+b)`, `(c + a)*(k+b)`, k a tensor, other broadcasts (reported).
"""
from __future__ import annotations

import torch
from torch._inductor.pattern_matcher import CallFunction, KeywordArg

from .common import Family, Variant, aten, cast, is_number, val

FORMS = {
    # name: (builder, k from the match?)
    "c+a*(b+k)": (lambda a, b, c: CallFunction(aten.add.Tensor, c, CallFunction(
        aten.mul.Tensor, a, CallFunction(aten.add.Tensor, b, KeywordArg("k")))), True),
    "a*(b+k)+c": (lambda a, b, c: CallFunction(aten.add.Tensor, CallFunction(
        aten.mul.Tensor, a, CallFunction(aten.add.Tensor, b, KeywordArg("k"))), c), True),
    "c+p*q": (lambda a, b, c: CallFunction(aten.add.Tensor, c, CallFunction(aten.mul.Tensor, a, b)), False),
    "p*q+c": (lambda a, b, c: CallFunction(aten.add.Tensor, CallFunction(aten.mul.Tensor, a, b), c), False),
}


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


class ScaleShiftPattern(Family):
    name = "scale_shift"

    def variants(self):
        out = []
        for form, (builder, has_k) in FORMS.items():
            for out_cast in (True, False):
                p = builder(KeywordArg("a"), KeywordArg("b"), KeywordArg("c"))
                out.append(Variant(f"{form}/{'cast' if out_cast else 'nocast'}", cast(p) if out_cast else p,
                                   {"has_k": has_k}))
        return out

    def anchor_of(self, match):
        # only the k ≠ 0 form (AdaLN `*(1+scale)+shift`) is unmistakably this family's site
        return match.output_node() if "k" in match.kwargs else None

    def anchors(self, graph):
        found = []
        for n in graph.find_nodes(op="call_function", target=aten.add.Tensor):
            for arg in n.args:
                if isinstance(arg, torch.fx.Node) and arg.target == aten.mul.Tensor and any(
                        isinstance(m, torch.fx.Node) and m.target == aten.add.Tensor and len(m.args) == 2
                        and is_number(m.args[1]) and m.args[1] != 0 for m in arg.args):
                    found.append(n)
                    break
        return [n for n in found if n.users]

    def check(self, match, variant):
        kw = match.kwargs
        tensors = [val(kw[n]) for n in ("a", "b", "c")]
        if not all(isinstance(t, torch.Tensor) and t.is_floating_point() for t in tensors):
            return "an operand is not a floating-point tensor"
        a, b, c = tensors
        out = val(match.output_node())
        k = 0.0
        if variant.info["has_k"]:
            if not is_number(kw["k"]):
                return "k in (k + b) is a tensor"
            k = float(kw["k"])
        elif tuple(b.shape) == tuple(out.shape) and tuple(a.shape) != tuple(out.shape):
            kw = dict(kw, a=kw["b"], b=kw["a"])  # the gate is the broadcast operand
            a, b = b, a
        if tuple(a.shape) != tuple(out.shape):
            return f"scaled operand {tuple(a.shape)} is not the full output shape {tuple(out.shape)}"
        kb, kc = broadcast_kind(b.shape, out.shape), broadcast_kind(c.shape, out.shape)
        if kb is None or kc is None:
            return f"scale {tuple(b.shape)} / shift {tuple(c.shape)} do not broadcast as a modulation " \
                   f"against {tuple(out.shape)}"
        if not variant.info["has_k"] and kb not in ("scalar", "channel", "batch"):
            # full: a generic multiply-add; frame-shaped: also rope's x1*sin + x2*cos
            return f"a {kb}-shaped factor in `c + a*b` is not a gate"
        if not variant.info["has_k"] and kc != "full":
            # `n*w + b` with vectors is a norm's affine tail, which Inductor fuses into the norm
            return "`c + a*b` with a broadcast c is an affine, not a gated residual"
        return {"a": kw["a"], "b": kw["b"], "c": kw["c"], "k": k, "out_dtype": out.dtype,
                "b_kind": kb, "c_kind": kc}

    def replace(self, match, variant, site, ctx):
        op, k, out_dtype = ctx.impl(self.name), site["k"], site["out_dtype"]
        match.replace_by_example(lambda a, b, c: op(a, b, c, k, out_dtype), [site["a"], site["b"], site["c"]])


FAMILY = ScaleShiftPattern()
