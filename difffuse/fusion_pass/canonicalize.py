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
- `convert(clone(t), dt)` -> `clone(convert(t, dt))` where the clone has no other reader: a
  layout copy (a reshape of a strided norm output) between a norm and its output cast; a
  copy and a cast commute, and the clone keeps its memory format.
- `add(mm(x, w.t()), b)` (either order) -> `addmm(b, x, w.t())`: Inductor's post-grad
  pass on CUDA splits a Linear's addmm into mm + bias add so the add fuses into the
  next pointwise kernel (the Linear + tanh-GELU site then has no addmm); this puts the
  model's own op back. Only where the mm has no other reader, the add no alpha, and the
  bias is one value per output column in the mm's dtype.
- `addcmul(a, b, c, value=v)` -> `a + b*c` (`a + (b*v)*c` for v != 1): ComfyUI's
  `torch.addcmul(shift, norm(x), 1 + scale)` and `torch.addcmul(x, y, gate)` become the
  modulation and gated residual every family spells. aten computes addcmul as
  `self + value * tensor1 * tensor2`, these operations in this order, in the op's compute
  dtype: in fp32/fp64 the rewrite is the same arithmetic. In bf16/fp16 addcmul rounds once
  (fp32 opmath); so does `a + b*c` where Inductor or a difffuse op computes it (both compute
  low-precision pointwise math in fp32 and round at the store), while a graph run op by op
  (`inductor=False`) rounds b*c too: the fp32-math rule every fused op is held to. Only
  where the result dtype of the two-step form is addcmul's (checked).
- `mul(x, rsqrt(mean(convert(x, dt)²) + eps))` with x of a narrower float dtype than the
  product (dt) -> `mul(convert(x, dt), rsqrt(...))`: diffusers' RMSNorm squares `x.float()`
  but multiplies the bf16 x by the fp32 rsqrt. A mixed-dtype multiply converts each operand to
  the common dtype before multiplying (exact widening); the convert node only writes that
  conversion down, so the norm reads one upcast x like every other spelling.
- The norm's duplicate casts merged: in `a * rsqrt(mean(s²) + eps)` with a and s two
  `convert(x, dtype)` of the same x and dtype (two `.float()` calls, or the one above and
  the model's), both reads use one node. Same op, same input: same value.
- Commutative operand order of `add.Tensor` / `mul.Tensor` (two tensor operands, no alpha):
  a + b == b + a and a * b == b * a exactly in IEEE arithmetic, with the same type
  promotion and broadcast, so each family spells one order. The rule ranks the operands
  and puts the higher rank second, keeping the written order on a tie:
    mul:  a normalised value (`x * rsqrt(.)`, possibly cast) 0 < anything else 1 <
          a modulation factor `t + k` (k a number or a 0-d tensor) 2 < an rsqrt 3 <
          a 0-d tensor 4 (a lifted Python float: second, where a number would be)
          -> `x * rsqrt(.)`, `norm * w`, `norm * (1 + scale)`, `x * (1 + scale)`
    add:  anything else 0 < a product 1 < a product with a `t + k` factor 2 < a 0-d tensor 3
          -> `shift + x * (1 + scale)`, `res + x * gate`, `bias + norm * w`, `ms + eps`
  (`(1 + scale) * LN(x) + shift` of FLUX.2 and `x*s + shift` / `shift + x*s` are one graph.)
  A number goes second: Python's `1 + s` and `s + 1` reach post-grad as `add(s, 1)`, but
  `torch.add(1, s)` as `add(1, s)` (and `torch.mul(2, x)` likewise).

`Completions` (`patterns/canonical_forms.py`) are not made here: the modulation families make them around their
own matching (scale-only / shift-only modulations, a norm read by two modulations, the
optional casts: completed with exact identities, taken out again after the family ran).
"""
from __future__ import annotations

import torch

from ..patterns.canonical_forms import _new, _tensor, is_k_plus, is_normalised, is_scalar_tensor, squared_input
from ..patterns.common import CONVERT, FLOAT_TYPES, aten, is_number, narrows


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


def expand_addcmul(graph: torch.fx.Graph) -> int:
    """Rewrite `addcmul(a, b, c, value=v)` as `add(a, mul(b, c))` (`mul(mul(b, v), c)` for v != 1)."""
    done = 0
    for n in list(graph.find_nodes(op="call_function", target=aten.addcmul.default)):
        if len(n.args) != 3 or set(n.kwargs) - {"value"}:
            continue
        a, b, c = n.args
        value = n.kwargs.get("value", 1)
        tensors = [_tensor(t) for t in (a, b, c, n)]
        if not is_number(value) or any(t is None or t.dtype not in FLOAT_TYPES for t in tensors):
            continue
        av, bv, cv, out = tensors
        try:
            fv = bv * value if value != 1 else bv
            pv = fv * cv
            sv = av + pv
        except Exception:  # noqa: BLE001  (a fake computation that fails: leave the node)
            continue
        if sv.dtype != out.dtype:
            continue  # a promotion the two-step form would not reproduce
        with graph.inserting_before(n):
            f = _new(graph, aten.mul.Tensor, (b, value), fv, n) if value != 1 else b
            prod = _new(graph, aten.mul.Tensor, (f, c), pv, n)
            total = _new(graph, aten.add.Tensor, (a, prod), out, n)
        n.replace_all_uses_with(total)
        graph.erase_node(n)
        done += 1
    return done


# ------------------------------------------------------------------ the norm's multiply
def upcast_norm_operand(graph: torch.fx.Graph) -> int:
    """Write down the conversion a mixed-dtype `x * rsqrt(.)` makes of its narrower x."""
    done = 0
    for m in list(graph.find_nodes(op="call_function", target=aten.mul.Tensor)):
        if len(m.args) != 2 or m.kwargs or not all(isinstance(a, torch.fx.Node) for a in m.args):
            continue
        rs = [i for i, a in enumerate(m.args) if a.target == aten.rsqrt.default]
        if len(rs) != 1:
            continue
        x = m.args[1 - rs[0]]
        xv, rv, mv = _tensor(x), _tensor(m.args[rs[0]]), _tensor(m)
        if (xv is None or rv is None or mv is None or xv.ndim == 0 or xv.dtype == mv.dtype
                or rv.dtype != mv.dtype or xv.dtype not in FLOAT_TYPES or mv.dtype not in FLOAT_TYPES
                or narrows(xv.dtype, mv.dtype)):
            continue
        sq = squared_input(m.args[rs[0]])
        if not (isinstance(sq, torch.fx.Node) and sq.target == CONVERT and sq.args == (x, mv.dtype)):
            continue  # only where the squared side reads that very upcast (diffusers' RMSNorm)
        with graph.inserting_before(m):  # merge_norm_casts then keeps the model's own `x.float()`
            up = _new(graph, CONVERT, (x, mv.dtype), xv.to(mv.dtype), m)
        m.replace_input_with(x, up)
        done += 1
    return done



def merge_norm_casts(graph: torch.fx.Graph) -> int:
    """In `a * rsqrt(mean(s²) + eps)`, where a and s are two `convert(x, dtype)` nodes of the
    same x and dtype (two `.float()` calls, or the model's and upcast_norm_operand's), both
    reads use the first of them. Only the norm's own two reads are merged: a third
    `x.float()` elsewhere keeps its node (another family's pattern may count its readers)."""
    done = 0
    order = {n: i for i, n in enumerate(graph.nodes)}
    for m in list(graph.find_nodes(op="call_function", target=aten.mul.Tensor)):
        if len(m.args) != 2 or not all(isinstance(a, torch.fx.Node) for a in m.args):
            continue
        a, r = m.args
        if r.target != aten.rsqrt.default:
            continue
        sq = squared_input(r)
        if not (isinstance(sq, torch.fx.Node) and sq is not a and a.target == CONVERT and sq.target == CONVERT
                and a.args == sq.args and not a.kwargs and not sq.kwargs):
            continue
        first, later = (a, sq) if order[a] < order[sq] else (sq, a)
        later.replace_all_uses_with(first)
        graph.erase_node(later)
        done += 1
    return done


# ------------------------------------------------------------------ operand order
def _mul_rank(node) -> int:
    if is_scalar_tensor(node):
        return 4
    if node.target == aten.rsqrt.default:
        return 3
    if is_k_plus(node, strict=False):  # an `alpha=` one too: the family's check then says why not
        return 2
    return 0 if is_normalised(node) else 1


def _add_rank(node) -> int:
    if is_scalar_tensor(node):
        return 3
    if node.target != aten.mul.Tensor:
        return 0
    return 2 if any(is_k_plus(a, strict=False) for a in node.args) else 1


def order_operands(graph: torch.fx.Graph) -> int:
    """Put the higher-ranked operand of each add / mul second (see the module docstring)."""
    done = 0
    for target, rank in ((aten.mul.Tensor, _mul_rank), (aten.add.Tensor, _add_rank)):
        for n in graph.find_nodes(op="call_function", target=target):
            if len(n.args) != 2 or n.kwargs:
                continue
            a, b = n.args
            if is_number(a) and isinstance(b, torch.fx.Node):
                n.args = (b, a)  # `torch.add(1, s)`: the number second, where `1 + s` puts it
                done += 1
                continue
            if not (isinstance(a, torch.fx.Node) and isinstance(b, torch.fx.Node)):
                continue
            if rank(a) > rank(b):
                n.args = (b, a)
                done += 1
    return done


def casts_before_clones(graph: torch.fx.Graph) -> int:
    """Rewrite `convert(clone(t), dt)` (the clone read only by the cast) as
    `clone(convert(t, dt))`: a layout copy a reshape put between a norm and its output cast
    (a bf16 RMSNorm of a transposed q/k, then unflattened) no longer hides the norm's cast.
    A copy and a cast commute (same values); the clone keeps its memory format, so the
    result has the same layout."""
    done = 0
    for n in list(graph.find_nodes(op="call_function", target=CONVERT)):
        c = n.args[0]
        if not (isinstance(c, torch.fx.Node) and c.target == aten.clone.default and len(c.users) == 1
                and isinstance(c.args[0], torch.fx.Node) and _tensor(c.args[0]) is not None
                and _tensor(n) is not None and not n.kwargs):
            continue
        t = c.args[0]
        with graph.inserting_before(n):
            cast = _new(graph, CONVERT, (t, n.args[1]), _tensor(t).to(n.args[1]), n)
            copy = _new(graph, aten.clone.default, (cast,), _tensor(n), c, kwargs=dict(c.kwargs))
        n.replace_all_uses_with(copy)
        graph.erase_node(n)
        graph.erase_node(c)
        done += 1
    return done


def canonicalize(graph: torch.fx.Graph) -> None:
    casts_before_clones(graph)
    fuse_bias_add(graph)
    hoist_unsqueeze(graph)
    keepdim_reductions(graph)
    drop_norm_layout_clones(graph)
    expand_addcmul(graph)
    order_operands(graph)
    upcast_norm_operand(graph)
    merge_norm_casts(graph)

