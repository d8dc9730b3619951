"""attention: exact softmax attention calls, routed to the device's attention kernel.

    (out, lse, ...) = aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, dropout_p, is_causal,
                                                                       attn_mask=, scale=)   # CPU
                    | aten._scaled_dot_product_cudnn_attention(q, k, v, attn_bias, compute_lse, ...)
                    | aten._scaled_dot_product_flash_attention(q, k, v, dropout_p, is_causal, ...)
                    | aten._scaled_dot_product_efficient_attention(q, k, v, attn_bias, compute_lse, ...)
      ==>  (out, lse) = difffuse::attention(q, k, v, scale, is_causal)

    out[b, h, i] = sum_j softmax_j(scale * <q[b, h, i], k[b, h, j]>) v[b, h, j]
    lse[b, h, i] = log sum_j exp(scale * <q[b, h, i], k[b, h, j]>)

This is a one-node family: `F.scaled_dot_product_attention` (and hand-written
`softmax(q @ k.T * s) @ v`, which Inductor's own fuse_attention turns into SDPA before
post-grad) reaches the post-grad graph as one of the aten ops above, picked by the
device's SDPA dispatch. Every argument is read from the node (bound to its schema), so
one table row per op and positional arity covers every spelling.

Only calls a flash kernel computes exactly are sites; these are left, with the reason:
  - a mask / attn_bias (Qwen-Image, HunyuanVideo, LTX's cross-attention pass one),
  - dropout_p > 0, return_debug_mask,
  - different head counts (enable_gqa) or batch sizes, q/k head dims that differ,
  - is_causal with Lq != Lkv (SDPA aligns the causal mask top-left, flash kernels
    bottom-right: they agree only on square scores),
  - a scale the graph computes (a SymFloat node: the op takes a constant),
  - a logsumexp read in a shape the op does not give (the efficient kernel pads it to a
    multiple of 32), or other outputs read (rng state, debug mask, cum_seq).
A call SDPA's dispatcher sent to its math fallback (no fused kernel of the device took its
inputs: on CUDA an fp32 call with head dim 5; a CPU under `sdpa_kernel(MATH)`) reaches the
graph decomposed (matmul, softmax, matmul), with no attention op to route: it is still a
site, found by the nodes Dynamo traced from the SDPA call (`source_fn_stack`), and
reported with that reason (the `math_fallback` row only explains, it never rewrites).
The op writes `out` as [B, Lq, H, Dv] memory and `lse` as [B, H, Lq]; where the node's
outputs had another dense layout, the replacement permutes a copy into it, so every
consumer (views included) sees the strides it was traced with. A read logsumexp (ring
attention: `lse = prev - logsigmoid(prev - lse)`) is the op's own, in the node's layout.
"""
from __future__ import annotations

import dataclasses
import itertools
import operator
from typing import Optional

import torch
from torch._inductor.pattern_matcher import CallFunction, Ignored, KeywordArg

from ..lowering.sites import TensorSpec, known
from .common import FLOAT_TYPES, Family, Variant, aten, inserted, is_number, val

BMM = aten.bmm.default


@dataclasses.dataclass(frozen=True)
class AttentionOp:
    """How one aten attention op spells its arguments and outputs."""
    target: object
    mask: Optional[str]  # the argument holding a mask or bias, if the op takes one
    lse_trailing_one: bool = False  # cuDNN returns the logsumexp as [B, H, Lq, 1]
    lse_flag: Optional[str] = None  # the argument that asks the op to compute the logsumexp

    @property
    def schema(self):
        return self.target._schema

    @property
    def name(self) -> str:
        return self.schema.name.split("::")[-1]

    def arities(self) -> range:
        """Positional argument counts a node can have: required ones up to every positional."""
        args = [a for a in self.schema.arguments if not a.kwarg_only]
        required = sum(1 for a in args if not a.has_default_value())
        return range(required, len(args) + 1)

    def bind(self, node: torch.fx.Node) -> dict:
        """Every schema argument of `node`: given positionally, by keyword, or its default."""
        out = {a.name: a.default_value for a in self.schema.arguments if a.has_default_value()}
        out.update(zip([a.name for a in self.schema.arguments], node.args))
        out.update(node.kwargs)
        return out


OPS = (
    AttentionOp(aten._scaled_dot_product_flash_attention_for_cpu.default, "attn_mask"),
    AttentionOp(aten._scaled_dot_product_cudnn_attention.default, "attn_bias", lse_trailing_one=True,
                lse_flag="compute_log_sumexp"),
    AttentionOp(aten._scaled_dot_product_flash_attention.default, None),
    AttentionOp(aten._scaled_dot_product_efficient_attention.default, "attn_bias", lse_flag="compute_log_sumexp"),
)
BY_TARGET = {op.target: op for op in OPS}


def dense_order(t) -> Optional[tuple]:
    """The dim order (outermost first) in which `t` is row-major dense, or None. Decided
    with statically known facts only, so symbolic strides add no guards."""
    spec = TensorSpec.of(t)
    for perm in itertools.permutations(range(spec.ndim)):
        permuted = dataclasses.replace(spec, shape=tuple(spec.shape[i] for i in perm),
                                       stride=tuple(spec.stride[i] for i in perm))
        if permuted.is_contiguous():
            return perm
    return None


def in_layout(t: torch.Tensor, order: tuple) -> torch.Tensor:
    """t with the values of t, laid out densely in `order` (no copy if it already is)."""
    inverse = [order.index(i) for i in range(len(order))]
    return t.permute(order).contiguous().permute(inverse)


def _shape(t) -> tuple:
    return tuple(t.shape)


class AttentionPattern(Family):
    name = "attention"

    def variants(self):
        out = []
        for op in OPS:
            names = tuple(a.name for a in op.schema.arguments)
            for n in op.arities():
                pattern = CallFunction(op.target, KeywordArg("q"), KeywordArg("k"), KeywordArg("v"),
                                       *[Ignored() for _ in range(n - 3)])
                # the check reads every argument from the node itself, kwargs included
                out.append(Variant(f"{op.name}/{n}args", pattern, {"op": op, "reads_kwargs": names}))
        # last: a decomposed SDPA call's output matmul, only ever turned away with its reason
        out.append(Variant("math_fallback", CallFunction(BMM, Ignored(), Ignored()), {"explain": True}))
        return out

    def anchor_of(self, match):
        return next((n for n in match.nodes if n.target in BY_TARGET or n.target == BMM), None)

    def anchors(self, graph):
        found = [n for n in graph.nodes if n.op == "call_function" and n.target in BY_TARGET and not inserted(n)]
        return found + [n for n in graph.find_nodes(op="call_function", target=BMM) if math_fallback(n)]

    def check(self, match, variant):
        if variant.info.get("explain"):
            call = math_fallback(match.output_node())
            return call.reason() if call else "not the output matmul of a decomposed SDPA call"
        op: AttentionOp = variant.info["op"]
        node = self.anchor_of(match)
        args = op.bind(node)
        q, k, v = (val(args[x]) for x in ("query", "key", "value"))
        reason = (_flags_reason(op, args) or _operands_reason(q, k, v)
                  or _causal_reason(args.get("is_causal", False), q, k))
        if reason:
            return reason
        empty = next((t for t in (q, k, v) if TensorSpec.of(t).has_zero_dim()), None)
        if empty is not None:  # before the layout checks, which an empty tensor fails
            return f"zero-size operand {_shape(empty)}: left to Inductor"
        scale = args.get("scale")
        if isinstance(scale, torch.fx.Node) or not (scale is None or is_number(scale)):
            return f"the scale is computed in the graph ({scale}); the op takes a constant"
        used = sorted({u.args[1] for u in node.users if u.target == operator.getitem})
        if any(u.target != operator.getitem for u in node.users):
            return f"{op.name}'s output tuple is read whole"
        if any(i not in (0, 1) for i in used):
            return f"the graph reads {op.name} outputs {used}; the op returns only (out, lse)"
        outs = val(node)
        lse_used = 1 in used
        if lse_used:
            reason = _lse_reason(op, args, outs[1], q)
            if reason:
                return reason
        out_order = dense_order(outs[0])
        lse_order = dense_order(outs[1]) if lse_used else None
        if out_order is None or (lse_used and lse_order is None):
            return "an output of the node is not densely laid out"
        return {"q": args["query"], "k": args["key"], "v": args["value"],
                "scale": None if scale is None else float(scale), "is_causal": bool(args.get("is_causal", False)),
                "lse_used": lse_used, "source": op.name, "out_order": out_order, "lse_order": lse_order,
                "lse_trailing_one": op.lse_trailing_one}

    def replace(self, match, variant, site, ctx):
        op = ctx.impl(self.name)
        scale, causal = site["scale"], site["is_causal"]
        out_order, lse_order, trailing = site["out_order"], site["lse_order"], site["lse_trailing_one"]

        def fused(q, k, v):
            out, lse = op(q, k, v, scale, causal)
            out = in_layout(out, out_order)
            if lse_order is not None:
                lse = in_layout(lse.unsqueeze(-1) if trailing else lse, lse_order)
            return out, lse

        ctx.replace(match, fused, [site["q"], site["k"], site["v"]])


def _flags_reason(op: AttentionOp, args: dict) -> Optional[str]:
    mask = args.get(op.mask) if op.mask else None
    if mask is not None:
        what = f" {_shape(val(mask))}" if isinstance(val(mask), torch.Tensor) else ""
        return f"an attention mask ({op.mask}{what}): no exact flash kernel takes one"
    p = args.get("dropout_p", 0.0)
    if not (is_number(p) and p == 0):
        return f"dropout_p={p}: the op computes attention without dropout"
    if args.get("return_debug_mask", False):
        return "return_debug_mask=True"
    return None


def _operands_reason(q, k, v) -> Optional[str]:
    if not all(isinstance(t, torch.Tensor) for t in (q, k, v)):
        return "q, k or v is not a tensor"
    if not (q.ndim == k.ndim == v.ndim == 4):
        return f"q/k/v of ranks {q.ndim}/{k.ndim}/{v.ndim}: the op takes [B, H, L, D]"
    if len({q.dtype, k.dtype, v.dtype}) != 1 or q.dtype not in FLOAT_TYPES:
        return f"q/k/v dtypes {q.dtype}/{k.dtype}/{v.dtype}: the op takes one floating-point dtype"
    if not (known(q.shape[1] == k.shape[1]) and known(k.shape[1] == v.shape[1])):
        return (f"grouped-query attention: {q.shape[1]} query heads, {k.shape[1]}/{v.shape[1]} key/value heads "
                "(enable_gqa)")
    # the aten ops themselves refuse other batch / key-length / head-dim pairings, so where
    # symbols leave them open (dynamic shapes), every call that runs has them equal
    pairs = ((q.shape[0], k.shape[0]), (k.shape[0], v.shape[0]), (q.shape[3], k.shape[3]), (k.shape[2], v.shape[2]))
    if any(known(a != b) for a, b in pairs):
        return f"q/k/v shapes {_shape(q)}/{_shape(k)}/{_shape(v)} do not pair up"
    return None


def _causal_reason(is_causal, q, k) -> Optional[str]:
    if not isinstance(is_causal, bool):
        return f"is_causal={is_causal!r} is not a constant"
    if is_causal and not known(q.shape[2] == k.shape[2]):
        return (f"is_causal with {q.shape[2]} queries and {k.shape[2]} keys: SDPA aligns the mask top-left, "
                "flash kernels bottom-right")
    return None


def _lse_reason(op: AttentionOp, args: dict, lse, q) -> Optional[str]:
    if op.lse_flag and not args.get(op.lse_flag, False):
        return f"the graph reads a logsumexp {op.name} was not asked to compute ({op.lse_flag}=False)"
    want = (q.shape[0], q.shape[1], q.shape[2]) + ((1,) if op.lse_trailing_one else ())
    if not isinstance(lse, torch.Tensor) or len(lse.shape) != len(want) or not all(
            known(a == b) for a, b in zip(lse.shape, want)):
        return f"the graph reads {op.name}'s logsumexp of shape {_shape(lse)}; the op's is {want[:3]}"
    return None


SAFE_SOFTMAX = getattr(aten, "_safe_softmax", None)  # SDPA's math path (torch >= 2.5) only
# what lies between the math path's matmuls and its q / softmax / v: views, the scale, and
# the pads and slices of Inductor's pad_mm
_PLUMBING = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.expand.default,
             aten.clone.default, aten.constant_pad_nd.default, aten.slice.Tensor, aten.mul.Scalar}


def sdpa_call(node) -> Optional[str]:
    """The name of the `F.scaled_dot_product_attention` call `node` was traced from, if any
    (Dynamo's `source_fn_stack`, which AOTAutograd keeps on the nodes it decomposes)."""
    stack = node.meta.get("source_fn_stack") if isinstance(node, torch.fx.Node) else None
    if not stack:
        return None
    name, fn = stack[-1]
    return name if getattr(fn, "__name__", fn) == "scaled_dot_product_attention" else None


def _back(node):
    while isinstance(node, torch.fx.Node) and node.target in _PLUMBING:
        node = node.args[0]
    return node


def _from_math_softmax(probs, out: torch.fx.Node) -> bool:
    """probs is the softmax of SDPA's math path: `_safe_softmax` decomposed (AOTAutograd's
    `original_aten`, kept where an Inductor pattern re-traced the call), or a node traced
    from the same SDPA call as the output matmul."""
    if not isinstance(probs, torch.fx.Node):
        return False
    orig = probs.meta.get("original_aten")
    if SAFE_SOFTMAX is not None and getattr(orig, "overloadpacket", None) is SAFE_SOFTMAX:
        return True
    return sdpa_call(out) is not None and sdpa_call(probs) == sdpa_call(out) and probs.target in (
        aten.where.self, aten.div.Tensor, aten._softmax.default)


@dataclasses.dataclass
class MathFallback:
    """An SDPA call the graph holds decomposed: q and v as its matmuls read them (scale,
    views and pads peeled off)."""
    q: Optional[torch.fx.Node]
    v: Optional[torch.fx.Node]

    def reason(self) -> str:
        q, v = val(self.q), val(self.v)
        what = ""
        if isinstance(q, torch.Tensor) and isinstance(v, torch.Tensor):
            what = f" ({str(q.dtype).replace('torch.', '')} q, head dim {q.shape[-1]})"
        return (f"SDPA dispatched this call to its math fallback{what}: no fused SDPA kernel took it, so the "
                "graph holds its decomposition (matmul, softmax, matmul) and there is no attention op to route")


def math_fallback(node) -> Optional[MathFallback]:
    """The decomposed SDPA call whose output matmul `node` is (bmm(softmax(q k^T), v) as
    SDPA's math path spells it), or None."""
    if not isinstance(node, torch.fx.Node) or node.target != BMM or inserted(node):
        return None
    probs = _back(node.args[0])
    if not _from_math_softmax(probs, node):
        return None
    scores = _nearest_bmm(probs)
    return MathFallback(_back(scores.args[0]) if scores is not None else None, _back(node.args[1]))


def _nearest_bmm(node: torch.fx.Node, limit: int = 24) -> Optional[torch.fx.Node]:
    """The q k^T matmul the softmax reads (the nearest bmm upstream)."""
    seen, todo = set(), [node]
    while todo and len(seen) < limit:
        n = todo.pop(0)
        if n in seen:
            continue
        seen.add(n)
        if n.target == BMM:
            return n
        todo += n.all_input_nodes
    return None


FAMILY = AttentionPattern()
