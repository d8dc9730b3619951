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
import tempfile
from typing import Optional

from . import device as _device

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


# ------------------------------------------------------------ notes
def cpu_note(cfg, example_inputs) -> Optional[str]:
    """Why `lowering="auto"` rewrote nothing on a device without a difffuse lowering (CPU)."""
    import torch

    if cfg.lowering != "auto" or _device.detect_from_tensors(example_inputs) != "inductor":
        return None
    kinds = sorted({t.device.type for t in example_inputs if isinstance(t, torch.Tensor)}) or ["cpu"]
    where = "CPU" if kinds == ["cpu"] else "/".join(kinds)
    return (f"lowering 'auto' on {where}: difffuse rewrites nothing there (plain Inductor; the fused kernels "
            "are CUDA/ROCm/NPU lowerings). To see the rewrites, compile with options={'lowering': 'reference'} "
            "(pure-PyTorch fused ops: a correctness path, slower than Inductor on CPU)")


def add_note(rec: Optional[GraphRecord], note: Optional[str]) -> None:
    """Append `note` to a graph's record once."""
    if rec is not None and note and note not in rec.notes:
        rec.notes.append(note)


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
