"""Exact rewrites that give one spelling to what models write two ways, run before the
families so their tables need one variant, not two.

- `unsqueeze(s + k)` -> `unsqueeze(s) + k` for a literal k: AdaLN written
  `norm(x) * (1 + scale)[:, None, :]` (CogVideoX, AdaLayerNormContinuous) becomes the
  `norm(x) * (1 + scale[:, None])` form (Flux, Wan). Indexing commutes with adding a
  number, so the values are identical in every dtype.
"""
from __future__ import annotations

import torch

from ..patterns.common import aten, is_number


def hoist_unsqueeze(graph: torch.fx.Graph) -> int:
    """Rewrite `unsqueeze(add(s, k))` (add used only there) as `add(unsqueeze(s), k)`."""
    done = 0
    for u in list(graph.find_nodes(op="call_function", target=aten.unsqueeze.default)):
        a = u.args[0]
        if not (isinstance(a, torch.fx.Node) and a.target == aten.add.Tensor and len(a.users) == 1
                and len(a.args) == 2 and not a.kwargs and isinstance(a.args[0], torch.fx.Node)
                and is_number(a.args[1])):
            continue
        with graph.inserting_before(u):
            us = graph.call_function(aten.unsqueeze.default, (a.args[0], *u.args[1:]), dict(u.kwargs))
            us.meta.update(u.meta)
            us.meta["val"] = a.args[0].meta["val"].unsqueeze(*u.args[1:]) if "val" in a.args[0].meta else None
            add = graph.call_function(aten.add.Tensor, (us, a.args[1]))
            add.meta.update(a.meta)
            add.meta["val"] = u.meta.get("val")
        u.replace_all_uses_with(add)
        graph.erase_node(u)
        graph.erase_node(a)
        done += 1
    return done


def canonicalize(graph: torch.fx.Graph) -> None:
    hoist_unsqueeze(graph)
