"""Exact rewrites that give one spelling to what models write two ways, run before the
families so their tables need one variant, not two.

- `unsqueeze(s + k)` -> `unsqueeze(s) + k` for a literal k: AdaLN written
  `norm(x) * (1 + scale)[:, None, :]` (CogVideoX, AdaLayerNormContinuous) becomes the
  `norm(x) * (1 + scale[:, None])` form (Flux, Wan). Indexing commutes with adding a
  number, so the values are identical in every dtype.
- `unsqueeze(mean(x, [d]), d)` -> `mean(x, [d], keepdim=True)` (and sum): RMSNorm written
  with keepdim=False and the dim put back.
- `var_mean(clone(t)), sub(clone(t), mean)` -> the same on `t`: LayerNorm's decomposition
  copies a non-contiguous input to a contiguous one (a residual sum that inherits the
  patch embedding's transposed layout: Wan with per-token or per-frame modulation). A
  clone has its input's values, and the norm's statistics do not depend on layout, so
  the norm reads t itself and the residual + norm pattern sees one graph. Only clones of
  computed values (not graph inputs, which a graph may mutate at its end) whose every
  user is that LayerNorm are dropped.
- `add(mm(x, w.t()), b)` (either order) -> `addmm(b, x, w.t())`: Inductor's post-grad
  pass on CUDA splits a Linear's addmm into mm + bias add so the add fuses into the
  next pointwise kernel (the Linear + tanh-GELU site then has no addmm); this puts the
  model's own op back. Only where the mm has no other reader, the add no alpha, and the
  bias is one value per output column in the mm's dtype.
"""
from __future__ import annotations

import torch

from ..patterns.common import CONVERT, aten, is_number


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


_LAYOUTS = (None, torch.contiguous_format, torch.preserve_format)


def _layer_norm_reads(node: torch.fx.Node) -> bool:
    """node is read only by one LayerNorm: its var_mean and the centring `sub(node, mean)`."""
    users = list(node.users)
    vms = [u for u in users if u.target == aten.var_mean.correction and u.args[0] is node]
    return len(vms) == 1 and all(u is vms[0] or (u.target == aten.sub.Tensor and u.args[0] is node and not u.kwargs)
                                 for u in users)


def drop_norm_layout_clones(graph: torch.fx.Graph) -> int:
    """Rewrite a LayerNorm that reads `clone(t)` (var_mean and the centring sub, nothing
    else; or one dtype cast of the clone that only they read: the bf16 form) to read t."""
    done = 0
    for c in list(graph.find_nodes(op="call_function", target=aten.clone.default)):
        t = c.args[0]
        if not (isinstance(t, torch.fx.Node) and t.op == "call_function" and len(c.args) == 1
                and set(c.kwargs) <= {"memory_format"} and c.kwargs.get("memory_format") in _LAYOUTS):
            continue
        users = list(c.users)
        if not (_layer_norm_reads(c) or (len(users) == 1 and users[0].target == CONVERT
                                         and _layer_norm_reads(users[0]))):
            continue
        c.replace_all_uses_with(t)
        graph.erase_node(c)
        done += 1
    return done


_REDUCTIONS = (aten.mean.dim, aten.sum.dim_IntList)


def keepdim_reductions(graph: torch.fx.Graph) -> int:
    """Rewrite `unsqueeze(mean(x, [d]), d)` (keepdim False, the reduced dim put back) as
    `mean(x, [d], keepdim=True)` (same for sum): the same values in the same shape, the one
    spelling the norm patterns match (`x.pow(2).mean(-1).unsqueeze(-1)`)."""
    done = 0
    for u in list(graph.find_nodes(op="call_function", target=aten.unsqueeze.default)):
        r = u.args[0]
        if not (isinstance(r, torch.fx.Node) and r.target in _REDUCTIONS and len(r.users) == 1
                and len(r.args) in (2, 3) and (len(r.args) == 2 or r.args[2] is False)):
            continue
        x, dims = r.args[0], r.args[1]
        xv = x.meta.get("val") if isinstance(x, torch.fx.Node) else None
        if not (isinstance(xv, torch.Tensor) and isinstance(dims, (list, tuple)) and len(dims) == 1
                and isinstance(dims[0], int) and isinstance(u.args[1], int)):
            continue
        nd = xv.ndim
        d, ud = dims[0] % nd if nd else dims[0], u.args[1] % nd if nd else u.args[1]
        if d != ud:
            continue
        with graph.inserting_before(u):
            new = graph.call_function(r.target, (x, [d], True), dict(r.kwargs))
            new.meta.update(u.meta)
        u.replace_all_uses_with(new)
        graph.erase_node(u)
        graph.erase_node(r)
        done += 1
    return done


def _bias_of(add: torch.fx.Node):
    """(mm, bias) if `add` is `mm + bias` in either order as described above, else None."""
    if add.kwargs or len(add.args) != 2 or not all(isinstance(a, torch.fx.Node) for a in add.args):
        return None
    for mm, bias in (add.args, add.args[::-1]):
        if mm.target != aten.mm.default or len(mm.users) != 1:
            continue
        m, b = mm.meta.get("val"), bias.meta.get("val")
        w = mm.args[1]
        if not (isinstance(m, torch.Tensor) and isinstance(b, torch.Tensor) and m.ndim == 2 and b.ndim == 1
                and b.dtype == m.dtype and m.dtype.is_floating_point and b.shape[0] == m.shape[1]
                and isinstance(w, torch.fx.Node) and w.target == aten.permute.default and list(w.args[1]) == [1, 0]):
            continue
        return mm, bias
    return None


def _feeds_tanh_gelu(node: torch.fx.Node) -> bool:
    """node (through a view and a float cast) is read as `h * 0.5` and `h * h`: the start
    of the tanh-GELU polynomial. Elsewhere Inductor's mm + add split is left alone (it
    fuses the add into the consumer), and the family proves the rest of the site."""
    hs, frontier = [node], [node]
    for _ in range(2):
        frontier = [u for h in frontier for u in h.users
                    if u.target in (aten.reshape.default, aten.view.default, CONVERT)]
        hs += frontier
    for h in hs:
        users = list(h.users)
        if any(u.target == aten.mul.Tensor and u.args == (h, h) for u in users) and any(
                u.target == aten.mul.Tensor and u.args[0] is h and u.args[1] == 0.5 for u in users):
            return True
    return False


def fuse_bias_add(graph: torch.fx.Graph) -> int:
    """Rewrite `add(mm(x, permute(w)), b)` as `addmm(b, x, permute(w))` where it feeds a
    tanh-GELU (see the docstring)."""
    done = 0
    for add in list(graph.find_nodes(op="call_function", target=aten.add.Tensor)):
        found = _bias_of(add) if _feeds_tanh_gelu(add) else None
        if found is None:
            continue
        mm, bias = found
        with graph.inserting_before(add):
            addmm = graph.call_function(aten.addmm.default, (bias, *mm.args))
        addmm.meta.update(add.meta)
        add.replace_all_uses_with(addmm)
        graph.erase_node(add)
        graph.erase_node(mm)
        done += 1
    return done


def canonicalize(graph: torch.fx.Graph) -> None:
    fuse_bias_add(graph)
    hoist_unsqueeze(graph)
    keepdim_reductions(graph)
    drop_norm_layout_clones(graph)
