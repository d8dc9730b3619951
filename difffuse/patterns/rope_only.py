"""rope: a rotary embedding with no norm in front of it, as its own op call.

    r ─ rope(r, cos, sin) ─▶ out           (r is not a norm's output)
      ==>  difffuse::rope(r, cos, sin, interleaved, out_dtype, full_tables)

Found by the same recogniser as qk_norm_rope (patterns/rope.py), which takes every rope
fed by a norm; this family takes the others: per-axis ropes on parts of head_dim
(Allegro), a rope whose norm is in an earlier graph (official Wan: the q/k norm, then a
graph break, then the rope in a loop over the samples), a rope after a scale or an
activation. Whether it is worth a rewrite is the lowering's call (its `supports`): the
NPU has `npu_rotary_mul`; on CUDA a real-valued rope alone is one pointwise kernel that
Inductor already generates, so only the complex / fp64 spellings (which Inductor runs as
separate complex ops) are rewritten, into fp32 arithmetic Inductor can fuse.
"""
from __future__ import annotations

import torch

from .common import Family, Variant, val
from .qk_norm_rope import FAMILY as QK
from .rope import Found, find_ropes
from .rope_site import RopeMatch, RopePass
from .rope_site import anchors as rope_anchors


def graph_input_behind(node) -> bool:
    """node is (through views and casts) an input of this graph: what a graph break between
    the norm and the rope leaves (or a rope of the model's own input)."""
    while isinstance(node, torch.fx.Node) and node.op == "call_function" and node.target in _THROUGH:
        node = node.args[0]
    return isinstance(node, torch.fx.Node) and node.op == "placeholder"


_THROUGH = None  # set below from common's view ops


class RopePattern(Family):
    name = "rope"

    def variants(self) -> list[Variant]:
        return []  # one recogniser (patterns/rope.py)

    def build_pass(self, get_ctx):
        return RopePass(self, get_ctx)

    def takes(self, f: Found) -> bool:
        return not QK.norm_fed(f)

    def anchors(self, graph):
        return rope_anchors(self, graph)

    def explain(self, f: Found, reason: str) -> str:
        return f"a rope with no norm in front ({self.why(f)}): {reason}"

    def why(self, f: Found) -> str:
        """What stands in front of the rope, for its reasons."""
        r = f.root
        if r.target == CONVERT and QK._is_norm(r.args[0]):
            return (f"the norm's output is rounded to {r.args[1]} before the rope, a rounding the fused "
                    "norm + rope op would not make")
        if graph_input_behind(r):
            return ("its input enters this graph as an input: the norm, if there is one, ran in an earlier "
                    "graph (a graph break between the norm and the rope)")
        return f"its input is computed by {getattr(f.root.target, '__name__', f.root.target)}, not a norm"

    def site(self, f: Found):
        spec = f.spec
        cos, sin = spec.fake_tables()
        rv = val(f.root)
        if not _broadcasts(cos, tuple(rv.shape)):
            return f"cos/sin {tuple(cos.shape)} do not broadcast into the rope input {tuple(rv.shape)}"
        site = dict(x=f.root, cos=cos, sin=sin, interleaved=spec.interleaved, out_dtype=spec.out_dtype,
                    full_tables=spec.full_tables, slow_spelling=spec.slow_spelling, spec=spec,
                    table_nodes=spec.table_nodes())
        return RopeMatch(f.root.graph, f.out, list(f.nodes)), site

    def replace(self, match, variant, site, ctx):
        op, spec = ctx.impl(self.name), site["spec"]
        n = len(site["table_nodes"])
        shape = tuple(val(match.output_node()).shape)
        reshape = not _same_shape(shape, tuple(val(site["x"]).shape))

        def fused(x, *tables):
            cos, sin = spec.build(tables[:n])
            out = op(x, cos, sin, spec.interleaved, spec.out_dtype, spec.full_tables)
            return out.reshape(shape) if reshape else out

        ctx.replace(match, fused, [site["x"]] + site["table_nodes"])


def _same_shape(a, b) -> bool:
    from torch.fx.experimental.symbolic_shapes import statically_known_true

    return len(a) == len(b) and all(statically_known_true(x == y) for x, y in zip(a, b))


def _broadcasts(t, shape) -> bool:
    from torch.fx.experimental.symbolic_shapes import statically_known_true

    if t.ndim > len(shape):
        return False
    return all(statically_known_true(a == 1) or statically_known_true(a == b)
               for a, b in zip(reversed(t.shape), reversed(shape)))


from .common import CONVERT, VIEW_OPS  # noqa: E402

_THROUGH = (*VIEW_OPS, CONVERT, torch.ops.aten.clone.default, torch.ops.aten.slice.Tensor, torch.ops.aten.select.int)

FAMILY = RopePattern()
