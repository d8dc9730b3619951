"""What every pattern family shares: aten shorthands, the family base class that
registers a table of variants with Inductor's pattern matcher, and the checks on a
match (dims, casts, broadcasts) that the families use."""
from __future__ import annotations

import dataclasses
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


def is_upcast(node: torch.fx.Node) -> bool:
    """A convert node that loses nothing: it widens (or keeps) its input's float type."""
    src, dst = val(node.args[0]), node.args[1]
    if not isinstance(src, torch.Tensor):
        return False
    if src.dtype == dst:
        return True
    return dst in (torch.float32, torch.float64) and src.dtype in (
        torch.float16, torch.bfloat16, torch.float32) and (
        torch.finfo(dst).bits >= torch.finfo(src.dtype).bits)


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
    """The user's source line for a node, from its stack trace."""
    trace = node.meta.get("stack_trace") or ""
    lines = [ln.strip() for ln in trace.strip().splitlines() if ln.strip()]
    for i in range(len(lines) - 1, -1, -1):
        if lines[i].startswith("File "):
            code = lines[i + 1] if i + 1 < len(lines) else ""
            return f"{lines[i]}: {code}".replace("File ", "", 1)
    return ""


def module_path(node: torch.fx.Node) -> str:
    """The innermost user module a node was traced in, as a dotted path from the compiled
    module ("transformer_blocks.0.attn.norm_q"); "" if dynamo recorded none."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    raw = list(stack.values())[-1][0]
    parts = re.findall(r"\['([^']+)'\]|\[(\d+)\]|\.([A-Za-z0-9_]+)", raw)
    names = [a or b or c for a, b, c in parts]
    return ".".join(n for n in names if n not in ("self", "__dict__", "_modules"))


def module_paths(nodes) -> list[str]:
    """Sorted distinct module paths of `nodes` (what a match covers in the user's model)."""
    return sorted({p for p in map(module_path, nodes) if p})


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

    def supports(self, family: str, site: dict) -> Optional[str]:
        return self.module.supports(family, site)

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
                n.meta["difffuse_replacement"] = True


def inserted(node: torch.fx.Node) -> bool:
    """The node was put there by a difffuse replacement."""
    return bool(node.meta.get("difffuse_replacement"))


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

    # ------------------------------------------------------------------
    def build_pass(self, get_ctx: Callable[[], PassContext]) -> PatternMatcherPass:
        """One PatternMatcherPass holding every variant of the table, in table order."""
        pm = PatternMatcherPass(pass_name=f"difffuse_{self.name}")
        for variant in self.variants():
            self._register(pm, variant, get_ctx)
        return pm

    def _register(self, pm, variant: Variant, get_ctx) -> None:
        family = self

        def extra_check(match: Match) -> bool:
            ctx = get_ctx()
            site = family.check(match, variant)
            if isinstance(site, dict):
                # a site may be several op calls (`calls`); each must suit the lowering, judged on
                # the tables it will get (`check_tables`, when the replacement builds them)
                reason = next((r for call in site.get("calls", [site])
                               if (r := ctx.supports(family.name, {**call, **call.get("check_tables", {})}))), None)
                if reason is None:
                    match._difffuse_site = site
                    return True
                site = f"{ctx.lowering} lowering does not take it: {reason}"
            anchor = family.anchor_of(match)
            if anchor is not None:
                ctx.rejected.setdefault(anchor, site)
            return False

        def handler(match: Match, *args, **kwargs) -> None:
            ctx = get_ctx()
            site = match._difffuse_site
            modules = module_paths(list(match.nodes) + list(site.get("norm_nodes", ())))
            family.replace(match, variant, site, ctx)
            ctx.record.add_match(family.name, variant.name, modules)

        register_graph_pattern(variant.pattern, extra_check=extra_check, pass_dict=pm)(handler)
