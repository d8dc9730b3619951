"""Match counts as data: what each compiled graph's pass did, read by `difffuse.report()`
and the tests. Records are kept in memory and on disk beside Inductor's cache, keyed as
Inductor keys the compiled graph (see `fusion_pass.backend`), so a warm-cache compile
(which skips the pass) reports the matches as first recorded. A cached graph whose record
is missing has *unknown* counts: the report prints `?` for it and the totals refuse to
pretend it matched nothing (`UnknownCountsError`)."""
from __future__ import annotations

import collections
import dataclasses
import json
import logging
import os
import re
import sys
import tempfile
import weakref
from typing import Optional

log = logging.getLogger("difffuse")


@dataclasses.dataclass
class Miss:
    family: str
    reason: str
    source: str = ""
    module: str = ""  # the module path it was traced in (see patterns.common.module_path)


class UnknownCountsError(LookupError):
    """A report total was asked for while some graph's counts are unknown: Inductor's cache
    answered for that graph (so the difffuse pass did not run) and no record of what the pass
    first did was found. Returning 0 or [] for such a graph would be a lie."""


@dataclasses.dataclass
class GraphRecord:
    """What the pass did to one compiled graph.

    `cached`: the pass did not run here (Inductor's FX-graph or AOTAutograd cache answered);
    the fields are as first recorded. `unknown`: cached and no record was found: matches,
    variants, misses, sites and modules are empty because they are *unknown*, not zero."""

    graph: str
    lowering: str
    matches: dict = dataclasses.field(default_factory=dict)  # "family" -> count
    variants: dict = dataclasses.field(default_factory=dict)  # "family:variant" -> count
    misses: list = dataclasses.field(default_factory=list)
    sites: list = dataclasses.field(default_factory=list)  # [family, variant, [module paths]] per match
    modules: list = dataclasses.field(default_factory=list)  # module paths with a node in the graph
    notes: list = dataclasses.field(default_factory=list)
    cached: bool = False
    unknown: bool = False

    def add_match(self, family: str, variant: str, modules: Optional[list] = None) -> None:
        self.matches[family] = self.matches.get(family, 0) + 1
        self.sites.append([family, variant, list(modules or [])])
        key = f"{family}:{variant}"
        self.variants[key] = self.variants.get(key, 0) + 1

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["misses"] = [dataclasses.asdict(m) for m in self.misses]
        return d

    @classmethod
    def from_json(cls, d: dict) -> "GraphRecord":
        d = dict(d)
        d["misses"] = [Miss(**m) for m in d.get("misses", [])]
        return cls(**d)


_RECORDS: list[GraphRecord] = []


def add_record(rec: GraphRecord) -> None:
    _RECORDS.append(rec)
    if rec.unknown:
        log.info("difffuse: graph %s lowering=%s matches: unknown (Inductor cache hit, no difffuse record)",
                 rec.graph, rec.lowering)
        return
    total = sum(rec.matches.values())
    per = ", ".join(f"{k}={v}" for k, v in sorted(rec.matches.items())) or "none"
    log.info("difffuse: graph %s lowering=%s matches: %s (%d), misses: %d%s", rec.graph,
             rec.lowering, per, total, len(rec.misses), " [from cache]" if rec.cached else "")


def reset() -> None:
    """Forget the recorded compilations."""
    _RECORDS.clear()


class Report:
    """What the recorded compilations did: per graph and in total, matches per family and
    lowering, and every miss with its reason and source line.

    Graphs whose counts are unknown (listed by `unknown`: an Inductor cache hit with no
    difffuse record) make every total — `matches()`, `variants()`, `sites()`, `modules()`,
    `misses`, `by_lowering()` — raise `UnknownCountsError` instead of counting them as 0.
    `known()` is the report restricted to the other graphs, for a deliberate partial answer.
    `str(report)` never raises: it prints `?` for unknown counts."""

    def __init__(self, records: list[GraphRecord]):
        self.graphs = list(records)

    @property
    def unknown(self) -> list[str]:
        """Names of the graphs whose counts are unknown (cached, no record found)."""
        return [g.graph for g in self.graphs if g.unknown]

    def known(self) -> "Report":
        """The report over the graphs whose counts are known (a lower bound on the totals)."""
        return Report([g for g in self.graphs if not g.unknown])

    def _counted(self) -> list[GraphRecord]:
        if self.unknown:
            raise UnknownCountsError(
                f"difffuse: the counts of {', '.join(self.unknown)} are unknown: Inductor's cache answered "
                "for them, so the difffuse pass did not run, and no record of its matches was found. "
                "Recompile with a fresh TORCHINDUCTOR_CACHE_DIR (or fx_graph_cache and autograd_cache off) "
                "to count them, or use report.known() for the other graphs.")
        return self.graphs

    def matches(self, family: Optional[str] = None) -> dict | int:
        """{family: matches} over all graphs (families with none are absent), or one family's
        count. Raises `UnknownCountsError` if any graph's counts are unknown."""
        total: collections.Counter = collections.Counter()
        for g in self._counted():
            total.update(g.matches)
        return total[family] if family else dict(total)

    def variants(self) -> dict:
        """{"family:variant": matches}. Raises `UnknownCountsError` like `matches()`."""
        total: collections.Counter = collections.Counter()
        for g in self._counted():
            total.update(g.variants)
        return dict(total)

    def sites(self) -> list[tuple[str, str, list]]:
        """(family, variant, module paths it covers) for every match: which modules of the
        user's model each fused op came from (paths relative to the compiled module).
        Raises `UnknownCountsError` like `matches()`."""
        return [(f, v, list(m)) for g in self._counted() for f, v, m in g.sites]

    def modules(self) -> set:
        """Module paths that have at least one node in a compiled graph (before the rewrite).
        Raises `UnknownCountsError` like `matches()`."""
        return {p for g in self._counted() for p in g.modules}

    @property
    def misses(self) -> list[Miss]:
        """Every miss. Raises `UnknownCountsError` like `matches()`: an unknown graph's
        misses are unknown too, and [] would read as "no misses"."""
        return [m for g in self._counted() for m in g.misses]

    def by_lowering(self) -> dict:
        """{(family, lowering): matches}. Raises `UnknownCountsError` like `matches()`."""
        total: collections.Counter = collections.Counter()
        for g in self._counted():
            for fam, n in g.matches.items():
                total[(fam, g.lowering)] += n
        return dict(total)

    def __str__(self) -> str:
        from ..families import NAMES

        fams = [f for f in NAMES if any(f in g.matches for g in self.graphs)] or list(NAMES[:4])
        known = [g for g in self.graphs if not g.unknown]
        more = "+?" if len(known) < len(self.graphs) else ""  # a total over known graphs only
        head = ["graph", "lowering"] + fams + ["misses"]
        rows = []
        for g in self.graphs:
            name = g.graph + (" (cached)" if g.cached else "")
            if g.unknown:
                rows.append([name, g.lowering] + ["?"] * (len(fams) + 1))
            else:
                rows.append([name, g.lowering] + [str(g.matches.get(f, 0)) for f in fams]
                            + [str(len(g.misses))])
        misses = [m for g in known for m in g.misses]
        rows.append(["total", ""] + [f"{sum(g.matches.get(f, 0) for g in known)}{more}" for f in fams]
                    + [f"{len(misses)}{more}"])
        widths = [max(len(r[i]) for r in rows + [head]) for i in range(len(head))]
        fmt = "  ".join("{:<%d}" % w for w in widths)
        lines = ["difffuse fusion report", fmt.format(*head), fmt.format(*["-" * w for w in widths])]
        lines += [fmt.format(*r) for r in rows]
        for g in self.graphs:
            for note in g.notes:
                lines.append(f"note [{g.graph}]: {note}")
            lines += [f"note [{g.graph}]: {d}" for d in _calls_vs_matches(g)]
        if any(g.cached and not g.unknown for g in self.graphs):
            lines.append("note: (cached) = Inductor's cache answered, the pass did not run: "
                         "its matches and misses are as first recorded for that graph")
        if more:
            lines.append(f"note: ? = unknown, not 0: {', '.join(self.unknown)} came from Inductor's cache "
                         "with no difffuse record of its matches; totals marked +? count the other graphs. "
                         "Recompile with a fresh TORCHINDUCTOR_CACHE_DIR to count them.")
        for m in misses:
            lines.append(f"miss {m.family}: {m.reason}" + (f"  at {m.source}" if m.source else ""))
        return "\n".join(lines)

    __repr__ = __str__


def _calls_vs_matches(g: GraphRecord) -> list[str]:
    """Where the kernels note counts more op calls than the table counts matches for a family."""
    calls: collections.Counter = collections.Counter()
    for note in g.notes:
        if note.startswith("kernels: "):
            for fam, n in re.findall(r"(\w+) -> \S+ x(\d+)", note):
                calls[fam] += int(n)
    return [f"{fam}: {g.matches[fam]} matches (the table), {n} op calls (kernels): one match can make "
            "several calls, e.g. a q/k norm + rope over a joint text+image sequence makes one per stream"
            for fam, n in sorted(calls.items()) if fam in g.matches and n != g.matches[fam]]


def report() -> Report:
    """The fusion report for every compilation since the last `reset()`."""
    return Report(_RECORDS)


# ------------------------------------------------------------ module paths
# Dynamo names the modules a node was traced in (node.meta["nn_module_stack"]: {key: (source,
# class)}, outermost first) relative to the frame it traced: `L['self'].blocks[0].norm` in the
# compiled module's own frame, but `L['self'].norm` (or nothing, for code in the frame's own
# method) in a frame it compiled on its own (a submodule's forward, when a graph break in the
# caller's loop made Dynamo skip the caller) or resumed after a graph break
# (`torch_dynamo_resume_in_forward_at_N`, whose locals are the broken frame's). Its key is
# `str(id(module))` (unspecialized modules, the default since torch 2.5; "@N" for the N-th
# call of one module in a frame) or, for a specialized module, a name made from the source.
# So a path is read: from the module object the key names, looked up in the compiled root
# module; else from the source's base local (a module of the root) and the rest of the
# source; else from the source as written (relative to the traced frame). Everything is
# read from the compile in progress (the Python stack, Dynamo's current frame), once per
# graph: a graph compiled elsewhere keeps Dynamo's relative names.
_SOURCE_BASE = re.compile(r"^([LG])\[(['\"])(.*?)\2\]")
_SOURCE_STEP = re.compile(r"\.([^.\[\]]+)|\[(['\"])(.*?)\2\]|\[(-?\d+)\]")
_NOT_PATH = ("_modules", "__dict__", "_parameters", "_buffers")


def source_steps(source: str) -> tuple[Optional[str], list[str]]:
    """(base local or global name, the names after it) of a Dynamo source name:
    "L['self'].blocks[0]._modules['2-1']" -> ("self", ["blocks", "0", "2-1"]). Module
    containers' own attributes (`_modules`, ...) are not path components."""
    base = _SOURCE_BASE.match(source)
    rest = source[base.end():] if base else source
    steps = [a or c or d for a, _, c, d in _SOURCE_STEP.findall(rest)]
    if not base and steps and steps[0] == "self":  # an older spelling: "self.blocks.0"
        steps = steps[1:]
    return (base.group(3) if base else None), [s for s in steps if s not in _NOT_PATH]


def _source_name(source) -> str:
    name = getattr(source, "name", "")
    return name() if callable(name) else str(name)  # a method before torch 2.13


def compiled_root():
    """The module the compile in progress is for: the one given to `torch.compile` (an
    OptimizedModule's `_orig_mod`) or whose `.compile()` replaced its call (diffusers'
    regional compilation compiles each block so), the innermost on the Python stack; None
    for `torch.compile` of a function or outside a compile."""
    import torch

    try:
        from torch._dynamo.eval_frame import OptimizedModule
    except ImportError:  # pragma: no cover
        return None
    wrapped = torch.nn.Module._wrapped_call_impl.__code__
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name in ("__call__", "_wrapped_call_impl", "_call_impl"):
            mod = frame.f_locals.get("self")
            if isinstance(mod, OptimizedModule):
                return mod._orig_mod
            if frame.f_code is wrapped and getattr(mod, "_compiled_call_impl", None) is not None:
                return mod
        frame = frame.f_back
    return None


def _caller_module(ids: dict):
    """The innermost module of the root whose `_call_impl` is on the Python stack: the
    module whose forward called the frame being compiled."""
    import torch

    code = torch.nn.Module._call_impl.__code__
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code is code and id(frame.f_locals.get("self")) in ids:
            return ids[id(frame.f_locals["self"])]
        frame = frame.f_back
    return None


class ModuleNamer:
    """Module paths, in the compiled root module, for the nodes of one graph (see above).

    `ids`: id(module) -> path for every module of the root; `locals`: frame local -> path,
    for the traced frame's locals that are modules of the root; `own`: the path of the module
    whose method the traced frame runs (for nodes with no nn_module_stack); `inputs`: the
    source names of the Dynamo graph's placeholders, in order; `resumed`: the frame is a
    resume function or a frame Dynamo compiled on its own below the root's forward, so its
    frame-local inputs were computed before it (by a previous graph or eager code). Holds
    names only, never the frame's objects."""

    def __init__(self, tx=None, root=None):
        self.ids: dict[int, str] = {}
        self.locals: dict[str, str] = {}
        self.own: Optional[str] = None
        self.inputs: list[str] = []
        self.resumed = False
        self._cache: dict = {}
        if root is not None:
            for name, mod in root.named_modules(remove_duplicate=False):
                self.ids.setdefault(id(mod), name)
        if tx is not None:
            self._read_frame(tx)

    def _read_frame(self, tx) -> None:
        f_locals = getattr(tx, "f_locals", None) or {}
        self.locals = {k: self.ids[id(v)] for k, v in f_locals.items() if id(v) in self.ids}
        code = getattr(tx, "f_code", None)
        try:
            from torch._dynamo.resume_execution import ContinueExecutionCache

            meta = ContinueExecutionCache.generated_code_metadata.get(code)
        except Exception:  # noqa: BLE001  (another torch: no resume metadata)
            meta = None
        orig = getattr(meta, "code", None) or code
        first = orig.co_varnames[0] if orig is not None and orig.co_argcount else None
        self.own = self.locals.get(first) if first else None
        if self.own is None and self.ids:
            self.own = _caller_module(self.ids)
        self.resumed = meta is not None or self.own not in (None, "")
        try:
            placeholders = tx.output.graph.find_nodes(op="placeholder")
            self.inputs = [_source_name(getattr(p.meta.get("grapharg"), "source", None)) for p in placeholders]
        except Exception:  # noqa: BLE001
            self.inputs = []

    def path(self, key: str, source: str) -> str:
        """The path of the module an nn_module_stack entry names."""
        found = self._cache.get((key, source))
        if found is None:
            found = self._cache[(key, source)] = self._path(key, source)
        return found

    def _path(self, key: str, source: str) -> str:
        module_id = key.split("@", 1)[0]
        if module_id.isdigit() and int(module_id) in self.ids:
            return self.ids[int(module_id)]
        base, steps = source_steps(source)
        prefix = self.locals.get(base) if base else None
        return ".".join(([prefix] if prefix else []) + steps)

    def input_source(self, index: int) -> Optional[str]:
        """The Dynamo source name of graph input `index` ("L['x']"), if known."""
        return self.inputs[index] if 0 <= index < len(self.inputs) else None


_NAMERS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def module_namer(graph) -> ModuleNamer:
    """The ModuleNamer of `graph`, made at its first use from the compile in progress."""
    namer = _NAMERS.get(graph) if graph is not None else None
    if namer is None:
        try:
            from torch._dynamo.symbolic_convert import InstructionTranslator

            tx = InstructionTranslator.current_tx()
        except Exception:  # noqa: BLE001  (not inside a Dynamo trace)
            tx = None
        try:
            namer = ModuleNamer(tx, compiled_root() if tx is not None else None)
        except Exception as exc:  # noqa: BLE001  (paths are a report detail: never a failed compile)
            log.debug("difffuse: module paths stay as Dynamo named them: %s", exc)
            namer = ModuleNamer()
        if graph is not None:
            _NAMERS[graph] = namer
    return namer


# ------------------------------------------------------------ warm-cache persistence
def _store_dir() -> str:
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    path = os.path.join(cache_dir(), "difffuse")
    os.makedirs(path, exist_ok=True)
    return path


def _write(path: str, data: str) -> None:
    """Write atomically: a concurrent compile reads the old record or the new, never half."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def save_record(key, rec: GraphRecord) -> None:
    """Store `rec` under `key` (a str, or several keys). Unknown counts are never stored."""
    if rec.unknown:
        return
    data = json.dumps(rec.to_json())
    for k in ([key] if isinstance(key, str) else key):
        try:
            _write(os.path.join(_store_dir(), k + ".json"), data)
        except OSError as exc:  # a read-only cache dir must not break a compile
            log.debug("difffuse: could not store the match table: %s", exc)


def load_record(key: Optional[str]) -> Optional[GraphRecord]:
    """The record stored under `key`, marked `cached`; None if there is none."""
    if not key:
        return None
    try:
        with open(os.path.join(_store_dir(), key + ".json")) as f:
            rec = GraphRecord.from_json(json.load(f))
    except (OSError, ValueError, TypeError):
        return None
    if rec.unknown:
        return None
    rec.cached = True
    return rec
