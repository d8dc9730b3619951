"""The one post-grad pass: apply each enabled family's patterns with the chosen lowering,
record matches and misses, and restore the graph if anything fails.

Installed through Inductor's `post_grad_custom_post_pass`; its `uuid()` hashes the
pattern/lowering/pass sources and the frozen config, so Inductor's FX-graph cache is
keyed by exactly what shapes the rewrite.
"""
from __future__ import annotations

import functools
import hashlib
import logging
import pathlib
from typing import Optional

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass
from torch._inductor.pattern_matcher import stable_topological_sort

from .._version import __version__
from ..lowering import attention_kernel, load_lowering
from ..patterns import available_families
from ..patterns.common import PassContext, inserted_by, module_path, source_of
from .canonicalize import canonicalize
from .config import FusionConfig
from .device import detect_device
from .report import GraphRecord, Miss, add_record, save_record

log = logging.getLogger("difffuse")
_PKG = pathlib.Path(__file__).resolve().parent.parent


@functools.lru_cache(None)
def source_hash() -> str:
    """sha256 over the pass, pattern and lowering sources and the versions."""
    h = hashlib.sha256(f"{__version__};{torch.__version__}".encode())
    for sub in ("fusion_pass", "patterns", "lowering"):
        for path in sorted((_PKG / sub).rglob("*.py")):
            h.update(str(path.relative_to(_PKG)).encode())
            h.update(path.read_bytes())
    return h.hexdigest()


_CTX: list[PassContext] = []


def _current() -> PassContext:
    return _CTX[-1]


@functools.lru_cache(None)
def _family_pass(name: str):
    return available_families()[name].build_pass(_current)


def snapshot(graph: torch.fx.Graph) -> torch.fx.Graph:
    snap = torch.fx.Graph()
    out = snap.graph_copy(graph, {})
    snap.output(out)
    return snap


def restore(graph: torch.fx.Graph, snap: torch.fx.Graph) -> None:
    """Put `snap`'s nodes back into `graph`, keeping graph's placeholders."""
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    others = [n for n in graph.nodes if n.op != "placeholder"]
    for n in others:
        n.args, n.kwargs = (), {}
    for n in reversed(others):
        graph.erase_node(n)
    env = dict(zip([n for n in snap.nodes if n.op == "placeholder"], placeholders))
    for n in snap.nodes:
        if n.op != "placeholder":
            env[n] = graph.node_copy(n, lambda a: env[a])


def _kernel_label(node: torch.fx.Node) -> Optional[str]:
    """What runs for an inserted node: a non-aten op (with its `kernel` argument, e.g. the
    flash-attention kernel), or a Triton kernel launched by the generated code."""
    target = node.target
    if target is torch.ops.higher_order.triton_kernel_wrapper_functional:
        try:
            from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table

            kernel = kernel_side_table.get_kernel(node.kwargs["kernel_idx"])
            return f"triton:{getattr(kernel, '__name__', None) or kernel.fn.__name__}"
        except Exception:  # noqa: BLE001
            return "triton"
    if isinstance(target, torch._ops.OpOverload) and target.namespace not in ("aten", "prims"):
        names = [a.name for a in target._schema.arguments]
        at = names.index("kernel") if "kernel" in names else None  # an op that names its kernel
        kernel = node.kwargs.get("kernel", node.args[at] if at is not None and at < len(node.args) else None)
        return f"{target.name()}[{kernel}]" if isinstance(kernel, str) else target.name()
    return None


def kernel_note(graph: torch.fx.Graph) -> Optional[str]:
    """`kernels: family -> what runs xN, ...` for the replacements in the graph (which
    flash-attention kernel, Triton or the JIT qk kernel), or None if nothing was rewritten.
    N counts op calls, not matches: one match can make several (a q/k norm + rope over a joint
    text+image sequence makes one call per stream); the report says so where they differ."""
    counts: dict = {}
    for n in graph.nodes:
        family = inserted_by(n)
        label = _kernel_label(n) if family and n.op == "call_function" else None
        if label:
            counts[(family[0], label)] = counts.get((family[0], label), 0) + 1
    if not counts:
        return None
    return "kernels: " + ", ".join(f"{f} -> {k} x{c}" for (f, k), c in sorted(counts.items()))


class DifffusePass(CustomGraphPass):
    """Rewrite a post-grad graph's fusible subgraphs into `difffuse::*` ops."""

    def __init__(self, cfg: FusionConfig, graph_name: str = "graph", record_key: Optional[str] = None):
        self.cfg = cfg
        self.graph_name = graph_name
        self.record_key = record_key
        self.record: Optional[GraphRecord] = None  # what the last run of the pass recorded (None: not run)

    def uuid(self) -> str:
        return hashlib.sha256(f"{source_hash()};{self.cfg.key()}".encode()).hexdigest()

    def __call__(self, graph: torch.fx.Graph) -> None:
        lowering = detect_device(graph) if self.cfg.lowering == "auto" else self.cfg.lowering
        name, module = load_lowering(lowering)
        rec = GraphRecord(graph=self.graph_name, lowering=name,
                          modules=sorted({p for p in map(module_path, graph.nodes) if p}))
        if name != lowering:
            rec.notes.append(f"{lowering} lowering unavailable: fell back to {name}")
        if module is None:
            rec.notes.append(f"{name}: no rewrite, plain Inductor")
        else:
            with attention_kernel(self.cfg.attention_kernel):
                self._apply(graph, name, module, rec)
        add_record(rec)
        self.record = rec
        if self.record_key:
            save_record(self.record_key, rec)

    def _families(self, families: dict, module) -> list[str]:
        """Enabled families that have patterns and an implementation in this lowering."""
        return [f for f in self.cfg.patterns if f in families and f in module.IMPLS]

    def _apply(self, graph, name, module, rec: GraphRecord) -> None:
        snap = snapshot(graph)
        families = available_families()
        ctx = PassContext(name, module, rec)
        _CTX.append(ctx)
        family = "?"
        try:
            canonicalize(graph)
            for family in self._families(families, module):
                _family_pass(family).apply(graph)
                # a two-output match is inserted before its first output, which can precede
                # the definition of an input (e.g. a modulation chunk): restore the order
                stable_topological_sort(graph)
            graph.eliminate_dead_code()
            graph.lint()
        except Exception as exc:  # never break a user's compile
            restore(graph, snap)
            rec.matches.clear()
            rec.variants.clear()
            rec.sites.clear()
            err = str(exc).splitlines()[0][:300] if str(exc) else ""
            msg = f"pass failed in {family}: {type(exc).__name__}: {err}; graph left to plain Inductor"
            rec.notes.append(msg)
            log.warning("difffuse: %s", msg)
            return
        finally:
            _CTX.pop()
        note = kernel_note(graph)
        if note:
            rec.notes.append(note)
        for family in (f for f in self.cfg.patterns if f in families):
            default = ("no pattern variant matched this spelling" if family in module.IMPLS
                       else f"the {name} lowering has no {family} kernel: left to Inductor")
            for node in families[family].anchors(graph):
                reason = ctx.rejected.get(node) or node.meta.get("difffuse_miss_reason") or default
                rec.misses.append(Miss(family, reason, source_of(node), module_path(node)))
