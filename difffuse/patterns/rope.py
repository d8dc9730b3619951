"""The one rope recogniser: any spelling of "rotate channel pairs by a cos/sin table"
reduced to (pairing, cos, sin) for the fused op.

Why hand-written and not Inductor's pattern matcher: the spellings are unbounded (slices,
strided views, chunk/split, unbind/stack/cat, `empty_like` + strided writes, rotation-
matrix tables, complex multiplies in complex64 or complex128, `(rope * x).sum(-1)`), and
a table of patterns missed most of what real code writes. The recogniser instead follows
every channel through the subgraph after a candidate root (`rope_track.Tracker`) and asks
whether the result is, for every output channel j,

    out[j] = r[j] * A_j + r[p(j)] * B_j

with p the interleaved pairing (2i <-> 2i+1) or the halves (i <-> i + D/2), A_j and B_j a
constant times one table entry (or a constant). That is exactly what the fused op
computes with full tables cos'[j] = A_j, sin'[j] = -B_j for the first channel of a pair
and B_j for the second: so a site is exact for any table values, whatever the spelling,
and cos'/sin' are read from the tables the model itself built:
  - one table read as is (every channel its own entry: the stack / rotate_half forms);
  - "half" tables (a pair reads cos at 2i and sin at 2i+1: Wan's strided writes, the
    complex form as `view_as_real(freqs)`): the op's half-table mode, no copy;
  - otherwise a gather of the table's entries (a 2x2 rotation-matrix table, tables of one
    entry per pair), built in the replacement from index arithmetic (`affine`).

fp64 rule (design §9): a rope computed in fp64 (a complex128 multiply, a float64 upcast)
whose result is rounded to fp32 or narrower may be computed in fp32: for a rotation of a
pair (x, y) by fp64 tables, fp32 tables and fp32 products add an error of a few fp32
ulps of |(x, y)|, below the rounding the model applies to the result. The recogniser
proves the rounding (the site's output dtype is fp32 or narrower; no arithmetic follows
a narrowing cast) and the replacement then passes the tables in fp32. A rope that stays
in fp64 is left, reported.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import torch
from torch._subclasses.fake_tensor import unset_fake_temporarily
from torch.fx.experimental.symbolic_shapes import statically_known_true

from .common import CONVERT, aten, inserted, val
from .rope_track import COMBINES, PAIR_SPLITS, TRACKED, Lin, Table, Tracker, Untrackable, _identity_slice

MAX_CONE = 160  # nodes followed from one root: a rope is a few dozen


@dataclasses.dataclass
class Run:
    """cos' or sin' channels [start, start+n) read from one table (or a constant)."""
    start: int
    n: int
    table: Optional[int]  # index into RopeSpec.tables; None: the constant `coef`
    idx: tuple  # affine address fit (c0, s1, s2, m): c0 + s1*(j//m) + s2*(j%m), j in [0, n)
    coef: tuple  # affine fit of the constant factor (floats), same form


@dataclasses.dataclass
class RopeSpec:
    interleaved: bool
    full_tables: bool
    tables: list  # Table records; the replacement reads their nodes
    cos: list  # runs
    sin: list
    d: int
    out_dtype: torch.dtype
    to_fp32: bool  # the fp64 rule: tables passed in fp32
    slow_spelling: bool = False  # computed with complex tensors or in fp64

    def direct(self) -> bool:
        """cos and sin are each one table read as it is (no gather)."""
        return all(len(runs) == 1 and runs[0].table is not None and runs[0].idx[0] == 0
                   and runs[0].idx[1:] in ((1, 0, 1), (2, 1, 2)) and runs[0].coef == (1.0, 0.0, 0.0, 1)
                   for runs in (self.cos, self.sin))

    def table_nodes(self) -> list:
        return [t.node for t in self.tables]

    def build(self, bases: list) -> tuple:
        """(cos, sin) for the op from the table tensors (traced into the replacement)."""
        flat = [_flat(b, t) for b, t in zip(bases, self.tables)]
        cos, sin = _assemble(self.cos, flat), _assemble(self.sin, flat)
        if self.to_fp32:
            cos, sin = cos.float(), sin.float()
        return cos, sin

    def fake_tables(self) -> tuple:
        """Fake cos/sin with the shapes and dtype the op will get (eligibility checks)."""
        vals = [val(t.node) for t in self.tables]
        dtype = torch.float32 if self.to_fp32 else _real_dtype(vals[0].dtype)
        for v in vals[1:]:
            dtype = torch.promote_types(dtype, _real_dtype(v.dtype))
        pos = self.tables[0].pos
        return tuple(vals[0].new_empty((*pos, self.d), dtype=dtype) for _ in range(2))


@dataclasses.dataclass
class Found:
    """A rope-shaped subgraph after `root`: a recognised rope (`spec`) or why not."""
    root: torch.fx.Node
    out: Optional[torch.fx.Node]
    nodes: list  # the site's nodes after the root, in graph order
    anchor: torch.fx.Node  # where a miss is reported: the rope's first pair split
    spec: Optional[RopeSpec] = None
    reason: Optional[str] = None
    cone: set = dataclasses.field(default_factory=set)
    mixes: bool = False


def _real_dtype(dt):
    return {torch.complex64: torch.float32, torch.complex128: torch.float64}.get(dt, dt)


# ------------------------------------------------------------------ search
def _candidate(n) -> bool:
    v = val(n)
    if not (isinstance(n, torch.fx.Node) and isinstance(v, torch.Tensor) and v.is_floating_point()
            and v.ndim >= 2):
        return False
    d = v.shape[-1]
    return isinstance(d, int) and d >= 2 and d % 2 == 0  # head_dim 2: one pair


_PASS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, CONVERT, aten.clone.default,
         aten.unsqueeze.default, aten.alias.default, aten._to_copy.default}


def _pair_split(n) -> bool:
    """n splits its input's last dim in pairs or halves: a slice/select/split/unbind of the
    last dim, a view to (.., 2) or (.., 2, D/2), view_as_complex."""
    if n.target == aten.view_as_complex.default:
        return True
    if n.target in (aten.view.default, aten.reshape.default, aten._unsafe_view.default):
        return _pairs_view(n)
    at = 2 if n.target in (aten.split.Tensor, aten.split_with_sizes.default) else 1
    if n.target in PAIR_SPLITS and (len(n.args) > at or "dim" in n.kwargs):
        src = val(n.args[0])
        d = n.args[at] if len(n.args) > at else n.kwargs["dim"]
        return isinstance(src, torch.Tensor) and isinstance(d, int) and src.ndim >= 2 and d % src.ndim == src.ndim - 1
    return False


def _roots(split) -> list:
    """The rope inputs a pair split may come from, farthest first: its source, walked back
    through views and casts while the last dim stays the same (the head dim)."""
    path, n, d = [], split.args[0], None
    for _ in range(6):
        if not isinstance(n, torch.fx.Node):
            break
        if _candidate(n):
            if d is None:
                d = val(n).shape[-1]
            elif val(n).shape[-1] != d:
                break
            path.append(n)
        elif d is not None:
            break
        if n.target not in _PASS and not (n.target == aten.slice.Tensor and _identity_slice(n)):
            break
        n = n.args[0]
    return list(reversed(path))


def _cone(root) -> list:
    seen, frontier = {root}, [root]
    while frontier and len(seen) < MAX_CONE:
        n = frontier.pop()
        for u in n.users:
            if u not in seen and u.target in TRACKED:
                seen.add(u)
                frontier.append(u)
    seen.discard(root)
    return list(seen)


def _rope_like(tr: Tracker, cone) -> Optional[torch.fx.Node]:
    """The cone pairs channels up, multiplies by a table and joins: the first pair split, or None."""
    split = table = join = None
    for n in cone:
        if _pair_split(n):
            split = split or n
        elif n.target == aten.mul.Tensor and any(
                isinstance(a, torch.fx.Node) and a not in tr.values and isinstance(val(a), torch.Tensor)
                and a is not tr.root and not tr.depends_on_root(a) for a in n.args):
            table = n
        if n.target in COMBINES or (n.target == aten.mul.Tensor and isinstance(val(n), torch.Tensor)
                                    and val(n).is_complex()):
            join = n
    return split if split is not None and table is not None and join is not None else None


def _pairs_view(n) -> bool:
    v = val(n)
    return isinstance(v, torch.Tensor) and v.ndim >= 2 and any(isinstance(s, int) and s == 2 for s in v.shape[-2:])


def _mixes(tr: Tracker) -> bool:
    """Some tracked value reads two channels of the root in one element (a rotation's join)."""
    return any(isinstance(lin, Lin) and _mixes_lin(lin) for lin in tr.values.values())


def _mixes_lin(lin: Lin) -> bool:
    if lin.src.shape[0] < 2:
        return False
    s = lin.src.reshape(lin.src.shape[0], -1)
    hi, lo = s.max(0).values, torch.where(s >= 0, s, s.max() + 1).min(0).values
    return bool(((hi >= 0) & (lo < hi)).any())


def _try(root, order) -> Optional[Found]:
    cone = sorted(_cone(root), key=order.__getitem__)
    if len(cone) < 3:
        return None
    tr = Tracker(root, order)
    failures = {}
    for n in cone:
        if any(a in cone and a not in tr.values for a in n.all_input_nodes):
            continue  # an input failed: that failure is the reason
        try:
            tr.step(n)
        except Untrackable as exc:
            failures[n] = str(exc)
        except Exception as exc:  # noqa: BLE001  (a bad site is a miss, never an aborted pass)
            failures[n] = f"internal error tracking the rope ({type(exc).__name__}: {exc})"
    anchor = _rope_like(tr, cone)
    if anchor is None:
        return None
    f = _conclude(tr, cone, failures, anchor)
    f.cone, f.mixes = set(cone), _mixes(tr)
    # a rope the tracking could not finish still joined two values computed from its input
    # where it stopped; without that (`1 + scale` of a modulation chunk) it is no rope
    joined = any(sum(isinstance(a, torch.fx.Node) and a in tr.values for a in n.args) >= 2 for n in failures)
    if f.spec is None and not f.mixes and not joined:
        return None
    return f


_RESHAPES = (aten.view.default, aten.reshape.default, aten._unsafe_view.default)


def casts_before_views(graph: torch.fx.Graph) -> int:
    """Move a cast up through reshapes, unsqueezes and joins to the view_as_real of a complex
    rope: `convert(reshape(x))` -> `reshape(convert(x))`, `convert(cat([a, b]))` ->
    `cat([convert(a), convert(b)])`, where the moved node has no other reader: a cast
    commutes with both exactly. A complex rope whose result is rounded back only after a
    reshape over the head dims (DiffSynth: `view_as_real(..).flatten(2).to(x.dtype)`) or
    after being joined with the tokens it does not rope and stacked (official Wan:
    `torch.stack([cat([rope(x[i, :n]), x[i, n:]]) ...]).float()`) then has its rounding
    inside the part the recogniser follows. (Only there: other families' patterns spell
    their casts after the views.)"""
    done, todo = 0, list(graph.find_nodes(op="call_function", target=CONVERT))
    while todo:
        c = todo.pop()
        v = c.args[0]
        if c._erased or not (isinstance(v, torch.fx.Node) and v.target in _MOVES and len(v.users) == 1
                             and _behind_view_as_real(v)):
            continue
        dtype = c.args[1]
        with graph.inserting_before(c):
            if v.target == aten.cat.default:  # a cast of a join is the join of the casts
                parts = []
                for p in v.args[0]:
                    cast = graph.call_function(CONVERT, (p, dtype), dict(c.kwargs))
                    cast.meta.update(c.meta)
                    cast.meta["val"] = val(p).to(dtype)
                    parts.append(cast)
                new = graph.call_function(v.target, (parts, *v.args[1:]), dict(v.kwargs))
            else:
                cast = graph.call_function(CONVERT, (v.args[0], dtype), dict(c.kwargs))
                cast.meta.update(c.meta)
                cast.meta["val"] = val(v.args[0]).to(dtype)
                parts = [cast]
                new = graph.call_function(v.target, (cast, *v.args[1:]), dict(v.kwargs))
            new.meta.update(v.meta)
            new.meta["val"] = val(c)
        c.replace_all_uses_with(new)
        graph.erase_node(c)
        graph.erase_node(v)
        todo += parts  # keep moving each cast up
        done += 1
    return done


_MOVES = (*_RESHAPES, aten.unsqueeze.default, aten.cat.default, aten.clone.default)


def _behind_view_as_real(n, depth: int = 6) -> bool:
    """n is a complex rope's result: view_as_real, through reshapes, unsqueezes and joins."""
    if not isinstance(n, torch.fx.Node) or depth == 0:
        return False
    if n.target == aten.view_as_real.default:
        return True
    if n.target == aten.cat.default:
        return any(_behind_view_as_real(p, depth - 1) for p in n.args[0])
    return n.target in _MOVES and _behind_view_as_real(n.args[0], depth - 1)


def find_ropes(graph: torch.fx.Graph) -> list[Found]:
    """Every rope-shaped subgraph in `graph`: recognised, or one Found with the reason it
    is not per rope (candidates that overlap a recognised rope, e.g. a table followed as if
    it were the input, are dropped). The tracking runs on real (small) index tensors,
    outside any fake mode the compiler has active."""
    key = (len(graph.nodes), hash(tuple(map(id, graph.nodes))))
    if _LAST[0] is graph and _LAST[1] == key:  # the same graph, unchanged (the anchors of two families)
        return list(_LAST[2])
    threads = torch.get_num_threads()
    try:
        # the index tensors are tiny: one thread (a busy machine's thread pool costs more than the work)
        torch.set_num_threads(1)
        with unset_fake_temporarily():
            found = _find(graph)
    finally:
        torch.set_num_threads(threads)
    _LAST[:] = [graph, key, found]
    return list(found)


_LAST: list = [None, None, None]


def _find(graph):
    nodes = list(graph.nodes)
    order = {n: i for i, n in enumerate(nodes)}
    tried: dict = {}
    done, failed = [], []
    claimed: set = set()
    for s in nodes:
        if s in claimed or not (s.op == "call_function" and _pair_split(s)) or inserted(s):
            continue
        nearest_failure = None
        try:
            roots = _roots(s)
        except Exception as exc:  # noqa: BLE001  (one odd split never costs the graph its other ropes)
            src = s.args[0] if isinstance(s.args[0], torch.fx.Node) else s
            failed.append(Found(src, None, [], s, reason=f"internal error reading the pair split "
                                                          f"({type(exc).__name__}: {exc})"))
            continue
        for root in roots:
            if root not in tried:
                tried[root] = _try(root, order)
            f = tried[root]
            if f is None:
                continue
            if f.spec is not None:
                done.append(f)
                claimed.update(f.nodes)
                nearest_failure = None
                break
            nearest_failure = f
        if nearest_failure is not None and nearest_failure not in failed:
            failed.append(nearest_failure)
    # one reported failure per rope: none where a rope was recognised, else the one that
    # got furthest (it mixed channels of its root), then the narrowest root (the head dim,
    # not the heads viewed as pairs)
    kept = []
    for f in sorted(failed, key=lambda f: (not f.mixes, _numel(val(f.root).shape[-1:]))):
        if any(f.cone & (g.cone | set(g.nodes)) for g in done + kept) or f.root in claimed:
            continue
        kept.append(f)
    return sorted(done + kept, key=lambda f: order[f.anchor])


def _conclude(tr: Tracker, cone, failures, anchor) -> Found:
    d = int(val(tr.root).shape[-1])
    best, why, why_at = None, None, None
    shape = tuple(val(tr.root).shape)
    for n in reversed(cone):  # the last whole rotation; one shaped like the root first
        lin = tr.values.get(n)
        if not isinstance(lin, Lin) or lin.complex or _numel(lin.shape) != d or not _mixes_lin(lin):
            continue
        got = _spec(tr, n, lin, d)
        if isinstance(got, RopeSpec):
            if best is None or (_same_shape(val(n).shape, shape) and not _same_shape(val(best[0]).shape, shape)):
                best = (n, got)
            if _same_shape(val(n).shape, shape):
                break
            continue
        if why is None:
            why, why_at = got, n
    if best is None:
        # the first op that stopped the tracking, if it came before the last whole-width value
        # judged (else that value's own reason: which channels it mixes)
        first = next(iter(failures), None)
        if first is not None and (why_at is None or tr._order[first] < tr._order[why_at]):
            reason = failures[first]
        else:
            reason = why or "the rope's output is never a whole rotation of its input"

        return Found(tr.root, None, [], anchor, reason=reason)
    out, spec = best
    nodes = _ancestors(out, tr)
    return Found(tr.root, out, nodes, anchor, spec=spec)


def _same_shape(a, b) -> bool:
    return len(a) == len(b) and all(statically_known_true(x == y) for x, y in zip(a, b))


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _ancestors(out, tr: Tracker) -> list:
    seen, stack = set(), [out]
    while stack:
        n = stack.pop()
        if n in seen or n is tr.root or n not in tr.values:
            continue
        seen.add(n)
        stack.extend(n.all_input_nodes)
    return sorted(seen, key=tr._order.__getitem__)


# ------------------------------------------------------------------ the form
def _spec(tr: Tracker, out, lin: Lin, d: int) -> RopeSpec | str:
    """The op's form for `out` (every channel a rotation of its pair), or why not."""
    src, coef, tab, idx = (a.reshape(a.shape[0], d) for a in (lin.src, lin.coef, lin.tab, lin.idx))
    if bool((src == -2).any()):
        j = int((src == -2).any(0).nonzero()[0])
        return f"channel {j} of the rope output is never written"
    terms = []  # per channel: {src: (table, idx, coef)}
    for j in range(d):
        t = {}
        for k in range(src.shape[0]):
            s = int(src[k, j])
            if s < 0 or float(coef[k, j]) == 0.0:
                continue
            if s in t:
                return f"output channel {j} reads input channel {s} twice"
            t[s] = (int(tab[k, j]), int(idx[k, j]), float(coef[k, j]))
        terms.append(t)
    partners = {j: next(s for s in t if s != j) for j, t in enumerate(terms) if len(t) == 2}
    if not partners:
        return "no channel is rotated with its pair (a product with a table, not a rope)"
    if all(p == j ^ 1 for j, p in partners.items()):
        interleaved = True
    elif all(p == (j + d // 2) % d for j, p in partners.items()):
        interleaved = False
    else:
        j, p = next(iter(partners.items()))
        return (f"output channel {j} mixes input channels {j} and {p}: not interleaved pairs (2i, 2i+1) "
                f"or halves (i, i+{d // 2})")
    cos, sin = [], []
    for j, t in enumerate(terms):
        p = j ^ 1 if interleaved else (j + d // 2) % d
        if j not in t or set(t) - {j, p}:
            return f"output channel {j} reads input channels {sorted(t)}, not {j} and its pair {p}"
        first = (j % 2 == 0) if interleaved else j < d // 2
        cos.append(t[j])
        b = t.get(p, (-1, 0, 0.0))
        sin.append((b[0], b[1], -b[2] if first else b[2]))
    out_dtype = val(out).dtype
    if lin.fp64 and out_dtype == torch.float64:
        return "the rope computes in fp64 and returns fp64: the fused op computes in fp32"
    spec = _plan(tr, cos, sin, interleaved, d, out_dtype, lin.fp64)
    if isinstance(spec, RopeSpec):
        spec.slow_spelling = lin.fp64 or lin.used_complex
    return spec


def _plan(tr: Tracker, cos, sin, interleaved, d, out_dtype, fp64) -> RopeSpec | str:
    used = sorted({t for t, _, _ in cos + sin if t >= 0})
    if not used:
        return "the rotation uses no table"
    tables = [tr.tables[t] for t in used]
    remap = {t: i for i, t in enumerate(used)}
    widths = [_width(t) for t in tables]
    if len({tuple(map(str, t.pos)) for t in tables}) != 1:
        return "cos and sin tables are laid out over different position dims"
    # the op's half-table mode: a pair reads cos at 2i and sin at 2i+1 of full-width tables
    half = interleaved and all(
        c[0] >= 0 and s[0] >= 0 and c[2] == 1.0 and s[2] == 1.0 and c[1] == j - j % 2 and s[1] == j - j % 2 + 1
        and widths[remap[c[0]]] == d and widths[remap[s[0]]] == d and c[0] == cos[0][0] and s[0] == sin[0][0]
        for j, (c, s) in enumerate(zip(cos, sin)))
    if half:
        runs_c = [Run(0, d, remap[cos[0][0]], (0, 1, 0, 1), (1.0, 0.0, 0.0, 1))]
        runs_s = [Run(0, d, remap[sin[0][0]], (0, 1, 0, 1), (1.0, 0.0, 0.0, 1))]
        return RopeSpec(interleaved, False, tables, runs_c, runs_s, d, out_dtype, fp64)
    runs_c, runs_s = _runs(cos, remap), _runs(sin, remap)
    if isinstance(runs_c, str) or isinstance(runs_s, str):
        return runs_c if isinstance(runs_c, str) else runs_s
    return RopeSpec(interleaved, True, tables, runs_c, runs_s, d, out_dtype, fp64)


def _width(t: Table) -> int:
    v = val(t.node)
    n = _numel(v.shape[v.ndim - t.nchan:]) if t.nchan else 1
    return n * (2 if t.complex else 1)


def _runs(entries, remap) -> list | str:
    """Group channels by table and fit each group's addresses and factors (`affine`)."""
    runs, j = [], 0
    while j < len(entries):
        t = entries[j][0]
        e = j
        while e < len(entries) and entries[e][0] == t:
            e += 1
        idx = affine([entries[k][1] for k in range(j, e)])
        coef = affine([entries[k][2] for k in range(j, e)])
        if idx is None or coef is None:
            return (f"the table entries of channels {j}..{e - 1} follow no regular order "
                    "(the op would need an arbitrary gather)")
        runs.append(Run(j, e - j, remap.get(t) if t >= 0 else None, idx, coef))
        j = e
    return runs


def affine(values: list):
    """(c0, s1, s2, m) with values[j] == c0 + s1*(j//m) + s2*(j%m) for all j, or None."""
    n = len(values)
    c0 = values[0]
    for m in [1, 2, 4] + [k for k in range(8, n + 1) if n % k == 0]:
        s1 = values[m] - c0 if m < n else 0
        s2 = values[1] - c0 if m > 1 and n > 1 else 0
        if all(values[j] == c0 + s1 * (j // m) + s2 * (j % m) for j in range(n)):
            return (c0, s1, s2, m)
    return None


# ------------------------------------------------------------------ building the tables
def _flat(b: torch.Tensor, t: Table) -> torch.Tensor:
    """The table as [*pos, width]: its channel block flattened (complex: as real pairs),
    its position dims those the rope broadcast (size-1 dims inserted or removed)."""
    if t.complex:
        b = torch.view_as_real(b)
    nch = t.nchan + (1 if t.complex else 0)
    b = b.flatten(b.ndim - nch) if nch else b.unsqueeze(-1)
    dims = [s for s in b.shape[:-1] if not _is_one(s)]
    shape, it = [], iter(dims)
    for s in t.pos:
        shape.append(1 if _is_one(s) else next(it))
    return b.reshape(*shape, b.shape[-1])


def _is_one(s) -> bool:
    return isinstance(s, int) and s == 1


def _affine_vec(fit, n: int, like: torch.Tensor, dtype) -> torch.Tensor:
    c0, s1, s2, m = fit
    j = torch.arange(n, device=like.device)
    v = c0 + s1 * torch.div(j, m, rounding_mode="floor") + s2 * torch.remainder(j, m)
    return v.to(dtype)


def _assemble(runs: list, flat: list) -> torch.Tensor:
    parts = []
    ref = flat[0]
    for run in runs:
        if run.table is None:
            c0, s1, s2, m = run.coef
            if s1 == 0 and s2 == 0:
                part = ref.new_full((*ref.shape[:-1], run.n), float(c0))
            else:
                part = _affine_vec(run.coef, run.n, ref, ref.dtype).expand(*ref.shape[:-1], run.n)
        else:
            t = flat[run.table]
            c0, s1, s2, m = run.idx
            if (s1, s2, m) in ((1, 0, 1), (m, 1, m)) and c0 == 0 and run.n == t.shape[-1]:
                part = t
            elif s2 == 1 and s1 == m or (m == 1 and s1 == 1):
                part = t.narrow(-1, c0, run.n)
            else:
                part = t.index_select(-1, _affine_vec(run.idx, run.n, t, torch.long))
            k0, k1, k2, km = run.coef
            if not (k0 == 1.0 and k1 == 0 and k2 == 0):
                part = part * _affine_vec(run.coef, run.n, t, part.dtype)
        parts.append(part)
    return parts[0] if len(parts) == 1 else torch.cat(parts, -1)
