"""qk_norm_rope: RMSNorm (or LayerNorm) of q (or k) followed by a rotary embedding, in one op call.

    x ─ norm(last dim, eps, w, b)  ─ (view [.., H*D] → [.., H, D])? ─ r ─ rope(r, cos, sin) ─▶ out [.., H, D]
      ==>  difffuse::qk_norm_rope(x, w, cos, sin, eps, H, across_heads, interleaved, out_dtype, b, is_rms)

The norm is any of rms_norm's own variants (its table, matched at the node that feeds the
rope) or a LayerNorm (patterns/layer_norm.py: weight and bias parameters); a layout
`clone` before it is dropped (the op reads strides). Its scope is read from the shapes: *across heads* (x is [.., H*D], viewed to
[.., H, D] after the norm: Wan) or *per head* (x is [.., H, D]: Flux, Qwen-Image, ...).
The rope is one of the spellings below (each a variant, dumped from torch 2.13 post-grad
graphs, fp32 and bf16; `.float()` casts are their own variants, mixed-dtype products
leave no cast node). The permute to [B, H, L, D] for attention stays in the graph.

  wan_scatter  (diffusers WanAttnProcessor, interleaved pairs; half tables c = cos[..., 0::2], s = sin[..., 1::2])
      x1, x2 = unbind(view(r, [.., D/2, 2]), -1);  buf = empty(r.shape)
      ss0 = slice_scatter(buf, copy(buf[..., 0::2], x1*c - x2*s), -1, 0, ∞, 2)
      out = slice_scatter(ss0, copy(ss0[..., 1::2], x1*s + x2*c), -1, 1, ∞, 2)
  stack        (diffusers apply_rotary_emb, use_real_unbind_dim=-1: Flux, HunyuanVideo, LTX)
      re, im = unbind(view(r, [.., D/2, 2]), -1);  rot = view(cat([(-im)[..., None], re[..., None]], -1), r.shape)
      out = (r.float() * cos + rot.float() * sin).to(r.dtype)
  neox         (use_real_unbind_dim=-2, rotate_half: CogView4, Cosmos, OmniGen)
      a, b = unbind(view(r, [.., 2, D/2]), -2);  out = (r.float() * cos + cat([-b, a], -1).float() * sin).to(r.dtype)
  complex      (Qwen-Image, Lumina: view_as_complex(r.float().reshape(.., D/2, 2)) * freqs_cis)
      out = view(view_as_real(view_as_complex(view(r, [.., D/2, 2])) * f), r.shape).type_as(r)
      ==> cos = sin = view_as_real(f).flatten(-2) in the replacement (cos[2i] = Re f_i,
          sin[2i+1] = Im f_i: exactly the op's interleaved pair rotation).

A q/k of rank 3 ([B, L, D], no head dim: LTX-Video ropes the whole width after its
across-heads norm) is one head of width D: the op gets [B, L, 1, D] views. So is a per-head
q/k laid out [B, H, L, D] (CogVideoX normalises after the transpose): the tables index
dim -2, so it is the token dim, and the op gets [B, H, L, 1, D].

The op's interleaved math has two table readings. Half tables (wan_scatter, complex):
out[2i] = x[2i]*cos[2i] - x[2i+1]*sin[2i+1], out[2i+1] = x[2i]*sin[2i+1] + x[2i+1]*cos[2i],
exact for those forms with any tables. Full tables (`full_tables=True`, the stack form):
out[2i] = x[2i]*cos[2i] - x[2i+1]*sin[2i], out[2i+1] = x[2i+1]*cos[2i+1] + x[2i]*sin[2i+1],
every output element reading its own entries, exact for any table: a rope table is
pair-duplicated (diffusers `get_1d_rotary_pos_embed(repeat_interleave_real=True)`), but
that cannot be proven at compile time from a table that is a graph input.

Checks (a false match is the worst bug): the norm reduces the last dim, eps is read from
the match; nothing but views sits between the norm and the rope, and neither the norm
output nor the views are used elsewhere; head_dim even; cos and sin have one shape, span
head_dim and broadcast against [.., H, D] without enlarging it; in wan_scatter the table
multiplied with x1 in the first output is `cos[..., 0::2]` and the other `sin[..., 1::2]`
(swapped tables or offsets do not match). Unmatched ropes are reported by `anchors`
(unbind over a size-2 dim, view_as_complex, a rotate_half cat) with the reason.
Beyond one norm feeding one rope (each its own variant or check):
  joint streams  rope(cat([norm_a(q_txt), norm_b(q_img)], token dim)) (Flux, HunyuanVideo
                 dual blocks): one op call per stream on its rows of the tables, joined;
                 each stream keeps its own weight and eps.
  token range    cat([rope(n[:, :a]), n[:, a:]]) or the text-first mirror (HunyuanVideo
                 single blocks rope the image tokens only): one op call over all tokens
                 with identity rows (cos 1, sin 0) for the tokens passed through.
  in place       q[:, :, a:] = rope(q[:, :, a:]) (CogVideoX), functionalized as
                 slice_scatter(n, copy(n[.., a:], rope(n[.., a:])), d, a, end): the same one op
                 call; the copy must not round (rope output in q's dtype).
Known misses: partial rotary over part of head_dim; a LayerNorm across heads on the CUDA
lowering (its kernel normalises LayerNorm per head only) and on NPU.
"""
from __future__ import annotations

import torch
from torch.fx.experimental.symbolic_shapes import statically_known_true

from . import layer_norm
from .common import CONVERT, VIEW_OPS, Family, Variant, aten, is_upcast, match_reason, val
from .rms_norm import RMSNormPattern
from .rope_forms import INF_END, complex_rope, partial_rope, real_rope, scatter_rope, wan_scatter

_RMS = RMSNormPattern()


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
            return match_reason(m) or _RMS.check(m, variant), list(m.nodes)
    return layer_norm.match_at(node)


class QKNormRopePattern(Family):
    name = "qk_norm_rope"

    def variants(self) -> list[Variant]:
        out = [Variant("wan_scatter", wan_scatter(), {"form": "wan", "casts": False})]
        def rope(form, casts, r=None):
            return complex_rope(casts, r) if form == "complex" else real_rope(form, casts, r)

        for form in ("stack", "neox", "complex"):
            for casts in (True, False):
                name = form + ("/float" if casts else "")
                for first in (True, False):  # the partial forms first: their rope is a sub-pattern
                    out.append(Variant(f"{name}/{'head' if first else 'tail'}_tokens",
                                       partial_rope(rope, form, casts, first),
                                       {"form": form, "casts": casts, "partial": "head" if first else "tail"}))
                out.append(Variant(f"{name}/scatter_tokens", scatter_rope(rope, form, casts),
                                   {"form": form, "casts": casts, "partial": "scatter"}))
                out.append(Variant(name, rope(form, casts), {"form": form, "casts": casts}))
        return out

    # ------------------------------------------------------------------ misses
    def anchor_of(self, match):
        return next((n for n in match.nodes if n.target in (aten.unbind.int, aten.view_as_complex.default)), None)

    def anchors(self, graph):
        found = []
        for n in graph.find_nodes(op="call_function", target=aten.unbind.int):
            t, dim = val(n.args[0]), (n.args[1] if len(n.args) > 1 else 0)
            if isinstance(t, torch.Tensor) and t.ndim >= 2 and dim in (-1, -2, t.ndim - 1, t.ndim - 2) \
                    and _eq(t.shape[dim], 2):
                found.append(n)
        found += graph.find_nodes(op="call_function", target=aten.view_as_complex.default)
        for n in graph.find_nodes(op="call_function", target=aten.cat.default):  # rotate_half by slicing
            parts = n.args[0]
            if (len(parts) == 2 and all(isinstance(p, torch.fx.Node) for p in parts)
                    and parts[0].target == aten.neg.default and isinstance(parts[0].args[0], torch.fx.Node)
                    and parts[0].args[0].target == aten.slice.Tensor and parts[1].target == aten.slice.Tensor
                    and parts[0].args[0].args[0] is parts[1].args[0]):
                found.append(n)
        return found

    # ------------------------------------------------------------------ check
    def check(self, match, variant):
        kw, form, partial = match.kwargs, variant.info["form"], variant.info.get("partial")
        r = self._roped_slice(match) if partial else kw["r"]
        rv = val(r)
        if not isinstance(rv, torch.Tensor) or not rv.is_floating_point() or rv.ndim < 2:
            return "rope input is not a floating-point tensor of rank >= 2"
        d = rv.shape[-1]
        if not isinstance(d, int) or d % 2:
            return f"head_dim {d} is not an even constant"
        tables = self._rope_reason(match, variant, rv, d)
        if isinstance(tables, str):
            return tables
        out = match.output_node()
        if partial == "scatter":
            rope_out = out.args[1].args[1]  # slice_scatter(n, copy(dst, rope_out), ..)
        else:
            rope_out = out.args[0][0 if partial == "head" else 1] if partial else out
        if not _same(val(rope_out).shape, rv.shape):
            return f"rope output {tuple(val(rope_out).shape)} is not shaped like its input {tuple(rv.shape)}"
        # the stack form reads every table entry (out[2i] uses cos[2i], sin[2i]; out[2i+1]
        # cos[2i+1], sin[2i+1]): exact for any table, pair-duplicated or not
        common = dict(out_dtype=val(out).dtype, interleaved=form != "neox", full_tables=form == "stack", form=form)
        if partial:
            site = self._partial_site(match, kw, rv, tables, partial, common)
        elif r.target == aten.cat.default:
            site = self._joint_site(match, r, rv, tables, common)
        else:
            site = self._norm(match, r, rv)
            if not isinstance(site, str):
                site.update(tables, **common)
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
        return site

    # ------------------------------------------------------------------ token ranges
    def _roped_slice(self, match):
        kw = match.kwargs
        return next(n for n in match.nodes if n.target == aten.slice.Tensor and n.args[0] is kw["normed"]
                    and n.args[2] == kw["rope_start"] and n.args[3] == kw["rope_end"])

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
            i = size if i is None or i == INF_END else i
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
        norm.update(tables, **common, partial=dict(dim=tdim, rest=rest, rope_first=partial == "head"))
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
        return dict(calls=calls, join_dim=dim, table_dim=tdim, form=common["form"],
                    norm_nodes=[r] + [n for c in calls for n in c["norm_nodes"]], **tables)

    def _rope_reason(self, match, variant, rv, d) -> dict | str:
        """The rope's own checks; returns the op's cos/sin (or the complex table)."""
        kw, form, shape = match.kwargs, variant.info["form"], tuple(rv.shape)
        nodes = {n.target: n for n in match.nodes}
        pair = val(nodes[aten.unbind.int].args[0]) if form != "complex" else \
            val(nodes[aten.view_as_complex.default].args[0])
        want = (*shape[:-1], 2, d // 2) if form == "neox" else (*shape[:-1], d // 2, 2)
        if not _same(pair.shape, want):
            return f"pairs viewed as {tuple(pair.shape)}, not {want}"
        if form != "complex" and kw["unbind_dim"] not in ((-2, len(want) - 2) if form == "neox" else (-1, len(want) - 1)):
            return f"unbind over dim {kw['unbind_dim']}, not the pair dim"
        if "cat_dim" in kw and not _is_last(kw["cat_dim"], len(shape) + (form == "stack")):
            return f"rotated halves concatenated over dim {kw['cat_dim']}, not the last"
        if "u_dim" in kw and not _is_last(kw["u_dim"], len(shape) + 1):
            return f"pairs stacked over dim {kw['u_dim']}, not the last"
        if variant.info["casts"]:
            out = match.output_node()  # the rope's own final cast is the output or feeds the join (or the copy)
            if variant.info.get("partial") == "scatter":
                out = out.args[1]
            ups = [n for n in match.nodes if n.target == CONVERT and n is not out and out not in n.users]
            if not all(is_upcast(n) and n.args[1] == torch.float32 for n in ups):
                return "the rope computes in a narrower dtype than fp32 (.float() is not an upcast)"
        if form == "wan":
            buf = kw["buf"]
            if buf.target not in (aten.empty.memory_format, aten.empty_like.default) or len(buf.users) != 2:
                return "the pair writes do not go into a fresh empty buffer"
            if not _same(val(buf).shape, shape) or not _is_last(kw["dim"], len(shape)):
                return "the strided writes do not cover the last dim of an [.., H, D] buffer"
            if kw["end"] != INF_END and kw["end"] < d:
                return f"strided writes end at {kw['end']} < head_dim {d}"
            cos, sin = _half_table(kw["c"], 0), _half_table(kw["s"], 1)
            if cos is None or sin is None:
                return ("x1 is not multiplied by cos[..., 0::2] and sin[..., 1::2] as a rope does "
                        "(sin/cos swapped or not strided halves of full-width tables)")
            half = (*shape[:-1], d // 2)  # the op reads only these halves; a symbolic table width is fine
            if not all(_eq(val(kw[k]).shape[-1], d // 2) and _broadcasts_into(val(kw[k]), half) for k in "cs"):
                return "cos/sin halves do not broadcast into q/k pairs"
        elif form == "complex":
            f = val(kw["freqs"])
            if not (isinstance(f, torch.Tensor) and f.is_complex()):
                return "the complex rope factor is not a complex tensor"
            if not _eq(f.shape[-1], d // 2) or not _broadcasts_into(f, pair.shape[:-1]):
                return f"complex table {tuple(f.shape)} does not broadcast into q/k pairs {tuple(pair.shape[:-1])}"
            table = torch.view_as_real(f).flatten(-2)  # what the replacement passes as cos and sin
            return {"cos": table, "sin": table, "freqs": kw["freqs"]}
        else:
            cos, sin = kw["cos"], kw["sin"]
        reason = _table_reason(cos, sin, shape, d, full_width=form != "wan")
        return reason if reason else {"cos": cos, "sin": sin}

    def _norm(self, match, r, rv, consumers=()) -> dict | str:
        """Walk r back through views to the norm (an RMSNorm of rms_norm's table, or a
        LayerNorm) used only by the rope (or by `consumers`: the concatenation of streams,
        the in-place write's target)."""
        if any(u not in match.nodes and u not in consumers for u in r.users):
            return "the rope input is also used outside the rope"
        chain, n = [], r
        while n.target in VIEW_OPS:
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
        complex_form = site["form"] == "complex"
        table_args = [site["freqs"]] if complex_form else [site["cos"], site["sin"]]
        params = [c[k] for c in calls for k in ("weight", "bias")]  # each call's weight and bias, if any
        has_p = [p is not None for p in params]
        partial, join_dim, table_dim = site.get("partial"), site.get("join_dim"), site.get("table_dim")

        def fused(*args):
            xs, args = args[:len(calls)], args[len(calls):]
            if complex_form:
                cos = sin = torch.view_as_real(args[0]).flatten(-2)
                args = args[1:]
            else:
                cos, sin, args = args[0], args[1], args[2:]
            ps = iter(args)
            if partial:  # identity rows (cos 1, sin 0) for the tokens the model does not rope
                shape = list(cos.shape)
                shape[partial["dim"]] = partial["rest"]
                ones, zeros = cos.new_ones(shape), sin.new_zeros(shape)
                first = partial["rope_first"]
                cos = torch.cat([cos, ones] if first else [ones, cos], partial["dim"])
                sin = torch.cat([sin, zeros] if first else [zeros, sin], partial["dim"])
            outs = []
            for i, (call, x) in enumerate(zip(calls, xs)):
                c, s = cos, sin
                if table_dim is not None:  # each stream's rows of the tables
                    c, s = (t.narrow(table_dim, call["start"], call["length"]) for t in (cos, sin))
                w, b = (next(ps) if has_p[2 * i + j] else None for j in (0, 1))
                if call.get("one_head"):
                    x, c, s = x.unsqueeze(-2), c.unsqueeze(-2), s.unsqueeze(-2)
                o = op(x, w, c, s, call["eps"], call["num_heads"], call["across_heads"], call["interleaved"],
                       call["out_dtype"], b, call["is_rms"], call["full_tables"])
                outs.append(o.squeeze(-2) if call.get("one_head") else o)
            return torch.cat(outs, join_dim) if join_dim is not None else outs[0]

        ctx.replace(match, fused, [c["x"] for c in calls] + table_args + [p for p in params if p is not None])
        graph = match.graph
        for n in site["norm_nodes"]:  # the norm now feeds nothing: drop it before rms_norm sees it
            if not n._erased and not n.users:
                graph.erase_node(n)


FAMILY = QKNormRopePattern()
