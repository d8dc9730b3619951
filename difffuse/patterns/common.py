"""What every pattern family shares: aten shorthands, the family base class that
registers a table of variants with Inductor's pattern matcher, and the checks on a
match (dims, casts, broadcasts) that the families use."""
from __future__ import annotations

import dataclasses
import logging
import operator
import os
import re
from typing import Any, Callable, Optional

import torch
from torch._inductor.pattern_matcher import (
    CallFunction,
    Ignored,
    KeywordArg,
    Match,
    PatternMatcherPass,
    register_graph_pattern,
)
from torch._inductor.pattern_matcher import _TargetArgsExpr

from . import module_paths as _paths
from ..lowering.sites import SITE_TYPES, TensorSpec, specs

log = logging.getLogger("difffuse")

aten = torch.ops.aten
prims = torch.ops.prims
CONVERT = prims.convert_element_type.default
VIEW_OPS = (aten.view.default, aten.reshape.default, aten._unsafe_view.default)


def cast(p, name: Optional[str] = None, users: int = 1):
    """`prims.convert_element_type(p, dtype)`; the dtype is read from the node later."""
    return CallFunction(CONVERT, p, KeywordArg(name) if name else Ignored(), _users=users)


def val(node) -> Any:
    """The fake tensor (or Python value) a node computes."""
    return node.meta.get("val") if isinstance(node, torch.fx.Node) else node


# the dtypes a fused op computes with and returns; a cast to or from anything else (an
# integer, bool, fp8, complex) changes values in ways no op reproduces
FLOAT_TYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def narrows(src: torch.dtype, dst: torch.dtype) -> bool:
    """A float-to-float cast that can change values (fewer bits, or fp16 <-> bf16)."""
    if src == dst:
        return False
    return torch.finfo(dst).bits < torch.finfo(src).bits or {src, dst} == {torch.float16, torch.bfloat16}


def is_upcast(node: torch.fx.Node) -> bool:
    """A convert node that loses nothing: it widens (or keeps) its input's float type."""
    src, dst = val(node.args[0]), node.args[1]
    if not isinstance(src, torch.Tensor):
        return False
    if src.dtype == dst:
        return True
    return src.dtype in FLOAT_TYPES and dst in FLOAT_TYPES and not narrows(src.dtype, dst)


def reduces_last_dim(dims, ndim: int) -> bool:
    """Reduction dims name exactly the last dim (post-grad writes them as positive dims)."""
    return isinstance(dims, (list, tuple)) and len(dims) == 1 and dims[0] in (ndim - 1, -1)


def is_last_dim_vector(w: Any, d) -> bool:
    """w broadcasts along the last dim only: shape [..1.., D]."""
    t = val(w)
    return (isinstance(t, torch.Tensor) and t.ndim >= 1 and t.shape[-1] == d
            and all(s == 1 for s in t.shape[:-1]))


def is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def source_of(node: torch.fx.Node) -> str:
    """The user's source line for a node: the innermost frame of its own stack trace that is
    not torch's (an `nn.RMSNorm` traces into torch/nn/functional.py: the line the user wrote
    is its caller), else the innermost frame. A node with no stack trace (an Inductor pattern
    re-traced it: only the replacement's output keeps the replaced node's meta) takes the
    line of the nearest node downstream that has one (the output of that replacement)."""
    for n in _downstream(node):
        trace = n.meta.get("stack_trace") or ""
        lines = [ln.strip() for ln in trace.strip().splitlines() if ln.strip()]
        frames = [(ln, lines[i + 1] if i + 1 < len(lines) and not lines[i + 1].startswith("File ") else "")
                  for i, ln in enumerate(lines) if ln.startswith("File ")]
        if frames:
            where, code = next((f for f in reversed(frames) if not _in_torch(f[0])), frames[-1])
            return f"{where}: {code}".replace("File ", "", 1)
    return ""


def _downstream(node, limit: int = 8):
    """node, then the nodes it feeds, nearest first (at most `limit`)."""
    if not isinstance(node, torch.fx.Node):
        return
    seen, todo = set(), [node]
    while todo and len(seen) < limit:
        n = todo.pop(0)
        if n in seen or n.op == "output":
            continue
        seen.add(n)
        yield n
        todo += list(n.users)


_TORCH_DIR = os.path.dirname(torch.__file__) + os.sep


def _in_torch(frame_line: str) -> bool:
    """A stack-trace frame line (`File "path", line N, in f`) in torch's own sources."""
    m = re.match(r'File "([^"]+)"', frame_line)
    return bool(m) and os.path.abspath(m.group(1)).startswith(_TORCH_DIR)


def module_path(node: torch.fx.Node) -> str:
    """The innermost user module a node was traced in, as a dotted path from the compiled
    module ("transformer_blocks.0.attn.norm_q"; "" for the compiled module itself or where
    Dynamo recorded none). Also right in a frame Dynamo compiled on its own or resumed after
    a graph break, whose names are relative to that frame, and for any ModuleDict key
    ('2-1'): see `patterns.module_paths.ModuleNamer`."""
    namer = _paths.module_namer(node.graph)
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:  # code in the traced frame's own method (a placeholder or output is in none)
        return namer.own or "" if node.op.startswith("call") else ""
    key, entry = list(stack.items())[-1]
    source = entry[0] if isinstance(entry, (tuple, list)) and entry else str(entry)
    return namer.path(str(key), str(source))


def module_paths(nodes) -> list[str]:
    """Sorted distinct module paths of `nodes` (what a match covers in the user's model)."""
    return sorted({p for p in map(module_path, nodes) if p})


def from_graph_input(node) -> bool:
    """`node` (through views and casts) is an input of this graph that a previous graph or
    eager code computed: a placeholder that Dynamo fed from a local of the traced frame (not a
    parameter, buffer or global), in a frame Dynamo resumed after a graph break or compiled
    on its own below the compiled module's forward. So whatever produced it (a norm before a
    rope) sits on the other side of a graph break. False where that is not known (a model
    input, a graph compiled outside a Dynamo trace)."""
    while isinstance(node, torch.fx.Node) and (node.target in _VIEWS or node.target == CONVERT):
        node = node.args[0]
    if not isinstance(node, torch.fx.Node) or node.op != "placeholder":
        return False
    namer = _paths.module_namer(node.graph)
    desc = node.meta.get("desc")
    index = getattr(desc, "idx", None)
    if not isinstance(index, int):  # no AOT input descriptor: its position among the placeholders
        index = next(i for i, p in enumerate(node.graph.find_nodes(op="placeholder")) if p is node)
    source = namer.input_source(index)
    if not source or not namer.resumed:
        return False
    base, steps = _paths.source_steps(source)
    return source.startswith("L[") and base is not None and not steps


# ------------------------------------------------------------------ proofs every match needs
def unnamed_kwargs_reason(match: Match, read: tuple = ()) -> Optional[str]:
    """Inductor's matcher ignores node kwargs a pattern does not name (`add(a, b, alpha=2)`
    matches a pattern for `add(a, b)`; `mean(x, dims, True, dtype=...)` one for the mean).
    Every matched node's unnamed kwargs must hold their schema defaults, except those in
    `read`: kwargs the family's check reads from the node itself (attention's scale, mask)."""
    for pat, node in match.ctx.pattern_to_node.items():
        if not (isinstance(pat, _TargetArgsExpr) and isinstance(node, torch.fx.Node)) or not node.kwargs:
            continue
        schema = getattr(node.target, "_schema", None)
        defaults = {a.name: a.default_value for a in schema.arguments if a.has_default_value()} if schema else {}
        for key, value in node.kwargs.items():
            if key in pat.kwargs or key in read:
                continue
            if key not in defaults or not _same_constant(value, defaults[key]):
                return f"{_op_name(node)} has {key}={value!r}, which the fused op does not compute"
    return None


def _same_constant(a, b) -> bool:
    try:
        return type(a) is type(b) and a == b or (is_number(a) and is_number(b) and float(a) == float(b))
    except Exception:  # noqa: BLE001  (incomparable values are not the default)
        return False


def _op_name(node: torch.fx.Node) -> str:
    return str(getattr(node.target, "__name__", node.target))


def output_nodes(match: Match) -> list:
    return [n for n in match.output_nodes() if isinstance(n, torch.fx.Node)]


def casts_reason(nodes, out_dtypes) -> Optional[str]:
    """Every cast in a match, checked for what it does to values: to and from float types
    only; one that narrows must round to a dtype the op rounds to as well (an output's)."""
    for n in nodes:
        if n.target != CONVERT:
            continue
        src, dst = val(n.args[0]), n.args[1]
        if not isinstance(src, torch.Tensor) or src.dtype not in FLOAT_TYPES or dst not in FLOAT_TYPES:
            what = getattr(src, "dtype", src)
            return f"a cast from {what} to {dst}: the fused op computes in floating point"
        if narrows(src.dtype, dst) and dst not in out_dtypes:
            return f"a cast from {src.dtype} to {dst} rounds where the fused op does not ({sorted(map(str, out_dtypes))} out)"
    return None


def output_values(match: Match) -> list:
    """What the match's outputs compute; of a multi-output node (attention's (out, lse, ...)),
    the values the graph reads through getitem."""
    found = []
    for n in output_nodes(match):
        v = val(n)
        if isinstance(v, (tuple, list)):
            found += [val(u) for u in n.users if u.target == operator.getitem]
        else:
            found.append(v)
    return found


def match_reason(match: Match, read_kwargs: tuple = ()) -> Optional[str]:
    """The proofs shared by every family, made before the family's own check."""
    outs = output_values(match)
    out_dtypes = {t.dtype for t in outs if isinstance(t, torch.Tensor)}
    if any(not isinstance(t, torch.Tensor) or t.dtype not in FLOAT_TYPES for t in outs):
        return "an output is not a floating-point tensor"
    return unnamed_kwargs_reason(match, read_kwargs) or casts_reason(match.nodes, out_dtypes)


def _inputs(site: dict) -> list[torch.fx.Node]:
    """The graph nodes a replacement reads (every fx Node in the site, `calls` included)."""
    found = []
    for key, v in site.items():
        if key in ("norm_nodes", "check_tables"):
            continue
        for x in (v if isinstance(v, (list, tuple)) else [v]):
            if isinstance(x, torch.fx.Node):
                found.append(x)
            elif isinstance(x, dict):
                found += _inputs(x)
    return found


def dependency_reason(match: Match, site: dict) -> Optional[str]:
    """A replacement computes its outputs from its inputs: no input may be computed from
    the nodes it replaces (`n * (1 + r*0.5) + shift` with r the site's own residual sum)."""
    covered = set(match.nodes) | set(site.get("norm_nodes", ()))
    keys = [n._sort_key for n in covered if hasattr(n, "_sort_key")]
    first = min(keys) if len(keys) == len(covered) and keys else None
    seen: set = set()
    for start in _inputs(site):
        stack = [start]
        while stack:
            n = stack.pop()
            if n in seen:
                continue
            seen.add(n)
            if n in covered:
                return f"an operand ({start.name}) is computed from the site's own nodes ({n.name})"
            if first is not None and hasattr(n, "_sort_key") and n._sort_key < first:
                continue  # earlier than every covered node: cannot depend on one
            stack.extend(n.all_input_nodes)
    return None


_VIEWS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.squeeze.dim,
          aten.squeeze.dims, aten.squeeze.default, aten.unsqueeze.default, aten.expand.default,
          aten.permute.default, aten.slice.Tensor, aten.select.int, aten.split.Tensor,
          aten.split_with_sizes.default, aten.unbind.int, aten.chunk.default, operator.getitem}


def is_computed(node) -> bool:
    """The graph computes node's value (walking back through views and splits, it is not a
    graph input or parameter): a lowering may prefer to let Inductor fuse that computation."""
    while isinstance(node, torch.fx.Node) and node.target in _VIEWS:
        node = node.args[0]
    return isinstance(node, torch.fx.Node) and node.op == "call_function"


def spec(x, computed=None) -> Optional[TensorSpec]:
    """The TensorSpec of a node (or fake tensor) an op call will receive."""
    return TensorSpec.of(val(x), is_computed(x) if computed is None else computed)


def typed_site(family: str, site: dict):
    """The typed record (lowering/sites.py) of one op call, from a check's site dict."""
    cls = SITE_TYPES[family]
    args = {}
    for f in dataclasses.fields(cls):
        if f.name not in site:
            continue
        v = site[f.name]
        args[f.name] = spec(v) if isinstance(v, (torch.fx.Node, torch.Tensor)) else v
    return cls(**args)


def left_by(graph, family: str) -> list:
    """Anchors `family` left unfused when its pass ran, kept on the graph (a later family may
    rewrite part of such a site, so nothing of it may be left to find at report time): the
    ropes a rope family turned away, the RMSNorm + modulation sites norm_scale_shift did."""
    key = f"_difffuse_left_{family}"
    if not hasattr(graph, key):
        setattr(graph, key, [])
    return getattr(graph, key)


def zero_size_reason(records) -> Optional[str]:
    for rec in records:
        for t in specs(rec):
            if t.has_zero_dim():
                return f"zero-size operand {tuple(t.shape)}: left to Inductor"
    return None


@dataclasses.dataclass
class Variant:
    """One spelling of a family: its pattern and a name the report counts it under."""
    name: str
    pattern: Any
    info: dict = dataclasses.field(default_factory=dict)


class PassContext:
    """Per-run state shared by the families: the lowering, the record, the rejections."""

    def __init__(self, lowering: str, module, record):
        self.lowering = lowering
        self.module = module
        self.record = record
        self.rejected: dict[torch.fx.Node, str] = {}
        self.current: tuple = ("?", "?")  # (family, variant) whose replacement is being built

    def supports(self, site) -> Optional[str]:
        """The lowering's one eligibility predicate, on a typed site record."""
        return self.module.supports(site)

    def impl(self, family: str) -> Callable:
        return self.module.IMPLS[family]

    def replace(self, match: Match, fn: Callable, args: list) -> None:
        """match.replace_by_example(fn, args), traced the way the lowering asks
        (`trace_replacement`, e.g. functionalized so Triton kernels become HOP nodes),
        tagging every inserted node so `anchors` never reports our own code as a miss."""
        graph = match.graph
        before = set(graph.nodes)
        match.replace_by_example(fn, args, trace_fn=getattr(self.module, "trace_replacement", None))
        for n in graph.nodes:
            if n not in before:
                n.meta["difffuse_replacement"] = self.current


def inserted(node: torch.fx.Node) -> bool:
    """The node was put there by a difffuse replacement."""
    return bool(node.meta.get("difffuse_replacement"))


def inserted_by(node) -> tuple:
    """(family, variant) of the replacement that put node there, else ()."""
    return tuple(node.meta.get("difffuse_replacement") or ()) if isinstance(node, torch.fx.Node) else ()


class Family:
    """A pattern family: `variants()` is its table; `check` turns a match into the
    op's arguments (a dict) or a reason string; `replace` builds the fused call;
    `anchors` finds nodes that still look like the family after the pass (misses)."""

    name: str = ""

    def variants(self) -> list[Variant]:
        raise NotImplementedError

    def check(self, match: Match, variant: Variant) -> dict | str:
        raise NotImplementedError

    def replace(self, match: Match, variant: Variant, site: dict, ctx: PassContext) -> None:
        raise NotImplementedError

    def anchors(self, graph: torch.fx.Graph) -> list[torch.fx.Node]:
        return []

    def anchor_of(self, match: Match) -> Optional[torch.fx.Node]:
        """The node a rejection is recorded against (one `anchors` would report)."""
        return None

    def typed(self, site: dict) -> list:
        """The typed records of the op calls a site becomes (one, or one per `calls` entry);
        `check_tables` holds operands the replacement builds (judged as the op will get them)."""
        return [typed_site(self.name, {**call, **call.get("check_tables", {})}) for call in site.get("calls", [site])]

    # ------------------------------------------------------------------
    def build_pass(self, get_ctx: Callable[[], PassContext]) -> PatternMatcherPass:
        """One PatternMatcherPass holding every variant of the table, in table order."""
        pm = PatternMatcherPass(pass_name=f"difffuse_{self.name}")
        for variant in self.variants():
            self._register(pm, variant, get_ctx)
        return pm

    def judge(self, match: Match, variant: Variant, ctx: PassContext) -> dict | str:
        """The site a match becomes, or why it is not one: the shared proofs, the family's
        check, then the lowering's eligibility on the typed records. Never raises: a check
        that fails on an unforeseen graph turns the site away with the error as its reason."""
        try:
            site = match_reason(match, variant.info.get("reads_kwargs", ())) or self.check(match, variant)
            if isinstance(site, str):
                return site
            reason = dependency_reason(match, site)
            if reason:
                return reason
            records = self.typed(site)
            reason = zero_size_reason(records)
            if reason:
                return reason
            reason = next((r for r in map(ctx.supports, records) if r), None)
            if reason:
                return f"{ctx.lowering} lowering does not take it: {reason}"
            return site
        except Exception as exc:  # noqa: BLE001  (a bad site is a miss, never an aborted pass)
            log.warning("difffuse: %s check failed on a site (%s: %s); left to Inductor", self.name,
                        type(exc).__name__, exc)
            return f"internal error in the {self.name} check ({type(exc).__name__}: {exc}); left to Inductor"

    def _register(self, pm, variant: Variant, get_ctx) -> None:
        family = self

        def extra_check(match: Match) -> bool:
            ctx = get_ctx()
            site = family.judge(match, variant, ctx)
            if isinstance(site, dict):
                match._difffuse_site = site
                return True
            anchor = family.anchor_of(match)
            if anchor is not None:
                ctx.rejected.setdefault(anchor, site)
            return False

        def handler(match: Match, *args, **kwargs) -> None:
            ctx = get_ctx()
            site = match._difffuse_site
            modules = module_paths(list(match.nodes) + list(site.get("norm_nodes", ())))
            before = list(match.graph.nodes)
            ctx.current = (family.name, variant.name)
            try:
                family.replace(match, variant, site, ctx)
            except Exception as exc:  # noqa: BLE001
                if list(match.graph.nodes) != before:
                    raise  # the graph is half-rewritten: the pass restores its snapshot
                # the replacement failed before touching the graph (tracing it): this site
                # stays as it is, reported; the rest of the graph still fuses
                reason = f"the {ctx.lowering} replacement could not be built ({type(exc).__name__}: {exc})"
                log.warning("difffuse: %s: %s; left to Inductor", family.name, reason)
                anchor = family.anchor_of(match)
                if anchor is not None:
                    ctx.rejected.setdefault(anchor, reason)
                return
            ctx.record.add_match(family.name, variant.name, modules)

        register_graph_pattern(variant.pattern, extra_check=extra_check, pass_dict=pm)(handler)
