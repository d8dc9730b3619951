"""Fusion sites of a model counted in eager, against what the compiled graph fused and
what the report says it missed.

A *site* is found by running the model once eagerly under a TorchFunctionMode that
follows tensors by identity (`_Tracker`), by what the code computes, with no knowledge of
any code base's class or function names and independently of difffuse's patterns:

- norm: a call that normalises over the last dim: `F.layer_norm` / `F.rms_norm` over one
  (the last) dim (so `nn.LayerNorm`, `nn.RMSNorm` and anything built on them), or a
  hand-written `x * rsqrt(mean(x²) + eps)` (also `/ sqrt(..)`, `x*x`, `pow(2)`, `sum / n`),
  or `(x - mean) * rsqrt(var + eps)` (`var`, `var_mean`, or the mean of the squared
  centred values). A site is every RMS norm, and a LayerNorm that reads a residual sum (an
  add or addcmul of two tensors, through casts), whose output is modulated, or whose output
  is roped (CogVideoX's q/k LayerNorm). A LayerNorm with none of these (HunyuanVideo's
  token-refiner norm1, on a Linear's output) is `plain`: no family is for it, not a site;
- modulation: a norm's output (after its affine weight, through casts and views)
  multiplied — `mul` in either order or `addcmul` — by a computed tensor that is not a
  weight (derived from a parameter — the timestep MLP's, a modulation table — but not a
  parameter or a cast / view of one alone; a constant or a rope table is no modulation):
  `norm(x) * (1 + scale) + shift`, `(1 + scale) * norm(x)`, `addcmul(shift, norm(x), 1 +
  scale)`, scale-only `norm(x) * (1 + scale)`. Each such multiply is one
  modulation (SD3.5's AdaLayerNormZeroX modulates one LayerNorm output twice: two);
  attributed to the norm's module path;
- rope: a q or k tensor that reaches attention (`F.scaled_dot_product_attention`) after
  being multiplied (`mul`, `addcmul`, a complex multiply) by a *position table* — a
  floating or complex tensor of more than one element that is not derived from any
  parameter (so not from the hidden states, which reach q and k through the projection
  weights) — and combined with a channel-permuted copy of itself: on the way from the
  q / k tensor to the multiply there is a channel op (a slice, stride or index of the last
  dim, chunk / split / unbind of the last dim, a cat / stack on the last dim, a reshape that
  changes the last dim into pairs, `view_as_complex`) or the multiply is complex. Counted
  once per q / k tensor the rope reads (its *root*: the tensor reached from the multiplied
  operand through views, casts, negations and last-dim splits / cats — one for Flux's
  joint q, two for Qwen-Image's separately roped image and text q); attributed to the
  module the multiply ran in (the attention module, for a rope written in its processor).

Module paths are real qualified names (`named_modules`, so `blocks.2-1.norm1` for a
`ModuleDict` key `'2-1'`), kept current by forward pre-hooks and hooks on every module.

The compiled side is `Report.sites()`: the module paths each match covers, and
`Report.misses`: each reported miss with the module it was traced in. A site at path p is
fused as often as matches cover p (a norm: any match; a modulation: norm_scale_shift
matches that include the modulation; a rope: qk_norm_rope or rope matches in the module the rope
ran in); an unfused site is *reported* where a miss was traced in p, else *silent*.
Honest report: per kind, sites = fused + reported (`honesty`).
"""
from __future__ import annotations

import collections
import dataclasses
import torch
from torch.overrides import TorchFunctionMode

KINDS = ("norm", "modulation", "rope")
# families whose matches and misses are about these sites (linear_gelu is not); a scale_shift
# miss may explain an unfused modulation, but its own sites (gated residuals) are no kind here
SITE_FAMILIES = ("rms_norm", "norm_scale_shift", "qk_norm_rope", "rope", "scale_shift")
NORM_FAMILIES = ("rms_norm", "norm_scale_shift", "qk_norm_rope")
ROPE_FAMILIES = ("qk_norm_rope", "rope")  # a rope fused with its norm, or on its own
NORM_ROPE_FAMILIES = (*NORM_FAMILIES, "rope")  # every match / miss is at a site


@dataclasses.dataclass
class EagerSites:
    norms: collections.Counter  # module path -> calls (family sites)
    modulated: collections.Counter  # module path of the norm -> modulations of its outputs
    ropes: collections.Counter  # module path the rope ran in -> roped q / k tensors
    plain: collections.Counter = dataclasses.field(default_factory=collections.Counter)  # plain LNs: no site

    def totals(self) -> dict:
        return {"norm": sum(self.norms.values()), "modulation": sum(self.modulated.values()),
                "rope": sum(self.ropes.values())}

    def counter(self, kind: str) -> collections.Counter:
        return {"norm": self.norms, "modulation": self.modulated, "rope": self.ropes}[kind]


@dataclasses.dataclass
class _NormCall:
    path: str
    rms: bool
    residual: bool  # reads an add of two tensors (through casts)
    modulated: int = 0
    roped: bool = False


@dataclasses.dataclass
class _Node:
    seq: int
    name: str
    args: tuple
    kwargs: dict
    ins: list  # tensor inputs
    outs: list  # tensor outputs (an in-place op's target included)
    path: str


# op names (a torch function's or Tensor method's __name__)
_CASTS = {"float", "double", "half", "bfloat16", "to", "type", "type_as", "contiguous", "clone", "detach"}
_VIEWS = {"view", "reshape", "unflatten", "flatten", "transpose", "permute", "unsqueeze", "squeeze", "expand",
          "expand_as", "__getitem__", "view_as", "movedim", "moveaxis", "swapaxes", "narrow", "select", "unbind",
          "chunk", "split", "tensor_split", "view_as_complex", "view_as_real", "t"}
_NEG = {"neg", "__neg__", "negative"}
_CATS = {"cat", "concat", "concatenate", "stack"}
_FLIPS = {"flip", "roll"}
_MULS = {"mul", "__mul__", "__rmul__", "mul_", "__imul__", "multiply"}
_ADDCMULS = {"addcmul", "addcmul_"}
_ADDS = {"add", "__add__", "__radd__", "add_", "__iadd__"}
_SUBS = {"sub", "__sub__", "sub_", "__isub__", "subtract"}
_DIVS = {"div", "__truediv__", "div_", "__itruediv__", "true_divide", "divide"}
_STOPS = {"linear", "matmul", "__matmul__", "mm", "bmm", "addmm", "baddbmm", "einsum", "conv1d", "conv2d",
          "conv3d", "scaled_dot_product_attention", "layer_norm", "rms_norm"}
_INPLACE_DUNDER = {"__setitem__", "__iadd__", "__isub__", "__imul__", "__itruediv__"}


def _tensors(x) -> list:
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (list, tuple)):
        return [t for item in x for t in _tensors(item)]
    return []


def _dim_arg(node: _Node, pos: int, default=None):
    return node.kwargs.get("dim", node.args[pos] if len(node.args) > pos else default)


def _is_last(dim, ndim: int) -> bool:
    if isinstance(dim, (list, tuple)):
        return len(dim) == 1 and _is_last(dim[0], ndim)
    return isinstance(dim, int) and ndim > 0 and dim % ndim == ndim - 1


def _index_touches_last(idx, ndim: int) -> bool:
    """Does `x[idx]` select, stride or cut the last dim of an ndim-dim x?"""
    items = list(idx) if isinstance(idx, tuple) else [idx]
    while items and items[-1] is None:
        items.pop()
    if Ellipsis in items:
        last = items[-1] if items[-1] is not Ellipsis else None
    elif len([i for i in items if i is not None]) == ndim and items:
        last = items[-1]
    else:
        return False
    if isinstance(last, int):
        return True
    if isinstance(last, slice):
        return not (last.start in (None, 0) and last.stop is None and last.step in (None, 1))
    return isinstance(last, torch.Tensor)


def _channel_op(node: _Node) -> bool:
    """Does this view / split / cat move channels of the last dim (the pairing a rope needs)?"""
    src = node.args[0] if node.args else None
    name = node.name
    if name in ("view_as_complex", "view_as_real"):
        return True
    if name == "__getitem__" and isinstance(src, torch.Tensor):
        return _index_touches_last(node.args[1], src.ndim)
    if name in ("chunk", "split", "tensor_split", "unbind", "narrow", "select") and isinstance(src, torch.Tensor):
        default = 0
        pos = 2 if name in ("chunk", "split", "tensor_split") else 1
        return _is_last(_dim_arg(node, pos, default), src.ndim)
    if name in _CATS:
        parts = _tensors(node.args[0]) if node.args else _tensors(node.kwargs.get("tensors"))
        if not parts:
            return False
        ndim = parts[0].ndim + (1 if name == "stack" else 0)
        return _is_last(_dim_arg(node, 1, 0), ndim)
    if name in _FLIPS and isinstance(src, torch.Tensor):
        dims = node.kwargs.get("dims", node.args[-1] if len(node.args) > 1 else None)
        return _is_last(dims if isinstance(dims, (list, tuple)) else [dims], src.ndim)
    if name in ("view", "reshape", "unflatten", "flatten", "view_as") and isinstance(src, torch.Tensor):
        outs = node.outs
        return bool(outs) and outs[0].ndim > 0 and src.ndim > 0 and outs[0].shape[-1] != src.shape[-1]
    return False


class _Tracker(TorchFunctionMode):
    """One eager run, followed by tensor identity (every tensor seen is kept alive so that
    its id is not reused). Records each op as a `_Node` (its inputs, outputs, module path);
    marks tensors derived from parameters (`param`), weights
    (parameters and casts / views of them alone), residual sums, norm outputs (with their
    casts and views) and the running statistics of a hand-written norm; at each attention
    call walks back from q and k to find their ropes."""

    def __init__(self, params, inputs, current: list):
        super().__init__()
        self.current = current
        self.keep: list = []
        self.seq = 0
        self.producers: dict = collections.defaultdict(list)  # id -> [_Node] that wrote it
        self.param = {id(p) for p in params}
        self.weight = set(self.param)
        self.residual: set = set()
        self.castroot: dict = {}  # id -> id of the tensor it is a cast of
        self.tags: dict = {}  # id -> running-statistic tag of a hand-written norm
        self.normed: dict = {}  # id -> _NormCall: a norm output or a cast / view of one
        self.calls: list = []
        self.ropes: dict = {}  # root id -> [module path, channel-permuted]
        self.keep.extend(params)
        self.keep.extend(inputs)

    # ------------------------------------------------------------------ helpers
    def path(self) -> str:
        return self.current[-1] if self.current else ""

    def croot(self, t) -> int:
        i = id(t)
        return self.castroot.get(i, i)

    def key(self, t):
        """What a normalising multiply normalises: ('c', x) for x - mean(x), else ('x', x)."""
        tag = self.tags.get(id(t))
        if tag and tag[0] == "centered":
            return ("c", tag[1])
        return ("x", self.croot(t))

    def is_table(self, t) -> bool:
        return (isinstance(t, torch.Tensor) and not isinstance(t, torch.nn.Parameter) and id(t) not in self.param
                and (t.is_floating_point() or t.is_complex()) and t.numel() > 1)

    def new_norm(self, rms: bool, x, out) -> None:
        """x: the norm's input (a tensor, or the id of the tensor a hand-written norm reads)."""
        ids = {x, self.castroot.get(x, x)} if isinstance(x, int) else (
            {id(x), self.croot(x)} if isinstance(x, torch.Tensor) else set())
        residual = bool(ids & self.residual)
        call = _NormCall(self.path(), rms, residual)
        self.calls.append(call)
        self.normed[id(out)] = call

    # ------------------------------------------------------------------ the mode
    def __torch_function__(self, func, types_, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = getattr(func, "__name__", "")
        inplace = (name in _INPLACE_DUNDER or (name.endswith("_") and not name.endswith("__"))
                   or isinstance(kwargs.get("out"), torch.Tensor))
        outs = _tensors(out)
        if not inplace:  # `.float()` of an fp32 tensor, `.contiguous()` of a contiguous one: the input itself
            outs = [t for t in outs if not any(t is a for a in _tensors(list(args)))]
        if inplace:
            target = kwargs.get("out") if isinstance(kwargs.get("out"), torch.Tensor) else (args[0] if args else None)
            if isinstance(target, torch.Tensor) and all(t is not target for t in outs):
                outs.append(target)
        if not outs:
            return out
        ins = _tensors(list(args)) + _tensors(list(kwargs.values()))
        self.seq += 1
        node = _Node(self.seq, name, args, kwargs, ins, outs, self.path())
        self.keep.extend(ins)
        self.keep.extend(outs)
        for t in outs:
            self.producers[id(t)].append(node)
            if t._base is not None and inplace:
                self.producers[id(t._base)].append(node)
        self._taint(node)
        try:
            self._analyse(node)
        except Exception:  # a tracker bug must not break the model's own run
            pass
        return out

    def _taint(self, node: _Node) -> None:
        ins, outs = node.ins, node.outs
        if any(id(t) in self.param for t in ins):
            self.param.update(id(t) for t in outs)
        if (node.name in _CASTS or node.name in _VIEWS) and ins and all(id(t) in self.weight for t in ins):
            self.weight.update(id(t) for t in outs)

    def _analyse(self, node: _Node) -> None:
        name, args, outs = node.name, node.args, node.outs
        a0 = args[0] if args else None
        out = outs[0]
        if name in _CASTS and isinstance(a0, torch.Tensor):
            self.castroot[id(out)] = self.croot(a0)
            if id(a0) in self.residual:
                self.residual.add(id(out))
            if id(a0) in self.tags:
                self.tags[id(out)] = self.tags[id(a0)]
        if (name in _CASTS or name in _VIEWS) and isinstance(a0, torch.Tensor) and id(a0) in self.normed:
            for t in outs:
                self.normed[id(t)] = self.normed[id(a0)]
            return
        if name in ("layer_norm", "rms_norm"):
            shape = args[1] if len(args) > 1 else node.kwargs.get("normalized_shape")
            if isinstance(shape, (list, tuple, torch.Size)) and len(shape) == 1:
                self.new_norm(name == "rms_norm", a0, out)
            return
        if name == "scaled_dot_product_attention":
            q = a0 if a0 is not None else node.kwargs.get("query")
            k = args[1] if len(args) > 1 else node.kwargs.get("key")
            for t in (q, k):
                if isinstance(t, torch.Tensor):
                    self._find_ropes(t, node.seq)
            return
        if name in _ADDS and len(args) >= 2 and all(isinstance(a, torch.Tensor) for a in args[:2]):
            self.residual.add(id(out))
        if name in _ADDCMULS:
            self.residual.add(id(out))
            self._factor(out, args[1] if len(args) > 1 else None, args[2] if len(args) > 2 else None)
            return
        if name in _MULS and len(args) >= 2:
            a, b = args[0], args[1]
            if self._normaliser(a, b, "inv", out) or self._normaliser(b, a, "inv", out):
                return
            if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and self.croot(a) == self.croot(b) \
                    and a.shape == b.shape:
                self.tags[id(out)] = ("sq", self.key(a))
                return
            for s, o in ((a, b), (b, a)):
                tag = self.tags.get(id(s)) if isinstance(s, torch.Tensor) else None
                if tag and tag[0] == "ms" and not isinstance(o, torch.Tensor):
                    self.tags[id(out)] = tag  # sum(x²) * (1 / n)
                    return
            self._factor(out, a, b)
            return
        if name in _DIVS and len(args) >= 2:
            if self._normaliser(args[0], args[1], "sqrt", out):
                return
            tag = self.tags.get(id(args[0])) if isinstance(args[0], torch.Tensor) else None
            if tag and tag[0] == "ms" and not isinstance(args[1], torch.Tensor):
                self.tags[id(out)] = tag  # sum(x²) / n
            return
        if name == "__rtruediv__" and isinstance(a0, torch.Tensor):
            tag = self.tags.get(id(a0))
            if tag and tag[0] == "sqrt":
                self.tags[id(out)] = ("inv", tag[1])
            return
        self._statistics(node, a0, out)

    def _statistics(self, node: _Node, a0, out) -> None:
        """Tags of a hand-written norm's running statistics."""
        name, args = node.name, node.args
        if not isinstance(a0, torch.Tensor):
            return
        tag = self.tags.get(id(a0))
        if name in ("pow", "__pow__", "float_power", "square"):
            exp = 2 if name == "square" else (args[1] if len(args) > 1 else node.kwargs.get("exponent"))
            if exp == 2:
                self.tags[id(out)] = ("sq", self.key(a0))
            elif tag and tag[0] == "ms" and exp == -0.5:
                self.tags[id(out)] = ("inv", tag[1])
            elif tag and tag[0] == "ms" and exp == 0.5:
                self.tags[id(out)] = ("sqrt", tag[1])
        elif name in ("mean", "sum", "nanmean"):
            dim = _dim_arg(node, 1)
            if dim is None or not _is_last(dim, a0.ndim):
                return
            if tag and tag[0] == "sq":
                self.tags[id(out)] = ("ms", tag[1])
            elif name == "mean":
                self.tags[id(out)] = ("mean", self.croot(a0))
        elif name in ("var", "var_mean"):
            dim = _dim_arg(node, 1)
            if dim is None or not _is_last(dim, a0.ndim):
                return
            self.tags[id(node.outs[0])] = ("ms", ("c", self.croot(a0)))
            if name == "var_mean" and len(node.outs) > 1:
                self.tags[id(node.outs[1])] = ("mean", self.croot(a0))
        elif name in _SUBS and len(args) >= 2 and isinstance(args[1], torch.Tensor):
            mtag = self.tags.get(id(args[1]))
            if mtag == ("mean", self.croot(a0)):
                self.tags[id(out)] = ("centered", self.croot(a0))
        elif name in _ADDS and tag and tag[0] == "ms":
            other = args[1] if len(args) > 1 else None
            if not isinstance(other, torch.Tensor) or other.numel() == 1:
                self.tags[id(out)] = tag  # + eps
        elif name == "rsqrt" and tag and tag[0] == "ms":
            self.tags[id(out)] = ("inv", tag[1])
        elif name == "sqrt" and tag and tag[0] == "ms":
            self.tags[id(out)] = ("sqrt", tag[1])
        elif name == "reciprocal" and tag and tag[0] == "sqrt":
            self.tags[id(out)] = ("inv", tag[1])

    def _normaliser(self, x, r, want: str, out) -> bool:
        """`x * rsqrt(stat)` / `x / sqrt(stat)` where stat is the mean square of x (or of the
        centred x): a norm call; its output is a norm output."""
        if not (isinstance(x, torch.Tensor) and isinstance(r, torch.Tensor)):
            return False
        tag = self.tags.get(id(r))
        if not tag or tag[0] != want:
            return False
        k = self.key(x)
        if tag[1] != k:
            return False
        self.new_norm(k[0] == "x", k[1], out)
        return True

    def _factor(self, out, a, b) -> None:
        """A product with a norm output as one factor: the affine weight (the product is the
        norm's output), or a modulation (a computed factor that is not a weight)."""
        for s, o in ((a, b), (b, a)):
            call = self.normed.get(id(s)) if isinstance(s, torch.Tensor) else None
            if call is None or not isinstance(o, torch.Tensor):
                continue
            if id(o) in self.weight:
                self.normed[id(out)] = call
            elif id(o) in self.param:
                call.modulated += 1
            return

    # ------------------------------------------------------------------ ropes
    def _find_ropes(self, operand: torch.Tensor, limit: int) -> None:
        """Walk back from an attention operand to the projection (Linear / matmul), a norm
        call or an earlier attention; every multiply by a position table on the way is a
        rope of the tensor its other operand reads."""
        seen_nodes: set = set()
        stack = [(id(operand), limit)]
        seen = set()
        while stack:
            tid, lim = stack.pop()
            if (tid, lim) in seen:
                continue
            seen.add((tid, lim))
            for node in self.producers.get(tid, ()):
                if node.seq >= lim or node.seq in seen_nodes:
                    continue
                seen_nodes.add(node.seq)
                if node.name in _STOPS:
                    continue
                self._table_mul(node)
                for t in node.ins:
                    if id(t) in self.param:
                        stack.append((id(t), node.seq))

    def _table_mul(self, node: _Node) -> None:
        if node.name in _MULS and len(node.args) >= 2:
            pair = node.args[0], node.args[1]
        elif node.name in _ADDCMULS and len(node.args) >= 3:
            pair = node.args[1], node.args[2]
        else:
            return
        for data, table in (pair, pair[::-1]):
            if not (isinstance(data, torch.Tensor) and id(data) in self.param and self.is_table(table)):
                continue
            roots, permuted = self._roots(data, node.seq)
            permuted = permuted or data.is_complex()
            for root in roots:
                entry = self.ropes.setdefault(root, [node.path, False])
                entry[1] = entry[1] or permuted
            return

    def _roots(self, data: torch.Tensor, limit: int):
        """The tensors a rope's operand reads, through views, casts, negations and last-dim
        splits / cats; and whether channels moved on the way."""
        roots, permuted = set(), False
        stack, seen = [(data, limit)], set()
        while stack:
            t, lim = stack.pop()
            if id(t) in seen:
                continue
            seen.add(id(t))
            call = self.normed.get(id(t))
            if call is not None:
                call.roped = True
            prods = [p for p in self.producers.get(id(t), ()) if p.seq < lim]
            node = prods[-1] if prods else None
            walk = node is not None and len(prods) == 1 and (
                node.name in _CASTS or node.name in _VIEWS or node.name in _NEG or node.name in _FLIPS
                or (node.name in _CATS and _channel_op(node)))
            if not walk:
                roots.add(id(t))
                continue
            if _channel_op(node):
                permuted = True
            # the data a view / cast / cat reads: its first argument (not `type_as`'s or `to`'s model)
            srcs = [i for i in _tensors(node.args[0] if node.args else node.kwargs.get("tensors"))
                    if id(i) in self.param]
            if not srcs:
                roots.add(id(t))
            for i in srcs:
                stack.append((i, node.seq))
        return roots, permuted


def count_eager_sites(model: torch.nn.Module, kwargs: dict) -> EagerSites:
    """Run `model(**kwargs)` once in eager and count its norm, modulation and rope sites."""
    current: list = []
    handles = []
    for path, module in model.named_modules():
        if not path:
            continue

        def pre(m, a, p=path):
            current.append(p)

        def post(m, a, out, p=path):
            if current and current[-1] == p:
                current.pop()

        handles.append(module.register_forward_pre_hook(pre))
        handles.append(module.register_forward_hook(post, always_call=True))
    params = list(model.parameters())
    inputs = _tensors(list(kwargs.values()))
    try:
        with torch.no_grad(), _Tracker(params, inputs, current) as tracker:
            model(**kwargs)
    finally:
        for h in handles:
            h.remove()
    norms, modulated, plain = collections.Counter(), collections.Counter(), collections.Counter()
    for c in tracker.calls:
        if c.rms or c.residual or c.modulated or c.roped:
            norms[c.path] += 1
            if c.modulated:
                modulated[c.path] += c.modulated
        else:
            plain[c.path] += 1
    ropes = collections.Counter(path for path, permuted in tracker.ropes.values() if permuted)
    return EagerSites(norms, modulated, ropes, plain)


def _modulating(family: str, variant: str) -> bool:
    """A match that includes an AdaLN modulation (norm_scale_shift variants say "/mod")."""
    return family == "norm_scale_shift" and "/mod" in variant


SILENT = "not fused and no miss reported in this module"


def _kind_hits(report) -> dict:
    """kind -> Counter(module path -> matches of the kind's families that cover it)."""
    covers = {"norm": lambda f, v: f in NORM_FAMILIES, "modulation": _modulating,
              "rope": lambda f, v: f in ROPE_FAMILIES}
    return {kind: collections.Counter(p for f, v, paths in report.sites() if covers[kind](f, v) for p in set(paths))
            for kind in KINDS}


def coverage(eager: EagerSites, report, reused: bool = False) -> dict:
    """Per kind: sites, fused, reported, silent, dead and the unfused sites {module path:
    {count, reason, reported}}.

    A site at path p is fused as often as a match of the kind's families covers p (capped
    by its calls). An unfused site is reported where the report has misses traced in p (as
    many as there are such misses: one miss of a norm + modulation site stands for both
    kinds), else silent. A site whose module has no node in the compiled graph is dead code
    there (its output is unused: e.g. the text stream after the last dual-stream block)
    and is not counted. For a full-model compile (paths are relative to the compiled module).
    `reused`: frames Dynamo resumes after a graph break are compiled once and their code run
    again for the next call of the same function (official Wan's `rope_apply`, for q then k):
    a miss in such a graph stands for every unfused site of its module."""
    present = report.modules()
    misses: dict = {}
    for m in report.misses:
        if m.family in SITE_FAMILIES:
            misses.setdefault(m.module, []).append(m.reason)
    hits = _kind_hits(report)
    table = {}
    for kind in KINDS:
        entry = {"sites": 0, "fused": 0, "reported": 0, "silent": 0, "dead": 0, "missed": {}}
        for p, n in sorted(eager.counter(kind).items()):
            if p not in present:
                entry["dead"] += n
                continue
            entry["sites"] += n
            entry["fused"] += min(n, hits[kind][p])
            unfused = n - min(n, hits[kind][p])
            if unfused:
                reasons = misses.get(p, [])
                reported = min(unfused, unfused if reused and reasons else len(reasons))
                entry["reported"] += reported
                entry["silent"] += unfused - reported
                entry["missed"][p] = {"count": unfused, "reported": reported,
                                      "reason": "; ".join(dict.fromkeys(reasons)) or SILENT}
        table[kind] = entry
    return table


def honesty(eager: EagerSites, report, reused: bool = False) -> dict:
    """The report checked against the eager sites: per kind {sites, fused, reported, silent}
    (honest: sites == fused + reported, silent == 0), plus the report's own claims that no
    eager site backs: `stray_misses` (misses of rms_norm / norm_scale_shift / qk_norm_rope
    traced in a module with no site of any kind) and `phantom_matches` (their matches that
    cover no norm or rope site)."""
    table = coverage(eager, report, reused)
    paths = {p for kind in KINDS for p in eager.counter(kind)}
    stray = [(m.family, m.module, m.reason) for m in report.misses
             if m.family in NORM_ROPE_FAMILIES and m.module not in paths]
    site_paths = set(eager.norms) | set(eager.ropes)
    phantom = [(f, v, ps) for f, v, ps in report.sites()
               if f in NORM_ROPE_FAMILIES and not site_paths & set(ps)]
    out = {k: {key: table[k][key] for key in ("sites", "fused", "reported", "silent")} for k in KINDS}
    out["stray_misses"], out["phantom_matches"] = stray, phantom
    out["misses"] = len(report.misses)
    return out


def is_honest(h: dict) -> bool:
    return (all(h[k]["sites"] == h[k]["fused"] + h[k]["reported"] for k in KINDS)
            and not h["stray_misses"] and not h["phantom_matches"])


def percent(table: dict) -> float:
    sites = sum(t["sites"] for t in table.values())
    return 100.0 * sum(t["fused"] for t in table.values()) / max(sites, 1)


def format_table(name: str, table: dict, eager: EagerSites | None = None) -> str:
    cells = ", ".join(f"{k} {t['fused']}/{t['sites']}" for k, t in table.items())
    dead = sum(t["dead"] for t in table.values())
    silent = sum(t["silent"] for t in table.values())
    lines = [f"{name}: {cells} -> {percent(table):.1f}% of sites fused"
             + (f" ({dead} dead in the compiled graph, not counted)" if dead else "")
             + (f"; {silent} unfused with no miss reported" if silent else "")]
    for k, t in table.items():
        for p, miss in t["missed"].items():
            count = f" (x{miss['count']})" if miss["count"] > 1 else ""
            tag = "missed" if miss["reported"] == miss["count"] else "SILENT"
            lines.append(f"  {tag} {k}: {p}{count}: {miss['reason']}")
    if eager is not None and eager.plain:
        lines.append("  plain LayerNorms (no family is for them, not sites): "
                     + ", ".join(f"{p}" + (f" (x{n})" if n > 1 else "") for p, n in sorted(eager.plain.items())))
    return "\n".join(lines)
