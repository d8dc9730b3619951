"""Channel tracking: what each output channel of a subgraph reads from one root tensor.

A rotary embedding is "out[j] = r[j] * A_j + r[p(j)] * B_j" for a pairing p of the
channels of r's last dim and table entries A_j, B_j. Code spells it in countless ways
(slices, strided views, chunk/split, unbind/stack/cat, `empty_like` + strided writes,
2x2 rotation-matrix tables, complex multiplies); all of them only move channels around
and multiply them by tables. So instead of one pattern per spelling, the recogniser
evaluates the subgraph that follows a root `r` symbolically, per channel: every tracked
value is a `Lin`, a linear form over r's channels for each element of its trailing
(channel) dims, and every op the subgraph applies is applied to that form. The leading
dims (batch, tokens, heads) must stay exactly r's: ops on them (a token slice, a
transpose) end the tracking.

A `Lin` holds, for K term slots and each element e of its trailing shape T:
  src[k, e]   the channel of r the term reads (-1: no term, -2: uninitialised memory)
  coef[k, e]  a constant factor
  tab[k, e]   the table factor (an index into `Tracker.tables`, -1: none)
  idx[k, e]   the entry of that table (a flat index into its channel block)
A complex value carries a last hidden axis of size 2 (real, imaginary part) in every array.

Tables are the operands that do not depend on r. Each is followed back through ops
that only index its trailing dims (slices, selects, views, unbind, view_as_real, exact
upcasts) to a base node, so an entry is an address in the base's channel block and the
replacement can read the base itself (or a gather of it) instead of the spelling's views.

Casts: an exact upcast is free. A narrowing cast must be the last arithmetic step
(`Lin.rounded`): arithmetic after it would round a partial result, which a fused op
computing in fp32 does not reproduce. fp64 arithmetic is recorded (`Lin.fp64`) for the
rule in `rope.py`.
"""
from __future__ import annotations

import dataclasses
import operator
from typing import Optional

import torch
from torch.fx.experimental.symbolic_shapes import guard_int, is_concrete_int, statically_known_true

from .common import CONVERT, FLOAT_TYPES, aten, is_number, narrows, val

prims = torch.ops.prims


MAX_WALK = 256  # nodes looked at to prove a table independent of the rope input (tables come before it)
MAX_TERMS = 8  # a rope element has two terms (four in a complex product before it folds)


class Untrackable(Exception):
    """The subgraph stops being a channel-wise linear function of r here (the reason)."""


@dataclasses.dataclass
class Lin:
    src: torch.Tensor
    coef: torch.Tensor
    tab: torch.Tensor
    idx: torch.Tensor
    dtype: torch.dtype
    complex: bool = False
    rounded: bool = False  # a narrowing cast happened: no arithmetic may follow
    fp64: bool = False  # some arithmetic ran in fp64 (or complex128)
    used_complex: bool = False  # the value went through complex arithmetic

    @property
    def shape(self) -> tuple:
        """The trailing (channel) shape, without the slot axis and the complex axis."""
        s = tuple(self.src.shape[1:])
        return s[:-1] if self.complex else s

    def map(self, fn, **changes) -> "Lin":
        """Apply an indexing function to every array (its dims: slot, trailing dims, [complex])."""
        return dataclasses.replace(self, src=fn(self.src), coef=fn(self.coef), tab=fn(self.tab), idx=fn(self.idx),
                                   **changes)

    def pad(self, k: int) -> "Lin":
        """The same value with k term slots (extra slots empty)."""
        extra = k - self.src.shape[0]
        if extra <= 0:
            return self

        def grow(t, fill):
            return torch.cat([t, t.new_full((extra, *t.shape[1:]), fill)])
        return dataclasses.replace(self, src=grow(self.src, -1), coef=grow(self.coef, 0.0), tab=grow(self.tab, -1),
                                   idx=grow(self.idx, 0))

    def broadcast(self, trailing: tuple) -> "Lin":
        shape = (self.src.shape[0], *trailing, *((2,) if self.complex else ()))
        return self.map(lambda t: t.expand(shape).clone() if tuple(t.shape) != shape else t)


def root_lin(d: int, dtype: torch.dtype) -> Lin:
    return Lin(torch.arange(d).unsqueeze(0), torch.ones(1, d, dtype=torch.float64),
               torch.full((1, d), -1), torch.zeros(1, d, dtype=torch.long), dtype)


def fill_lin(shape: tuple, src: int, dtype) -> Lin:
    """A value with no terms: zeros (src -1) or uninitialised memory (src -2)."""
    return Lin(torch.full((1, *shape), src), torch.zeros(1, *shape, dtype=torch.float64),
               torch.full((1, *shape), -1), torch.zeros(1, *shape, dtype=torch.long), dtype)


def _eq(a, b) -> bool:
    return statically_known_true(a == b)


def _ints(shape) -> Optional[tuple]:
    """The shape as Python ints, or None if a size is symbolic (never `int()` of a symbol:
    that would add a guard and specialise the compiled graph to this size)."""
    if not all(isinstance(s, int) or is_concrete_int(s) for s in shape):
        return None
    return tuple(int(s) for s in shape)


_VIEWS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.unsqueeze.default,
          aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default, aten.alias.default}
_COPIES = {aten.clone.default, aten.contiguous.default, aten.lift_fresh_copy.default}
EMPTY = {aten.empty.memory_format, aten.empty_like.default, aten.new_empty.default, aten.empty_strided.default}
ZEROS = {aten.zeros.default, aten.zeros_like.default, aten.new_zeros.default}
PAIR_SPLITS = {aten.slice.Tensor, aten.select.int, aten.unbind.int, aten.split.Tensor,
               aten.split_with_sizes.default, aten.view_as_complex.default}
COMBINES = {aten.add.Tensor, aten.sub.Tensor, aten.addcmul.default, aten.cat.default, aten.stack.default,
            aten.slice_scatter.default, aten.select_scatter.default, aten.sum.dim_IntList}
TRACKED = (_VIEWS | _COPIES | PAIR_SPLITS | COMBINES | {
    aten.mul.Tensor, aten.neg.default, aten.permute.default, aten.expand.default, aten.view_as_real.default,
    CONVERT, aten.copy.default, aten._to_copy.default, operator.getitem})


@dataclasses.dataclass(frozen=True)
class Table:
    """A table operand's base: `node`'s last `nchan` dims are its channel block (flattened
    in `view_as_real` terms when the base is complex); `pos` is the position shape the
    table had where the rope multiplied by it (what the op's cos/sin broadcast like)."""
    node: torch.fx.Node
    nchan: int
    pos: tuple
    complex: bool


class Tracker:
    """Evaluates the subgraph after `root` channel by channel (see the module docstring)."""

    def __init__(self, root: torch.fx.Node, order: dict):
        self.root = root
        self._order = order
        rv = val(root)
        self.lead = tuple(rv.shape[:-1])
        self.nl = rv.ndim - 1
        self.values: dict = {root: root_lin(int(rv.shape[-1]), rv.dtype)}
        self.tables: list[Table] = []
        self._depends: dict = {}  # node -> computed from the root (memo)

    # ------------------------------------------------------------------ helpers
    def _trailing(self, node) -> tuple:
        """node's trailing shape; its leading dims must be exactly r's."""
        v = val(node)
        if not isinstance(v, torch.Tensor) or v.ndim < self.nl or not all(
                _eq(a, b) for a, b in zip(v.shape[:self.nl], self.lead)):
            raise Untrackable(f"{node.name} changes the batch/token/head dims of the rope input")
        t = _ints(v.shape[self.nl:])
        if t is None:
            raise Untrackable(f"{node.name} has a symbolic channel size")
        return t

    def _dim(self, d: int, ndim: int) -> int:
        """A trailing dim of a rank-`ndim` value, as an index into the Lin arrays (after the slot axis)."""
        d = d + ndim if d < 0 else d
        if d < self.nl:
            raise Untrackable("an op over a batch/token/head dim, not the channel dims")
        return 1 + d - self.nl

    def depends_on_root(self, node) -> bool:
        """node's value is computed from the root (walk back to nodes before the root)."""
        if not isinstance(node, torch.fx.Node):
            return False
        known = self._depends
        if node in known:
            return known[node]
        start = self._order[self.root]
        stack, seen, hit = [node], set(), False
        while stack:
            n = stack.pop()
            if n is self.root or known.get(n) or len(seen) > MAX_WALK:
                hit = True  # (past MAX_WALK: not proven independent, so not taken for a table)
                break
            if n in seen or n in known or self._order.get(n, -1) < start:
                continue
            seen.add(n)
            stack.extend(n.all_input_nodes)
        if not hit:
            known.update(dict.fromkeys(seen, False))
        known[node] = hit
        return hit

    # ------------------------------------------------------------------ tables
    def table(self, node, nchan: int, cplx: bool) -> tuple[int, torch.Tensor]:
        """(table id, entry addresses shaped like node's last nchan dims [+ (2,) if complex])."""
        chain, n = [], node
        while True:
            if not isinstance(n, torch.fx.Node):
                break
            t, a0 = n.target, (n.args[0] if n.args else None)
            if t in _VIEWS | _COPIES | {aten.slice.Tensor, aten.select.int, aten.expand.default,
                                         aten.view_as_real.default, aten.permute.default} or (
                    t == CONVERT and _upcast(a0, n.args[1])) or (
                    t == operator.getitem and isinstance(a0, torch.fx.Node)
                    and a0.target in (aten.unbind.int, aten.split.Tensor, aten.split_with_sizes.default)):
                chain.append(n)
                n = _input(n)
                continue
            break
        # the base's channel block: as many dims as the chain leaves for the table's own
        # channel dims; try the chain, shortening it (the base moves up) until it only
        # indexes channel dims
        for cut in range(len(chain), -1, -1):
            base = _input(chain[cut - 1]) if cut else node
            try:
                got = self._replay(base, list(reversed(chain[:cut])), node, nchan, cplx)
            except (RuntimeError, TypeError, IndexError, ValueError):  # this cut's replay does not apply
                got = None
            if got is not None:
                return got
        raise Untrackable(f"table {node.name} cannot be read")

    def _replay(self, base, ops, node, nchan, cplx) -> Optional[tuple]:
        bv, nv = val(base), val(node)
        if not isinstance(bv, torch.Tensor):
            return None
        bcplx = bv.is_complex()
        npos = nv.ndim - nchan
        pos = tuple(nv.shape[:npos])
        # try each split of the base into position and channel dims
        for bpos in range(bv.ndim, -1, -1):
            block = _ints(bv.shape[bpos:])
            if block is None and bpos == bv.ndim - 1:
                # a table width Dynamo made symbolic (dynamic=True): it is the head dim's,
                # fixed by the weights, so specialising it costs no recompile (position dims
                # are never specialised)
                block = (guard_int(bv.shape[-1]),)
            if block is None:
                break
            size = 1
            for s in block:
                size *= s
            arr = torch.arange(size * (2 if bcplx else 1)).reshape(tuple(block) + ((2,) if bcplx else ()))
            try:
                arr, is_c = self._index_table(arr, bcplx, bpos, ops)
            except Untrackable:
                continue
            want = _ints(nv.shape[npos:])
            got = tuple(arr.shape[:arr.ndim - (1 if is_c else 0)])
            if is_c != cplx or want is None or _non1(got) != _non1(want):
                continue
            arr = arr.reshape(tuple(want) + ((2,) if is_c else ()))  # (they differ by size-1 dims only)
            a, b = _non1(bv.shape[:bpos]), _non1(pos)
            if len(a) != len(b) or not all(_eq(x, y) for x, y in zip(a, b)):
                continue  # the position dims must be the base's, up to size-1 dims
            key = Table(base, bv.ndim - bpos, pos, bcplx)
            if key not in self.tables:
                self.tables.append(key)
            return self.tables.index(key), arr
        return None

    def _index_table(self, arr, is_c: bool, npos: int, ops) -> tuple:
        """Apply `ops` (channel-only indexing) to a table's address array."""
        for n in ops:
            v = val(n)
            nd = v.ndim

            def tdim(d, ndim=None):
                ndim = val(n.args[0]).ndim if ndim is None else ndim
                d = d + ndim if d < 0 else d
                if d < npos:
                    raise Untrackable("position dim")
                return d - npos
            t = n.target
            if t == aten.view_as_real.default:
                is_c = False
            elif t in _VIEWS:
                # a reshape of the channel block, or size-1 dims put into / taken out of the
                # position dims (`cos[None, :, None]`): the position dims keep their sizes
                npos = _view_split(val(n.args[0]).shape[:npos], v.shape, arr.numel() // (2 if is_c else 1))
                if npos is None:
                    raise Untrackable("view over position dims")
                arr = arr.reshape(tuple(_ints(v.shape[npos:])) + ((2,) if is_c else ()))
            elif t == aten.slice.Tensor:
                arr = _slice(arr, tdim(n.args[1] if len(n.args) > 1 else 0), *n.args[2:])
            elif t == aten.select.int:
                arr = arr.select(tdim(n.args[1]), n.args[2])
            elif t == operator.getitem:
                src = n.args[0]
                parts = _split(arr, src, tdim(split_dim(src), val(src.args[0]).ndim))
                arr = parts[n.args[1]]
            elif t == aten.expand.default:
                sh = _ints(v.shape[npos:])
                if sh is None:
                    raise Untrackable("expand")
                arr = arr.expand(tuple(sh) + ((2,) if is_c else ()))
            elif t == aten.permute.default:
                perm = list(n.args[1])
                if perm[:npos] != list(range(npos)):
                    raise Untrackable("permute over position dims")
                arr = arr.permute(*[p - npos for p in perm[npos:]], *((arr.ndim - 1,) if is_c else ()))
            # exact upcasts and copies leave the addresses as they are
        return arr, is_c

    # ------------------------------------------------------------------ evaluation
    def lin(self, node) -> Lin:
        got = self.values.get(node)
        if got is None:
            raise Untrackable(f"{getattr(node, 'name', node)} is not computed from the rope input")
        return got

    def tracked(self, a) -> bool:
        return isinstance(a, torch.fx.Node) and a in self.values

    def step(self, node: torch.fx.Node):
        """Evaluate one node whose tracked inputs are evaluated; raises Untrackable."""
        t, args = node.target, node.args
        v = val(node)
        if t == operator.getitem:
            parts = self.lin_list(args[0])
            self.values[node] = parts[args[1]]
            return
        if t in (aten.unbind.int, aten.split.Tensor, aten.split_with_sizes.default):
            x = self.lin(args[0])
            d = self._dim(split_dim(node), val(args[0]).ndim)
            arrs = {k: _split(getattr(x, k), node, d) for k in ("src", "coef", "tab", "idx")}
            self.values[node] = [dataclasses.replace(x, **{k: arrs[k][i] for k in arrs}) for i in range(len(arrs["src"]))]
            return
        if isinstance(v, torch.Tensor) and not (v.is_floating_point() or v.is_complex()):
            raise Untrackable(f"{node.name} is not a floating-point value")
        lin = self._value(node, t, args, v)
        if lin.src.shape[0] > MAX_TERMS:
            raise Untrackable(f"{node.name} sums more terms than a rotation of pairs")
        self.values[node] = lin

    def lin_list(self, node):
        got = self.values.get(node)
        if not isinstance(got, list):
            raise Untrackable(f"{node.name} is not a split of the rope input")
        return got

    def _value(self, node, t, args, v) -> Lin:  # noqa: C901  (one branch per op)
        kw = node.kwargs
        if t in _VIEWS or t in _COPIES:
            if t in _COPIES and set(kw) - {"memory_format"}:
                raise Untrackable(f"{node.name} has {sorted(kw)}")
            x = self.lin(args[0])
            shape = self._trailing(node)
            return x.map(lambda a: a.reshape((a.shape[0], *shape) + ((2,) if x.complex else ())))
        if t == aten.permute.default:
            x, perm = self.lin(args[0]), list(args[1])
            if perm[:self.nl] != list(range(self.nl)):
                raise Untrackable("a permute of the batch/token/head dims")
            order = [0] + [p - self.nl + 1 for p in perm[self.nl:]] + ([len(perm) - self.nl + 1] if x.complex else [])
            return x.map(lambda a: a.permute(*order))
        if t == aten.expand.default:
            return self.lin(args[0]).broadcast(self._trailing(node))
        if t == aten.slice.Tensor:
            x = self.lin(args[0])
            if _identity_slice(node):  # `x[:n]` over all n rows (LightX2V's `[:seq_len]`)
                return x
            d = self._dim(args[1] if len(args) > 1 else 0, val(args[0]).ndim)
            return x.map(lambda a: _slice(a, d, *args[2:]))
        if t == aten.select.int:
            x = self.lin(args[0])
            d = self._dim(args[1], val(args[0]).ndim)
            return x.map(lambda a: a.select(d, args[2]))
        if t in (CONVERT, aten._to_copy.default):
            if t == aten._to_copy.default and set(kw) - {"dtype"}:
                raise Untrackable(f"{node.name} moves the value ({sorted(kw)})")
            return self._cast(self.lin(args[0]), v.dtype)
        if t == aten.copy.default:  # dst's values replaced by src's (in dst's dtype and shape)
            if self.tracked(args[0]) and not self.tracked(args[1]):
                raise Untrackable("a copy over the rope's value")
            src = self._cast(self.lin(args[1]), v.dtype)
            return src.broadcast(self._trailing(node))
        if t == aten.view_as_complex.default:
            x = self.lin(args[0])
            if x.complex or x.shape[-1:] != (2,):
                raise Untrackable("view_as_complex of something that is not channel pairs")
            return dataclasses.replace(x, complex=True, fp64=x.fp64 or x.dtype == torch.float64, dtype=v.dtype,
                                       used_complex=True)
        if t == aten.view_as_real.default:
            x = self.lin(args[0])
            return dataclasses.replace(x, complex=False, dtype=v.dtype)
        if t == aten.neg.default:  # exact: no rounding to check
            x = self.lin(args[0])
            return dataclasses.replace(x, coef=-x.coef, dtype=v.dtype)
        if t in (aten.add.Tensor, aten.sub.Tensor):
            alpha = kw.get("alpha", 1)
            if set(kw) - {"alpha"} or not is_number(alpha):
                raise Untrackable(f"{node.name} has {sorted(kw)}")
            return self._sum(node, args[0], args[1], -alpha if t == aten.sub.Tensor else alpha, v)
        if t == aten.addcmul.default:  # a + value * b * c
            value = kw.get("value", 1)
            if set(kw) - {"value"} or not is_number(value):
                raise Untrackable(f"{node.name} has {sorted(kw)}")
            prod = self._product(node, args[1], args[2], v)
            return self._sum(node, args[0], prod, value, v)
        if t == aten.mul.Tensor:
            return self._product(node, args[0], args[1], v)
        if t in (aten.cat.default, aten.stack.default):
            return self._cat(node, t, args, v)
        if t == aten.sum.dim_IntList:
            return self._reduce_sum(node, args, kw, v)
        if t in (aten.slice_scatter.default, aten.select_scatter.default):
            return self._scatter(node, t, args, v)
        raise Untrackable(f"{node.name} ({_name(t)}) is not a channel move or a product with a table")

    def _cast(self, x: Lin, dtype) -> Lin:
        if x.complex or dtype.is_complex:
            if x.complex and dtype == x.dtype:
                return x
            raise Untrackable("a complex cast")
        if dtype not in FLOAT_TYPES:
            raise Untrackable(f"a cast to {dtype}")
        return dataclasses.replace(x, dtype=dtype, rounded=x.rounded or narrows(x.dtype, dtype))

    def _arith(self, x: Lin, v) -> Lin:
        """Arithmetic on x producing v's dtype: no rounding before it, fp64 noted."""
        if x.rounded:
            raise Untrackable("a narrowing cast rounds a partial result of the rope before more arithmetic")
        wide = v.dtype in (torch.float64, torch.complex128)
        return dataclasses.replace(x, dtype=v.dtype, fp64=x.fp64 or wide) if wide or x.dtype != v.dtype else x

    def _sum(self, node, a, b, alpha, v) -> Lin:
        """a + alpha * b, both tracked (b may be a Lin already)."""
        lb = b if isinstance(b, Lin) else (self.lin(b) if self.tracked(b) else None)
        if not self.tracked(a) or lb is None:
            raise Untrackable(f"{node.name} adds something that is not computed from the rope input (an offset)")
        la = self.lin(a)
        if la.complex != lb.complex:
            raise Untrackable("a sum of complex and real values")
        shape = self._trailing(node)
        la, lb = la.broadcast(shape), lb.broadcast(shape)
        lb = dataclasses.replace(lb, coef=lb.coef * alpha)
        k = la.src.shape[0] + lb.src.shape[0]
        out = Lin(*(torch.cat([getattr(la, f), getattr(lb, f)]) for f in ("src", "coef", "tab", "idx")),
                  dtype=v.dtype, complex=la.complex, rounded=la.rounded or lb.rounded, fp64=la.fp64 or lb.fp64,
                  used_complex=la.used_complex or lb.used_complex)
        if k > MAX_TERMS:
            raise Untrackable(f"{node.name} sums more terms than a rotation of pairs")
        return self._arith(out, v)

    def _product(self, node, a, b, v) -> Lin:
        ta, tb = self.tracked(a), self.tracked(b)
        if ta and tb:
            raise Untrackable(f"{node.name} multiplies the rope input by itself")
        if not (ta or tb):
            raise Untrackable(f"{node.name} is not computed from the rope input")
        x, other = (self.lin(a), b) if ta else (self.lin(b), a)
        shape = self._trailing(node)
        if is_number(other):
            x = x.broadcast(shape)
            return self._arith(dataclasses.replace(x, coef=x.coef * float(other)), v)
        ov = val(other)
        if not isinstance(ov, torch.Tensor) or not (ov.is_floating_point() or ov.is_complex()):
            raise Untrackable(f"{node.name} multiplies by a non-float value")
        if self.depends_on_root(other):
            raise Untrackable(f"{node.name} multiplies by a value computed from the rope input itself")
        if ov.ndim > val(node).ndim:
            raise Untrackable("a table with more dims than the rope input")
        nchan = min(ov.ndim, len(shape))  # the table dims that line up with the channel dims
        tid, addr = self.table(other, nchan, ov.is_complex())
        x = x.broadcast(shape)
        if ov.is_complex() and not x.complex:
            raise Untrackable("a real value multiplied by a complex table")
        active = x.src >= 0
        if bool(((x.tab >= 0) & active).any()):
            raise Untrackable(f"{node.name} multiplies by a second table")
        if ov.is_complex():
            # (re + i im)(fr + i fi) = (re fr - im fi) + i (re fi + im fr); addr[..., 0/1] = fr/fi
            full = torch.broadcast_to(addr, (*shape, 2))
            fr, fi = full[..., 0], full[..., 1]

            def part(p, q, f, sign):
                return (x.src[..., p], x.coef[..., p] * sign, torch.full_like(x.tab[..., p], tid),
                        f.expand_as(x.src[..., p]))
            re = [part(0, None, fr, 1.0), part(1, None, fi, -1.0)]
            im = [part(0, None, fi, 1.0), part(1, None, fr, 1.0)]
            arrays = []
            for f in range(4):
                arrays.append(torch.stack([torch.cat([re[0][f], re[1][f]]), torch.cat([im[0][f], im[1][f]])], -1))
            out = Lin(*arrays, dtype=v.dtype, complex=True, rounded=x.rounded, fp64=x.fp64, used_complex=True)
            return self._arith(out, v)
        ext = (2,) if x.complex else ()
        addr = torch.broadcast_to(addr.reshape(*addr.shape, *((1,) if ext else ())), (*shape, *ext))
        out = dataclasses.replace(x, tab=torch.where(active, tid, x.tab), idx=torch.where(active, addr, x.idx))
        return self._arith(out, v)

    def _cat(self, node, t, args, v) -> Lin:
        parts = [self.lin(p) if self.tracked(p) else None for p in args[0]]
        if any(p is None for p in parts):
            raise Untrackable(f"{node.name} joins the rope with values not computed from its input")
        if len({p.complex for p in parts}) != 1:
            raise Untrackable("a join of complex and real values")
        d = args[1] if len(args) > 1 else node.kwargs.get("dim", 0)
        ndim = val(node).ndim
        k = max(p.src.shape[0] for p in parts)
        parts = [p.pad(k) for p in parts]
        dd = self._dim(d, ndim)
        join = torch.stack if t == aten.stack.default else torch.cat
        out = Lin(*(join([getattr(p, f) for p in parts], dd) for f in ("src", "coef", "tab", "idx")),
                  dtype=v.dtype, complex=parts[0].complex, rounded=any(p.rounded for p in parts),
                  fp64=any(p.fp64 for p in parts), used_complex=any(p.used_complex for p in parts))
        return out  # a join promotes dtypes exactly

    def _reduce_sum(self, node, args, kw, v) -> Lin:
        x = self.lin(args[0])
        dims = args[1] if len(args) > 1 else None
        keep = args[2] if len(args) > 2 else kw.get("keepdim", False)
        if set(kw) - {"keepdim"} or not isinstance(dims, (list, tuple)) or len(dims) != 1 or x.complex:
            raise Untrackable(f"{node.name}: a sum that is not over one channel dim")
        d = self._dim(dims[0], val(args[0]).ndim)

        def fold(a):  # the summed dim's entries become term slots
            a = a.movedim(d, 1)
            a = a.reshape(a.shape[0] * a.shape[1], *a.shape[2:])
            return a.unsqueeze(d) if keep else a
        return self._arith(x.map(fold), v)

    def _scatter(self, node, t, args, v) -> Lin:
        base, src = args[0], args[1]
        shape = self._trailing(node)
        if self.tracked(base):
            b = self.lin(base)
        elif isinstance(base, torch.fx.Node) and base.target in EMPTY | ZEROS:
            b = fill_lin(shape, -2 if base.target in EMPTY else -1, val(base).dtype)
        else:
            raise Untrackable(f"{node.name} writes the rope into a buffer not computed from its input")
        s = self._cast(self.lin(src), v.dtype)
        if b.complex or s.complex:
            raise Untrackable("a complex scatter")
        k = max(b.src.shape[0], s.src.shape[0])
        b, s = b.pad(k).broadcast(shape), s.pad(k)
        d = self._dim(args[2] if len(args) > 2 else 0, v.ndim)
        out = b.map(lambda a: a.clone())
        for f in ("src", "coef", "tab", "idx"):
            dst = getattr(out, f)
            view = _slice(dst, d, *args[3:]) if t == aten.slice_scatter.default else dst.select(d, args[3])
            view.copy_(getattr(s, f).expand_as(view))
        return dataclasses.replace(out, dtype=v.dtype, rounded=b.rounded or s.rounded, fp64=b.fp64 or s.fp64,
                                   used_complex=b.used_complex or s.used_complex)


def split_dim(n: torch.fx.Node) -> int:
    """The dim an unbind (args[1]) or split (args[2]) works on."""
    at = 1 if n.target == aten.unbind.int else 2
    return n.args[at] if len(n.args) > at else n.kwargs.get("dim", 0)


def _input(n: torch.fx.Node):
    """The tensor an indexing op reads (through a split for getitem)."""
    a0 = n.args[0]
    return a0.args[0] if n.target == operator.getitem else a0


def _upcast(src, dtype) -> bool:
    sv = val(src)
    return isinstance(sv, torch.Tensor) and sv.dtype in FLOAT_TYPES and dtype in FLOAT_TYPES and (
        sv.dtype == dtype or not narrows(sv.dtype, dtype))


def _view_split(pos_in, shape, block: int) -> Optional[int]:
    """Where a reshape's output splits into position dims (the input's, up to size-1 dims)
    and a channel block of `block` elements; None if it does not."""
    for npos in range(len(shape), -1, -1):
        tail = _ints(shape[npos:])
        if tail is None:
            return None
        size = 1
        for t in tail:
            size *= t
        if size > block:
            return None
        a, b = _non1(pos_in), _non1(shape[:npos])
        if size == block and len(a) == len(b) and all(_eq(x, y) for x, y in zip(a, b)):
            return npos
    return None


def _identity_slice(node) -> bool:
    a = list(node.args[1:]) + [0, None, None, 1][len(node.args) - 1:]
    d, start, end, step = (val(x) if isinstance(x, torch.fx.Node) else x for x in a[:4])  # sizes may be sym_size nodes
    n = val(node.args[0]).shape[d]
    return start in (0, None) and step == 1 and (end is None or statically_known_true(end >= n))


def _non1(shape) -> list:
    return [s for s in shape if not _eq(s, 1)]


def _slice(a: torch.Tensor, d: int, start=None, end=None, step=1):
    n = a.shape[d]
    start = 0 if start is None else start
    end = n if end is None else min(end, n)
    if not all(isinstance(i, int) for i in (start, end, step)):
        raise Untrackable("a slice with symbolic bounds")
    return a[(slice(None),) * d + (slice(start, end, step),)]


def _split(a: torch.Tensor, node, d: int) -> list:
    if node.target == aten.unbind.int:
        return list(a.unbind(d))
    sizes = node.args[1]
    if not (isinstance(sizes, int) or all(isinstance(s, int) for s in sizes)):
        raise Untrackable("a split with symbolic sizes")
    return list(torch.split(a, sizes, d))


def _name(t) -> str:
    return str(getattr(t, "__name__", t))
