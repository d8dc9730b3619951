"""The rope spellings qk_norm_rope matches, as post-grad aten patterns (their math and
which models write each: the family's docstring). Each builder takes the rope input `r`
as a pattern, so the token-range forms can rope a slice of the normalised q/k."""
from __future__ import annotations

import operator

from torch._inductor.pattern_matcher import MULTIPLE, CallFunction, Ignored, KeywordArg

from .common import VIEW_OPS, aten, cast

GETITEM = operator.getitem
INF_END = 2 ** 63 - 1


def view(p, users: int = 1):
    return CallFunction(list(VIEW_OPS), p, Ignored(), _users=users)


def mul(a, b):
    return CallFunction(aten.mul.Tensor, a, b)


def maybe_cast(p, on: bool):
    return cast(p) if on else p


def pairs(r, dim: str):
    """(first, second) = unbind(view(r, [..., D/2, 2] or [..., 2, D/2]), dim)."""
    unb = CallFunction(aten.unbind.int, view(r), KeywordArg(dim), _users=2)
    return unb, CallFunction(GETITEM, unb, 0, _users=2), CallFunction(GETITEM, unb, 1, _users=2)


def wan_scatter():
    """diffusers WanAttnProcessor.apply_rotary_emb: strided writes into empty_like(r)."""
    r, c, s, buf = KeywordArg("r"), KeywordArg("c"), KeywordArg("s"), KeywordArg("buf")
    _, x1, x2 = pairs(r, "unbind_dim")
    even = CallFunction(aten.sub.Tensor, mul(x1, c), mul(x2, s))
    odd = CallFunction(aten.add.Tensor, mul(x1, s), mul(x2, c))
    dim, end = KeywordArg("dim"), KeywordArg("end")
    copy0 = CallFunction(aten.copy.default, CallFunction(aten.slice.Tensor, buf, dim, 0, end, 2), even)
    ss0 = CallFunction(aten.slice_scatter.default, buf, copy0, dim, 0, end, 2, _users=2)
    copy1 = CallFunction(aten.copy.default, CallFunction(aten.slice.Tensor, ss0, dim, 1, end, 2), odd)
    return CallFunction(aten.slice_scatter.default, ss0, copy1, dim, 1, end, 2)


def real_rope(form: str, casts: bool, r=None):
    """out = (r.float() * cos + rotate(r).float() * sin).to(r.dtype); rotate by pairs (stack) or halves (neox)."""
    r = KeywordArg("r") if r is None else r
    unb = CallFunction(aten.unbind.int, view(r), KeywordArg("unbind_dim"), _users=2)
    first, second = CallFunction(GETITEM, unb, 0), CallFunction(GETITEM, unb, 1)
    neg = CallFunction(aten.neg.default, second)
    if form == "stack":
        u = KeywordArg("u_dim")
        cat = CallFunction(aten.cat.default, [CallFunction(aten.unsqueeze.default, neg, u),
                                              CallFunction(aten.unsqueeze.default, first, u)], KeywordArg("cat_dim"))
        rot = view(cat)
    else:
        rot = CallFunction(aten.cat.default, [neg, first], KeywordArg("cat_dim"))
    out = CallFunction(aten.add.Tensor, mul(maybe_cast(r, casts), KeywordArg("cos")),
                       mul(maybe_cast(rot, casts), KeywordArg("sin")))
    return maybe_cast(out, casts)


def complex_rope(casts: bool, r=None):
    """view_as_real(view_as_complex(r.float().reshape(.., D/2, 2)) * freqs).flatten(3).type_as(r)."""
    r = KeywordArg("r") if r is None else r
    xc = CallFunction(aten.view_as_complex.default, view(maybe_cast(r, casts)))
    out = view(CallFunction(aten.view_as_real.default, mul(xc, KeywordArg("freqs"))))
    return maybe_cast(out, casts)


def partial_rope(rope, form: str, casts: bool, rope_first: bool):
    """Rope on one token range of a normalised q/k, the rest passed through, joined again:
    cat([rope(n[.., a:b, ..]), n[.., b:, ..]]) (rope_first, HunyuanVideo's single-stream
    blocks rope the image tokens before the text) or cat([n[.., :a, ..], rope(n[.., a:, ..])])."""
    n, d = KeywordArg("normed"), KeywordArg("seg_dim")
    roped = CallFunction(aten.slice.Tensor, n, d, KeywordArg("rope_start"), KeywordArg("rope_end"),
                         _users=1 if form == "complex" else 2)  # real forms read r twice (pairs, r * cos)
    rest = CallFunction(aten.slice.Tensor, n, d, KeywordArg("rest_start"), KeywordArg("rest_end"))
    out = rope(form, casts, roped)
    return CallFunction(aten.cat.default, [out, rest] if rope_first else [rest, out], d)


def scatter_rope(rope, form: str, casts: bool):
    """Rope written in place on one token range of a normalised q/k (CogVideoX:
    `q[:, :, a:] = rope(q[:, :, a:])`), functionalized:
    slice_scatter(n, copy(n[.., a:b, ..], rope(n[.., a:b, ..])), d, a, b)."""
    n, d, a, b = KeywordArg("normed"), KeywordArg("seg_dim"), KeywordArg("rope_start"), KeywordArg("rope_end")
    roped = CallFunction(aten.slice.Tensor, n, d, a, b, _users=MULTIPLE)  # the copy may write into this node
    written = CallFunction(aten.copy.default, KeywordArg("dst"), rope(form, casts, roped))
    return CallFunction(aten.slice_scatter.default, n, written, d, a, b)
