"""Canonical forms the families and `fusion_pass/canonicalize.py` share: predicates on the
post-grad graph (a 0-d tensor a Python float became, `t + k`, a normalised value, the input
an RMSNorm squares), node construction with the source metadata kept, and the identity
*completions* the modulation families make around their own matching (a scale-only or
shift-only modulation completed with exact identities, taken out again after the family
ran). Here, below the pass manager, so that patterns never import `fusion_pass`."""
from __future__ import annotations

import operator

import torch

from .common import CONVERT, FLOAT_TYPES, aten, is_number, val

# ------------------------------------------------------------------ shared helpers
def _new(graph: torch.fx.Graph, target, args: tuple, fake, like: torch.fx.Node, kwargs=None) -> torch.fx.Node:
    """A call_function node at the graph's insertion point, with `like`'s source metadata
    (stack trace, module path: the report names the user's line) and `fake` as its value."""
    node = graph.call_function(target, args, kwargs or {})
    node.meta.update({k: v for k, v in like.meta.items() if k in ("stack_trace", "nn_module_stack", "source_fn_stack",
                                                                 "seq_nr", "original_aten", "from_node")})
    node.meta["val"] = fake
    return node


def _tensor(node):
    """The fake tensor a Node computes, else None."""
    v = val(node) if isinstance(node, torch.fx.Node) else None
    return v if isinstance(v, torch.Tensor) else None


def is_scalar_tensor(node) -> bool:
    """A 0-d floating-point tensor node: a Python float that Dynamo lifted to a graph input
    under dynamic shapes (`x * (self.scale_constant + scale)`, `+ self.eps`), or a scalar
    buffer. Its value is not known (nor guarded) at compile time."""
    t = _tensor(node)
    return t is not None and t.ndim == 0 and t.dtype in FLOAT_TYPES


def is_k_plus(node, strict: bool = True) -> bool:
    """`t + k` with k a number or a 0-d tensor and t a tensor of rank >= 1: a modulation
    factor (`1 + scale`), as `add.Tensor(t, k)` (how `k + t` reaches post-grad too).
    strict=False also takes one with kwargs (`alpha=`): what a miss report looks for."""
    if not (isinstance(node, torch.fx.Node) and node.target == aten.add.Tensor and len(node.args) == 2
            and (not node.kwargs or not strict) and isinstance(node.args[0], torch.fx.Node)):
        return False
    t, k = node.args
    tv = _tensor(t)
    return tv is not None and tv.ndim >= 1 and (is_number(k) or is_scalar_tensor(k))


def is_normalised(node) -> bool:
    """`x * rsqrt(.)` (a norm's normalised value; RMSNorm and LayerNorm alike), possibly cast."""
    if isinstance(node, torch.fx.Node) and node.target == CONVERT:
        node = node.args[0]
    return (isinstance(node, torch.fx.Node) and node.target == aten.mul.Tensor
            and any(isinstance(a, torch.fx.Node) and a.target == aten.rsqrt.default for a in node.args))


# ------------------------------------------------------------------ addcmul
_TO_SQUARE = (aten.add.Tensor, aten.add.Scalar, aten.div.Tensor, aten.mean.dim, aten.sum.dim_IntList,
              aten.copy.default, torch.ops._c10d_functional.wait_tensor.default,
              torch.ops._c10d_functional.all_reduce.default)


def squared_input(rsqrt: torch.fx.Node):
    """The tensor an RMSNorm's rsqrt squares: rsqrt(mean(s**2 | s*s) [all-reduced] + eps) -> s."""
    n = rsqrt.args[0] if rsqrt.args else None
    for _ in range(8):
        if not isinstance(n, torch.fx.Node):
            return None
        if n.target == aten.pow.Tensor_Scalar or (n.target == aten.mul.Tensor and len(n.args) == 2
                                                  and n.args[0] is n.args[1]):
            return n.args[0]
        if n.target not in _TO_SQUARE:
            return None
        n = n.args[1] if n.target == aten.copy.default else n.args[0]
    return None

# ------------------------------------------------------------------ identity completions
IDENTITY = "difffuse_identity"
IDENTITY_CAST = "difffuse_identity_cast"


def is_identity(node) -> bool:
    """node is an identity operand a completion put in (the -0.0 of a missing shift, or a
    missing scale's -0.0 in `(-0.0 + 1)`): the family reads it as "no shift" / "no scale"."""
    return isinstance(node, torch.fx.Node) and bool(node.meta.get(IDENTITY))


_NORM_STEPS = {aten.mul.Tensor, aten.add.Tensor, aten.add.Scalar, aten.sub.Tensor, aten.rsqrt.default,
               aten.var_mean.correction, aten.mean.dim, aten.pow.Tensor_Scalar, aten.div.Tensor,
               aten.sum.dim_IntList, CONVERT}


def norm_output(node) -> bool:
    """node is a norm's output: its normalised value `x * rsqrt(.)`, times a weight, plus a
    bias (`bias + n * w`, the canonical order), each possibly cast."""
    def strip(n):
        return n.args[0] if isinstance(n, torch.fx.Node) and n.target == CONVERT else n
    n = strip(node)
    if isinstance(n, torch.fx.Node) and n.target == aten.add.Tensor and len(n.args) == 2:
        n = strip(n.args[1])
    if (isinstance(n, torch.fx.Node) and n.target == aten.mul.Tensor and len(n.args) == 2 and not is_normalised(n)
            and not is_k_plus(n.args[1])):  # the weight multiply, not a modulation
        n = strip(n.args[0])
    return is_normalised(n)


def _norm_chain(n: torch.fx.Node) -> list | None:
    """The nodes between a norm's input and its output n (in graph order), else None."""
    back, stack = set(), [(n, 0)]
    while stack:
        v, depth = stack.pop()
        if v in back or depth > 9 or not (isinstance(v, torch.fx.Node) and v.op == "call_function"
                                          and v.target in _NORM_STEPS | {operator.getitem}):
            continue
        back.add(v)
        stack.extend((a, depth + 1) for a in v.all_input_nodes)
    inputs = set()
    for v in back:
        if v.target == aten.var_mean.correction:
            inputs.add(v.args[0])
        elif v.target == aten.mean.dim and isinstance(v.args[0], torch.fx.Node) and v.args[0].args:
            inputs.add(v.args[0].args[0])
    if len(inputs) != 1:
        return None
    x = inputs.pop()
    chain, frontier = set(), [x]
    while frontier:
        v = frontier.pop()
        for u in v.users:
            if u in back and u not in chain and u is not x:
                chain.add(u)
                frontier.append(u)
    if n not in chain or len(chain) > 24:
        return None
    order = {v: i for i, v in enumerate(n.graph.nodes)}
    return sorted(chain, key=order.__getitem__)


_ARITHMETIC = {aten.add.Tensor, aten.sub.Tensor, aten.mul.Tensor, aten.div.Tensor, aten.rsub.Scalar,
               aten.rsub.Tensor, aten.addcmul.default}


def ends_arithmetic(y: torch.fx.Node) -> bool:
    """No reader of y computes on with it elementwise (`c + y`, `c - y`, `y * t`): a product
    that is a whole scale-only modulation, not the start of a longer pointwise expression
    (which is either another family's form or Inductor's to fuse in one kernel)."""
    return not any(u.target in _ARITHMETIC for u in y.users)


class Completions:
    """Identity operands put into a graph for one family's matching, and `undo` to take
    out again the ones no match consumed (the graph is then as before, less the matches).

    - scale-only modulation `y = a * (k + s)` -> `-0.0 + y` (shift = -0.0): x + (-0.0) == x
      for every x, -0.0 and NaN included, so the added operand changes no value;
    - shift-only modulation `n + t` -> `t + n * (-0.0 + 1)` (scale = -0.0, k = 1): -0.0 + 1
      is exactly 1 and n * 1 == n;
    - a norm output read by several modulations (SD3.5's AdaLayerNormZeroX) -> one copy of
      the norm's nodes per further reader: recomputing the same ops on the same input
      gives the same values, and each modulation is then the one-reader form;
    - a norm output or modulation with no cast after it -> `convert(o, o.dtype)`: a cast to
      the dtype o already has is the identity.
    The zeros are [1]-shaped tensors of the output's dtype: they broadcast to the output
    without changing its shape or dtype. The family reads them as "no shift" / "no scale"
    (`is_identity`); the op is called with None there."""

    def __init__(self, graph: torch.fx.Graph):
        self.graph = graph
        self.shifts: list = []     # add(zero, y) of a scale-only modulation
        self.scales: list = []     # (t, p, one, t's args): t = add(c, p), p = mul(n, one), one = add(zero, 1)
        self.copies: list = []     # (copy, original) of a duplicated norm's nodes
        self.identity_casts: list = []
        self.zeros: list = []

    def _zero(self, like: torch.fx.Node) -> torch.fx.Node:
        lv = val(like)
        z = _new(self.graph, aten.full.default, ([1], -0.0), lv.new_full((1,), -0.0), like,
                 {"dtype": lv.dtype, "layout": torch.strided, "device": lv.device, "pin_memory": False})
        z.meta[IDENTITY] = True
        self.zeros.append(z)
        return z

    def scale_only(self, accept) -> int:
        """Complete `y = a * (t + k)` that ends its arithmetic (ends_arithmetic), where accept(a, y)."""
        done = 0
        for y in list(self.graph.find_nodes(op="call_function", target=aten.mul.Tensor)):
            if (len(y.args) != 2 or y.kwargs or not is_k_plus(y.args[1], strict=False)
                    or y.meta.get("difffuse_replacement")):
                continue  # (an `alpha=` factor too: the family's check then says why it is no site)
            yv = _tensor(y)
            if yv is None or yv.ndim == 0 or yv.dtype not in FLOAT_TYPES or not accept(y.args[0], y):
                continue
            if not ends_arithmetic(y):
                continue  # `c + y` has its shift; `c - y`, `y * t`: the arithmetic goes on (Inductor's)
            with self.graph.inserting_after(y):
                z = self._zero(y)
            with self.graph.inserting_after(z):
                s = _new(self.graph, aten.add.Tensor, (z, y), yv, y)
            y.replace_all_uses_with(s, delete_user_cb=lambda u: u is not s)
            self.shifts.append(s)
            done += 1
        return done

    def shift_only(self, accept) -> int:
        """Complete `t = c + n` (either order) with n a norm output and accept(c, t)."""
        done = 0
        for t in list(self.graph.find_nodes(op="call_function", target=aten.add.Tensor)):
            if len(t.args) != 2 or t.kwargs or not all(isinstance(a, torch.fx.Node) for a in t.args):
                continue
            for i in (1, 0):
                n, c = t.args[i], t.args[1 - i]
                if not norm_output(n) or c.target == aten.mul.Tensor or _tensor(t) is None or not accept(c, t):
                    continue
                nv = _tensor(n)
                with self.graph.inserting_before(t):
                    z = self._zero(n)
                    one = _new(self.graph, aten.add.Tensor, (z, 1), z.meta["val"] + 1, n)
                    p = _new(self.graph, aten.mul.Tensor, (n, one), nv * one.meta["val"], n)
                self.scales.append((t, p, one, t.args))
                t.args = (c, p)
                done += 1
                break
        return done

    def twice_read_norms(self) -> int:
        """Give each further modulation `n * (t + k)` of a norm output n its own copy of the norm."""
        done = 0
        for n in list(self.graph.nodes):
            users = list(n.users)
            if len(users) < 2 or not norm_output(n) or not all(
                    u.target == aten.mul.Tensor and len(u.args) == 2 and u.args[0] is n and is_k_plus(u.args[1])
                    for u in users):
                continue
            chain = _norm_chain(n)
            if chain is None:
                continue
            for u in users[1:]:
                copy: dict = {}
                with self.graph.inserting_before(u):
                    for v in chain:
                        copy[v] = self.graph.node_copy(v, lambda a: copy.get(a, a))
                u.replace_input_with(n, copy[n])
                self.copies += [(copy[v], v) for v in chain]
                done += 1
        return done

    def casts(self, affine) -> int:
        """Give every norm output and every modulation `shift + y * (t + k)` exactly one cast
        reader: an identity `convert(o, o.dtype)` where the model wrote none (a cast to a
        tensor's own dtype changes no value), so that "a cast at the end" and "a cast
        between the norm and the modulation" are always there and need no variants without
        them. Norm outputs the norm continues from (`n * w`, `b + n` with affine(w or b, D)
        true: the family's own affine check) get none."""
        done = 0
        for o in list(self.graph.nodes):
            if (o.op != "call_function" or o.target == CONVERT or o.meta.get("difffuse_replacement")
                    or _tensor(o) is None):
                continue  # (a cast is the cast)
            users = list(o.users)
            if not users or (len(users) == 1 and users[0].target == CONVERT):
                continue
            if not (self._modulation(o) or norm_output(o) and not any(self._continues(o, u, affine) for u in users)):
                continue
            ov = _tensor(o)
            with self.graph.inserting_after(o):
                c = _new(self.graph, CONVERT, (o, ov.dtype), ov.to(ov.dtype, copy=True), o)
            c.meta[IDENTITY_CAST] = True  # not is_identity(): a value, only its cast is added
            o.replace_all_uses_with(c, delete_user_cb=lambda u: u is not c)
            self.identity_casts.append(c)
            done += 1
        return done

    @staticmethod
    def _modulation(o) -> bool:
        return (o.target == aten.add.Tensor and len(o.args) == 2 and isinstance(o.args[1], torch.fx.Node)
                and o.args[1].target == aten.mul.Tensor and len(o.args[1].args) == 2
                and is_k_plus(o.args[1].args[1]) and norm_output(o.args[1].args[0]))

    @staticmethod
    def _continues(o, u, affine) -> bool:
        """u carries the norm on (its weight multiply or bias add), or is already a cast."""
        if u.target == CONVERT:
            return True
        d = _tensor(o).shape[-1] if _tensor(o) is not None and _tensor(o).ndim else None
        if u.target == aten.mul.Tensor and len(u.args) == 2 and u.args[0] is o:
            return affine(u.args[1], d)
        return u.target == aten.add.Tensor and len(u.args) == 2 and u.args[1] is o and affine(u.args[0], d)

    def undo(self) -> None:
        g = self.graph
        for c in self.identity_casts:
            if not c._erased:
                c.replace_all_uses_with(c.args[0])
                g.erase_node(c)
        for s in self.shifts:
            if not s._erased:
                s.replace_all_uses_with(s.args[1])
                g.erase_node(s)
        for t, p, one, args in self.scales:
            if not t._erased and t.args[1] is p:
                t.args = args
            for v in (p, one):
                if not v._erased and not v.users:
                    g.erase_node(v)
        for cp, orig in reversed(self.copies):
            if not cp._erased and not orig._erased:
                cp.replace_all_uses_with(orig)
        for cp, _ in reversed(self.copies):
            if not cp._erased and not cp.users:
                g.erase_node(cp)
        for z in self.zeros:
            if not z._erased and not z.users:
                g.erase_node(z)


class CompletedPass:
    """A family's PatternMatcherPass, run with identity completions made before it and
    undone after it (`complete(graph) -> Completions`), then `after(graph)` if given. The
    pass manager calls `apply`."""

    def __init__(self, pm, complete, after=None):
        self.pm, self.complete, self.after = pm, complete, after

    def apply(self, graph) -> int:
        graph = getattr(graph, "graph", graph)
        done = self.complete(graph)
        try:
            count = self.pm.apply(graph)
        except BaseException:
            try:
                done.undo()
            except Exception:  # noqa: BLE001  (the pass manager restores its snapshot anyway)
                pass
            raise
        done.undo()
        if self.after is not None:
            self.after(graph)  # on the graph as the family left it (the family's reasons for misses)
        return count
