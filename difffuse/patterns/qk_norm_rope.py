"""qk_norm_rope: RMSNorm (or LayerNorm) of q (or k) followed by a rotary embedding, in one op call.

    x ─ norm(last dim, eps, w, b)  ─ (view [.., H*D] → [.., H, D])? ─ r ─ rope(r, cos, sin) ─▶ out [.., H, D]
      ==>  difffuse::qk_norm_rope(x, w, cos, sin, eps, H, across_heads, interleaved, out_dtype, b, is_rms,
                                  full_tables)

The rope is found by the one rope recogniser (patterns/rope.py), whatever its spelling:
it gives the pairing (interleaved or halves), the op's cos/sin (read from the model's own
tables, or gathered from them) and the site's nodes. This module then looks at what
surrounds the rope: the norm is any of rms_norm's own variants (its table, matched at the
node that feeds the rope) or a LayerNorm (patterns/layer_norm.py: weight and bias
parameters); a layout `clone` before it is dropped (the op reads strides). Its scope is
read from the shapes: *across heads* (x is [.., H*D], viewed to [.., H, D] after the norm:
Wan) or *per head* (x is [.., H, D]: Flux, Qwen-Image, ...).

A q/k of rank 3 ([B, L, D], no head dim: LTX-Video ropes the whole width after its
across-heads norm) is one head of width D: the op gets [B, L, 1, D] views. So is a per-head
q/k laid out [B, H, L, D] (CogVideoX normalises after the transpose): the tables index
dim -2, so it is the token dim, and the op gets [B, H, L, 1, D].

Beyond one norm feeding one rope:
  joint streams  rope(cat([norm_a(q_txt), norm_b(q_img)], token dim)) (Flux, HunyuanVideo
                 dual blocks): one op call per stream on its rows of the tables, joined;
                 each stream keeps its own weight and eps.
  token range    cat([rope(n[:, :a]), n[:, a:]]) or the text-first mirror (HunyuanVideo
                 single blocks rope the image tokens only): one op call over all tokens
                 with identity rows (cos 1, sin 0) for the tokens passed through.
  in place       q[:, :, a:] = rope(q[:, :, a:]) (CogVideoX), functionalized as
                 slice_scatter(n, copy(n[.., a:], rope(n[.., a:])), d, a, end): the same one op
                 call; the copy must not round (rope output in q's dtype).
Checks (a false match is the worst bug): the norm reduces the last dim, eps is read from
the match; nothing but views sits between the norm and the rope, and neither the norm
output nor the views are used elsewhere; the tables broadcast against [.., H, D] without
enlarging it. A rope whose input is not a norm's output is left to the `rope` family
(patterns/rope_only.py), which reports the reason; so is one whose norm this op cannot
take (a LayerNorm across heads on the CUDA lowering, say): the norm then fuses as
rms_norm and the rope on its own.
"""
from __future__ import annotations

import torch
from torch.fx.experimental.symbolic_shapes import statically_known_true

from . import layer_norm
from .common import VIEW_OPS, Family, Variant, aten, inserted_by, match_reason, val
from .rms_norm import RMSNormPattern
from .rope import Found, find_ropes
from .rope_site import RopeMatch, RopePass
from .rope_site import anchors as rope_anchors

INF_END = 2 ** 63 - 1

_RMS = RMSNormPattern()
# between the norm and the rope: views, and the layout copy a reshape of a strided norm output
# makes (clone, then view); both keep every value, and the op writes its own layout
_BETWEEN = (*VIEW_OPS, aten.clone.default)


# --------------------------------------------------------------------- shape helpers
def _table_dim(t, dim: int, ndim: int):
    """The dim of a table (broadcast from the right against rank-`ndim` q/k) that lines up
    with q/k's `dim`; None where the table does not vary along it."""
    td = dim - (ndim - t.ndim)
    return None if td < 0 or _eq(t.shape[td], 1) else td


def _eq(a, b) -> bool:
    return statically_known_true(a == b)


def _same(s1, s2) -> bool:
    return len(s1) == len(s2) and all(_eq(a, b) for a, b in zip(s1, s2))


def _is_last(dim, ndim: int) -> bool:
    return dim in (-1, ndim - 1)


def _broadcasts_into(t, shape) -> bool:
    """t broadcasts against `shape` without enlarging it."""
    if not isinstance(t, torch.Tensor) or t.ndim > len(shape):
        return False
    return all(_eq(a, 1) or _eq(a, b) for a, b in zip(reversed(t.shape), reversed(shape)))


def _table_reason(cos, sin, shape, d, full_width: bool = True) -> str | None:
    """cos/sin: one table shape, head_dim wide (`full_width`), broadcasting into q/k."""
    cv, sv = val(cos), val(sin)
    if not (isinstance(cv, torch.Tensor) and isinstance(sv, torch.Tensor)):
        return "cos/sin are not tensors"
    if not _same(cv.shape, sv.shape):
        return f"cos {tuple(cv.shape)} and sin {tuple(sv.shape)} are not one position table shape"
    if full_width and not _eq(cv.shape[-1], d):
        return f"cos/sin last dim {cv.shape[-1]} is not head_dim {d}"
    if not _broadcasts_into(cv, (*shape[:-1], cv.shape[-1])):
        return f"cos/sin {tuple(cv.shape)} do not broadcast into q/k {tuple(shape)}"
    return None


def _half_table(node, start: int):
    """`table[..., start::2]` over the last dim -> table, else None."""
    if not (isinstance(node, torch.fx.Node) and node.target == aten.slice.Tensor):
        return None
    t = val(node.args[0])
    args = list(node.args) + [0, None, INF_END, 1][len(node.args) - 1:]
    _, dim, st, end, step = args[:5]
    if not isinstance(t, torch.Tensor) or not _is_last(dim, t.ndim) or st != start or step != 2:
        return None
    if end is not None and not (end == INF_END or (isinstance(end, int) and end >= t.shape[-1])):
        return None
    return node.args[0]


def _norm_at(node) -> tuple | None:
    """(site or reason, matched nodes) for the RMSNorm or LayerNorm ending at `node`."""
    for variant in _RMS.variants():
        m = variant.pattern.match(node)
        if m:
            # a lifted eps (dynamic=True) is passed to the op as `eps_t`, read at run time
            return match_reason(m) or _RMS.check(m, variant, lifted_eps=True), list(m.nodes)
    return layer_norm.match_at(node)


class QKNormRopePattern(Family):
    name = "qk_norm_rope"

    def variants(self) -> list[Variant]:
        return []  # one recogniser, no pattern table (patterns/rope.py says why)

    def build_pass(self, get_ctx):
        return RopePass(self, get_ctx)

    def anchors(self, graph):
        """Ropes still in the graph whose input is a norm's output (the others are the
        `rope` family's): the rope's first pair split, where its reason was recorded."""
        return rope_anchors(self, graph)

    def norm_fed(self, f: Found) -> bool:
        """The rope reads a norm's output (through views), a stream join or token range of one."""
        n = f.root
        if n.target == aten.cat.default:
            return any(self._is_norm(p) for p in n.args[0] if isinstance(p, torch.fx.Node))
        if n.target == aten.slice.Tensor:
            n = n.args[0]
        return self._is_norm(n)

    takes = norm_fed

    def explain(self, f: Found, reason: str) -> str:
        return reason

    @staticmethod
    def _is_norm(n) -> bool:
        """n is (through views) a norm's output, or a norm another family fused since."""
        while isinstance(n, torch.fx.Node) and n.target in _BETWEEN:
            n = n.args[0]
        if inserted_by(n)[:1] in (("rms_norm",), ("norm_scale_shift",)):
            return True
        return isinstance(n, torch.fx.Node) and _norm_at(n) is not None

    # ------------------------------------------------------------------ site
    def site(self, f: Found) -> tuple[RopeMatch, dict] | str:
        """The op call(s) a recognised rope becomes with the norm in front of it, or why not."""
        r, spec = f.root, f.spec
        rv = val(r)
        tables = dict(zip(("cos", "sin"), spec.fake_tables()))
        d = rv.shape[-1]
        reason = _table_reason(tables["cos"], tables["sin"], tuple(rv.shape), d)
        if reason:
            return reason
        common = dict(out_dtype=spec.out_dtype, interleaved=spec.interleaved, full_tables=spec.full_tables,
                      spec=spec, table_nodes=spec.table_nodes())
        match = RopeMatch(r.graph, f.out, [r] + list(f.nodes))
        ctx = self._context(f, match)
        if isinstance(ctx, str):
            return ctx
        partial, kw = ctx
        match.kwargs = kw
        if partial:
            site = self._partial_site(match, kw, rv, tables, partial, common)
        elif r.target == aten.cat.default:
            site = self._joint_site(match, r, rv, tables, common)
        else:
            site = self._norm(match, r, rv)
            if not isinstance(site, str):
                site.update(tables, **common)
                if not _same(val(f.out).shape, rv.shape):  # the rope ends in a reshape (pairs, heads)
                    site["out_shape"] = tuple(val(f.out).shape)
        if isinstance(site, str):
            return site
        for call in site.get("calls", [site]):
            if not call["across_heads"] and not call.get("one_head") and \
                    _table_dim(val(tables["cos"]), rv.ndim - 2, rv.ndim) is not None:
                # per head on [B, H, L, D] (heads before tokens: CogVideoX): dim -2 is the
                # token dim the tables index, so the op gets one head per token
                call.update(one_head=True, num_heads=1)
            if not isinstance(call["num_heads"], int):
                return f"number of heads {call['num_heads']} is not a constant"
            if call.get("one_head"):  # what the op will get
                got = call.get("check_tables", {})
                call["check_tables"] = {"x": val(call["x"]).unsqueeze(-2), **{
                    t: got.get(t, val(tables[t])).unsqueeze(-2) for t in ("cos", "sin")}}
        return match, site

    def _context(self, f: Found, match: RopeMatch):
        """(partial, kwargs): how the rope sits in q/k. A rope on one token range of a
        normalised q/k, joined back by a cat (`head`/`tail`) or written in place by a
        slice_scatter (`scatter`); else (None, {})."""
        r, out = f.root, f.out
        if r.target != aten.slice.Tensor:
            return None, {}
        n, d = r.args[0], r.args[1] if len(r.args) > 1 else 0
        a, b = (list(r.args[2:4]) + [None, INF_END])[:2]
        kw = dict(normed=n, seg_dim=d, rope_start=0 if a is None else a, rope_end=INF_END if b is None else b)
        users = list(out.users)
        if len(users) != 1:
            return "the rope on a token range is read by several nodes"
        join = users[0]
        if out.target == aten.copy.default and join.target == aten.slice_scatter.default \
                and join.args[0] is n and join.args[1] is out and list(join.args[2:5]) == [d, *r.args[2:4]]:
            kw["dst"] = out.args[0]
            match.set_output(join, extra=[join])
            return "scatter", kw
        if join.target == aten.cat.default and len(join.args[0]) == 2 and (
                join.args[1] if len(join.args) > 1 else 0) == d:
            first = join.args[0][0] is out
            rest = join.args[0][1 if first else 0]
            if isinstance(rest, torch.fx.Node) and rest.target == aten.slice.Tensor and rest.args[0] is n \
                    and rest.args[1] == d:
                ra, rb = (list(rest.args[2:4]) + [None, INF_END])[:2]
                kw.update(rest_start=0 if ra is None else ra, rest_end=INF_END if rb is None else rb)
                match.set_output(join, extra=[rest, join])
                return ("head" if first else "tail"), kw
        return "the rope on a token range of q/k is not joined back with the rest of its tokens"

    # ------------------------------------------------------------------ token ranges
    def _partial_site(self, match, kw, rv, tables, partial, common) -> dict | str:
        """Rope on [a, b) of a token dim, the rest of that dim passed through: one op call
        on all tokens with identity rows (cos 1, sin 0) for the rest in the tables.
        (A table that does not vary along the dim, e.g. the head dim, is not a token dim.)"""
        normed, dim = kw["normed"], kw["seg_dim"]
        nv = val(normed)
        if dim < 0:
            dim += nv.ndim
        if not isinstance(dim, int) or not 0 <= dim < nv.ndim - 1:
            return f"rope on a range of dim {kw['seg_dim']}, not of a token dim"
        size = nv.shape[dim]

        def bound(i):
            i = val(i) if isinstance(i, torch.fx.Node) else i  # a symbolic bound (dynamic=True): its SymInt
            i = size if i is None or (isinstance(i, int) and i == INF_END) else i
            return i + size if isinstance(i, int) and i < 0 else i
        a, b = bound(kw["rope_start"]), bound(kw["rope_end"])
        consumers = ()
        if partial == "scatter":  # written in place: the rest is [0, a) or [b, size)
            consumers = self._scatter_writes(match, kw)
            if isinstance(consumers, str):
                return consumers
            partial = "head" if a == 0 else "tail"
            c, e = (b, size) if a == 0 else (0, a)
        else:
            c, e = bound(kw["rest_start"]), bound(kw["rest_end"])
        if not all(isinstance(i, (int, torch.SymInt)) for i in (a, b, c, e)):
            return "token ranges are not integers"
        if isinstance(size, int):
            e, b = (min(i, size) if isinstance(i, int) else i for i in (e, b))
        tiles = (_eq(a, 0) and _eq(b, c) and _eq(e, size)) if partial == "head" else (
            _eq(c, 0) and _eq(e, a) and _eq(b, size))
        if not tiles or _eq(a, b) or _eq(c, e):
            return f"roped [{a}, {b}) and passed [{c}, {e}) do not split the {size} tokens in two"
        tdim = _table_dim(val(tables["cos"]), dim, rv.ndim)
        if tdim is None or not _eq(val(tables["cos"]).shape[tdim], rv.shape[dim]):
            return f"cos/sin {tuple(val(tables['cos']).shape)} are not indexed by token along dim {dim}"
        norm = self._norm(match, normed, nv, consumers=consumers)
        if isinstance(norm, str):
            return norm
        norm["norm_nodes"] = list(consumers) + norm["norm_nodes"]  # the write's target first: it reads the norm
        rest = e - c
        ext = {t: val(tables[t]).new_empty([rest if i == tdim else s for i, s in enumerate(val(tables[t]).shape)])
               for t in ("cos", "sin")}  # the identity rows, for the lowering's eligibility check
        norm.update(tables, **common, partial=dict(dim=tdim, rest=rest, rope_first=partial == "head", x_dim=dim))
        norm["check_tables"] = {t: torch.cat([val(tables[t]), ext[t]] if partial == "head"
                                             else [ext[t], val(tables[t])], tdim) for t in ("cos", "sin")}
        return norm

    def _scatter_writes(self, match, kw) -> tuple | str:
        """The in-place form's checks: the copy writes the rope (same dtype, no rounding)
        into a slice of the normalised q/k at the roped range; returns the nodes outside
        the pattern that read the norm output (a separate slice node as the copy's target)."""
        out = match.output_node()
        copy = out.args[1]
        dst, src = kw["dst"], copy.args[1]
        if val(dst).dtype != val(src).dtype:
            return f"the rope ({val(src).dtype}) is written into a {val(dst).dtype} q/k: a rounding the op does not make"
        if dst in match.nodes:
            return ()
        if not (dst.target == aten.slice.Tensor and dst.args[0] is kw["normed"]
                and list(dst.args[1:4]) == [kw["seg_dim"], kw["rope_start"], kw["rope_end"]]
                and list(dst.users) == [copy]):
            return "the rope is copied into something other than its own token range of q/k"
        return (dst,)

    def _joint_site(self, match, r, rv, tables, common) -> dict | str:
        """Rope over a concatenation of separately normalised q (or k) streams (Flux's joint
        attention: text and image tokens, each with its own norm weight): one op call per
        stream on its slice of the tables, joined along the token dim."""
        parts, dim = r.args[0], (r.args[1] if len(r.args) > 1 else r.kwargs.get("dim", 0))
        if dim < 0:
            dim += rv.ndim
        if not 0 <= dim < rv.ndim - 2:
            return f"q/k streams concatenated along dim {dim}, not a token dim"
        calls, offset = [], 0
        for part in parts:
            pv = val(part)
            site = self._norm(match, part, pv, consumers=(r,))
            if isinstance(site, str):
                return f"stream {len(calls)}: {site}"
            tdim = _table_dim(val(tables["cos"]), dim, rv.ndim)
            site.update(tables, **common, start=offset, length=pv.shape[dim])
            site["check_tables"] = {t: val(tables[t]) if tdim is None else val(tables[t]).narrow(
                tdim, offset, pv.shape[dim]) for t in ("cos", "sin")}
            calls.append(site)
            offset += pv.shape[dim]
        return dict(calls=calls, join_dim=dim, table_dim=tdim, spec=common["spec"], table_nodes=common["table_nodes"],
                    norm_nodes=[r] + [n for c in calls for n in c["norm_nodes"]], **tables)

    def _norm(self, match, r, rv, consumers=()) -> dict | str:
        """Walk r back through views to the norm (an RMSNorm of rms_norm's table, or a
        LayerNorm) used only by the rope (or by `consumers`: the concatenation of streams,
        the in-place write's target)."""
        if any(u not in match.nodes and u not in consumers for u in r.users):
            return "the rope input is also used outside the rope"
        chain, n = [], r
        while n.target in _BETWEEN:
            chain.append(n)
            n = n.args[0]
            if len(n.users) != 1:
                return "the normalised q/k is also used outside the rope"
        found = _norm_at(n)
        if found is None:
            return "the rope input is not an RMSNorm or LayerNorm output (something else sits between norm and rope)"
        site, nodes = found
        if isinstance(site, str):
            return f"norm before the rope not fused: {site}"
        dead = chain + list(reversed(nodes))
        x = site["x"]
        if x.target == aten.clone.default and all(u in nodes for u in x.users):
            dead.append(x)  # a layout copy before the norm (LayerNorm of a transposed q/k): the op reads strides
            x = x.args[0]
        xv, d = val(x), rv.shape[-1]
        out = {"x": x, "weight": site["weight"], "bias": site.get("bias"), "eps": site["eps"],
               "eps_node": site.get("eps_node"), "eps_tensor": site.get("eps_tensor", False),
               "is_rms": site.get("is_rms", True), "head_dim": d, "norm_nodes": dead}
        if _same(xv.shape, rv.shape) and rv.ndim == 3:
            # [B, L, D] with no head dim (LTX ropes the whole width): one head of width D;
            # the replacement views q/k and the tables as [B, L, 1, D]
            return {**out, "num_heads": 1, "across_heads": False, "one_head": True}
        if _same(xv.shape, rv.shape):
            return {**out, "num_heads": rv.shape[-2], "across_heads": False}
        if _same(xv.shape[:-1], rv.shape[:-2]) and _eq(xv.shape[-1], rv.shape[-2] * d):
            return {**out, "num_heads": rv.shape[-2], "across_heads": True}
        return f"norm over {tuple(xv.shape)} is neither per head nor across heads of q/k {tuple(rv.shape)}"

    # ------------------------------------------------------------------ replace
    def replace(self, match, variant, site, ctx):
        op = ctx.impl(self.name)
        calls = site.get("calls", [site])
        spec = site["spec"]
        table_args = site["table_nodes"]
        params = [c[k] for c in calls for k in ("weight", "bias", "eps_node")]  # each call's, if any
        has_p = [p is not None for p in params]
        partial, join_dim, table_dim = site.get("partial"), site.get("join_dim"), site.get("table_dim")

        def fused(*args):
            xs, args = args[:len(calls)], args[len(calls):]
            cos, sin = spec.build(args[:len(table_args)])
            ps = iter(args[len(table_args):])
            if partial:  # identity rows (cos 1, sin 0) for the tokens the model does not rope
                shape, rest = list(cos.shape), partial["rest"]
                if not isinstance(rest, int):  # symbolic (dynamic=True): from the replacement's own inputs
                    rest = xs[0].shape[partial["x_dim"]] - cos.shape[partial["dim"]]
                shape[partial["dim"]] = rest
                ones, zeros = cos.new_ones(shape), sin.new_zeros(shape)
                first = partial["rope_first"]
                cos = torch.cat([cos, ones] if first else [ones, cos], partial["dim"])
                sin = torch.cat([sin, zeros] if first else [zeros, sin], partial["dim"])
            outs = []
            for i, (call, x) in enumerate(zip(calls, xs)):
                c, s = cos, sin
                if table_dim is not None:  # each stream's rows of the tables
                    c, s = (t.narrow(table_dim, call["start"], call["length"]) for t in (cos, sin))
                w, b, eps_t = (next(ps) if has_p[3 * i + j] else None for j in (0, 1, 2))
                if call.get("one_head"):
                    x, c, s = x.unsqueeze(-2), c.unsqueeze(-2), s.unsqueeze(-2)
                extra = {} if eps_t is None else {"eps_t": eps_t}
                o = op(x, w, c, s, call["eps"], call["num_heads"], call["across_heads"], call["interleaved"],
                       call["out_dtype"], b, call["is_rms"], call["full_tables"], **extra)
                outs.append(o.squeeze(-2) if call.get("one_head") else o)
            if join_dim is not None:
                return torch.cat(outs, join_dim)
            return outs[0].reshape(site["out_shape"]) if site.get("out_shape") else outs[0]

        ctx.replace(match, fused, [c["x"] for c in calls] + table_args + [p for p in params if p is not None])
        graph = match.graph
        for n in site["norm_nodes"]:  # the norm now feeds nothing: drop it before rms_norm sees it
            if not n._erased and not n.users:
                graph.erase_node(n)


FAMILY = QKNormRopePattern()
