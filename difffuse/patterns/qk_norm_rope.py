"""qk_norm_rope: RMSNorm of q (or k) across heads, then interleaved rotary embedding.

    x[B,L,H*D] ─ rms_norm(w, eps) (casts as written) ─ reshape [B,L,H,D] ─ reshape [...,D/2,2] ─ unbind(-1)
    x1, x2;  c = cos[..., 0::2], s = sin[..., 1::2]
    out = empty_like; out[..., 0::2] = x1*c - x2*s; out[..., 1::2] = x1*s + x2*c
        (aten: empty → slice → mul/sub → copy → slice_scatter, twice)
      ==>  difffuse::qk_norm_rope(x, w, cos, sin, eps, H, across_heads=True, interleaved=True, out.dtype)

This is diffusers' Wan attention processor (norm_q/norm_k = nn.RMSNorm over H*D, then
`apply_rotary_emb` with strided writes). The output is [B, L, H, D]; the permute to the
attention layout stays in the graph. Not matched (checked): a rope whose slices are not
the (0::2, 1::2) pairs of the last dim, a norm over another dim, odd head_dim, a norm
followed by anything else before the rope (then rms_norm takes the norm alone).
Per-head norms (Flux, HunyuanVideo, LTX), the stack/unbind, neox and complex rope forms
are not matched yet: `anchors` reports their rope sites as misses.
"""
from __future__ import annotations

import operator

import torch
from torch._inductor.pattern_matcher import CallFunction, Ignored, KeywordArg

from .common import CONVERT, Family, Variant, aten, cast, val
from .rms_norm import check_rms_core, rms_core

VIEWS = [aten.reshape.default, aten.view.default]
MAXINT = 9223372036854775807


def wan_rope(x4):
    """The slice_scatter interleaved rope on x4 [B, L, H, D] (x4 is a pattern)."""
    pairs = CallFunction(VIEWS, x4, KeywordArg("pair_shape"))
    unb = CallFunction(aten.unbind.int, pairs, KeywordArg("unbind_dim"), _users=2)
    x1 = CallFunction(operator.getitem, unb, 0, _users=2)
    x2 = CallFunction(operator.getitem, unb, 1, _users=2)
    c = CallFunction(aten.slice.Tensor, KeywordArg("cos"), KeywordArg("cos_dim"), 0, KeywordArg("cos_end"), 2,
                     _users=2)
    s = CallFunction(aten.slice.Tensor, KeywordArg("sin"), KeywordArg("sin_dim"), 1, KeywordArg("sin_end"), 2,
                     _users=2)
    empty = CallFunction(aten.empty.memory_format, KeywordArg("out_shape"), dtype=KeywordArg("out_dtype"),
                         layout=Ignored(), device=Ignored(), pin_memory=Ignored(), _users=2)
    even = CallFunction(aten.sub.Tensor, CallFunction(aten.mul.Tensor, x1, c), CallFunction(aten.mul.Tensor, x2, s))
    odd = CallFunction(aten.add.Tensor, CallFunction(aten.mul.Tensor, x1, s), CallFunction(aten.mul.Tensor, x2, c))
    dst0 = CallFunction(aten.slice.Tensor, empty, KeywordArg("d0"), 0, KeywordArg("e0"), 2)
    s0 = CallFunction(aten.slice_scatter.default, empty, CallFunction(aten.copy.default, dst0, even),
                      KeywordArg("d1"), 0, KeywordArg("e1"), 2, _users=2)
    dst1 = CallFunction(aten.slice.Tensor, s0, KeywordArg("d2"), 1, KeywordArg("e2"), 2)
    return CallFunction(aten.slice_scatter.default, s0, CallFunction(aten.copy.default, dst1, odd),
                        KeywordArg("d3"), 1, KeywordArg("e3"), 2)


class QKNormRopePattern(Family):
    name = "qk_norm_rope"

    def variants(self):
        out = []
        for x_cast, tail in (("both", "w_cast"), ("none", "w"), ("both", "w"), ("none", "w_cast")):
            x = KeywordArg("x")
            n = rms_core(cast(x, users=2) if x_cast == "both" else x, "pow", "mean", "x_r")
            n = CallFunction(aten.mul.Tensor, n, KeywordArg("weight"))
            if tail == "w_cast":
                n = cast(n)
            x4 = CallFunction(VIEWS, n, KeywordArg("head_shape"))
            out.append(Variant(f"across_heads/cast_{x_cast}/{tail}/wan_interleaved", wan_rope(x4),
                               {"x_cast": x_cast}))
        return out

    def anchor_of(self, match):
        return next((n for n in match.nodes if n.target == aten.unbind.int), None)

    def anchors(self, graph):
        """Rope sites left: unbind of interleaved pairs, and complex-form ropes."""
        found = []
        for n in graph.find_nodes(op="call_function", target=aten.unbind.int):
            v = val(n.args[0])
            dim = n.args[1] if len(n.args) > 1 else 0
            if isinstance(v, torch.Tensor) and v.ndim >= 3 and dim in (-1, v.ndim - 1) and v.shape[-1] == 2:
                found.append(n)
        found += list(graph.find_nodes(op="call_function", target=aten.view_as_complex.default))
        return found

    def check(self, match, variant):
        kw = match.kwargs
        x = kw["x"]
        upcast = next((n for n in match.nodes if n.target == CONVERT and n.args[0] is x), None)
        site = check_rms_core(match, x, upcast if variant.info["x_cast"] != "none" else None)
        if isinstance(site, str):
            return site
        xv = val(x)
        head_shape = [int(s) if not isinstance(s, torch.SymInt) else s for s in kw["head_shape"]]
        x4 = next(n for n in match.nodes if n.target in VIEWS and n.args[1] is kw["head_shape"])
        v4 = val(x4)
        if v4.ndim != xv.ndim + 1 or tuple(v4.shape[:-2]) != tuple(xv.shape[:-1]):
            return f"the norm output {tuple(xv.shape)} is not split into heads as [..., H, D]"
        heads, head_dim = v4.shape[-2], v4.shape[-1]
        if head_dim % 2:
            return f"odd head_dim {head_dim}"
        last = v4.ndim - 1
        pair = val(next(n for n in match.nodes if n.target == aten.unbind.int).args[0])
        if tuple(pair.shape) != (*v4.shape[:-1], head_dim // 2, 2) or kw["unbind_dim"] not in (-1, pair.ndim - 1):
            return "the rope does not pair adjacent elements of head_dim"
        for d in ("d0", "d1", "d2", "d3"):
            if kw[d] not in (last, -1):
                return f"rope writes along dim {kw[d]}, not head_dim"
        for e in ("e0", "e1", "e2", "e3", "cos_end", "sin_end"):
            if kw[e] < head_dim and kw[e] != MAXINT:
                return "rope slices stop before the end of head_dim"
        cos, sin = val(kw["cos"]), val(kw["sin"])
        for name, t, dim in (("cos", cos, kw["cos_dim"]), ("sin", sin, kw["sin_dim"])):
            if not isinstance(t, torch.Tensor) or dim not in (t.ndim - 1, -1) or t.shape[-1] != head_dim:
                return f"the {name} table is not sliced along a head_dim-wide last dim"
            try:
                if torch.broadcast_shapes(t.shape, v4.shape) != v4.shape:
                    return f"the {name} table {tuple(t.shape)} broadcasts past the heads {tuple(v4.shape)}"
            except RuntimeError:
                return f"the {name} table {tuple(t.shape)} does not broadcast against {tuple(v4.shape)}"
        if tuple(kw["out_shape"]) != tuple(v4.shape):
            return "the rope output buffer is not the heads' shape"
        weight = kw["weight"]
        if not (isinstance(val(weight), torch.Tensor) and tuple(val(weight).shape) in ((xv.shape[-1],),)):
            return "the norm weight is not a vector over the normalised dim"
        site.update(x=x, weight=weight, cos=kw["cos"], sin=kw["sin"], num_heads=int(heads), across_heads=True,
                    interleaved=True, out_dtype=kw["out_dtype"], head_dim=int(head_dim))
        return site

    def replace(self, match, variant, site, ctx):
        op = ctx.impl(self.name)
        consts = (site["eps"], site["num_heads"], True, True, site["out_dtype"])
        match.replace_by_example(lambda x, w, c, s: op(x, w, c, s, *consts),
                                 [site["x"], site["weight"], site["cos"], site["sin"]])


FAMILY = QKNormRopePattern()
