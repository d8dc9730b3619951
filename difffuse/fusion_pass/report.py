"""Match counts as data: what each compiled graph's pass did, read by `difffuse.report()`
and the tests. Records are kept in memory and, keyed by the compiled entry's key, on
disk beside Inductor's cache so a warm-cache compile (which skips the pass) reports the
matches as first recorded."""
from __future__ import annotations

import collections
import dataclasses
import json
import logging
import os
from typing import Optional

log = logging.getLogger("difffuse")


@dataclasses.dataclass
class Miss:
    family: str
    reason: str
    source: str = ""
    module: str = ""  # the module path it was traced in (see patterns.common.module_path)


@dataclasses.dataclass
class GraphRecord:
    graph: str
    lowering: str
    matches: dict = dataclasses.field(default_factory=dict)  # "family" -> count
    variants: dict = dataclasses.field(default_factory=dict)  # "family:variant" -> count
    misses: list = dataclasses.field(default_factory=list)
    sites: list = dataclasses.field(default_factory=list)  # [family, variant, [module paths]] per match
    modules: list = dataclasses.field(default_factory=list)  # module paths with a node in the graph
    notes: list = dataclasses.field(default_factory=list)
    cached: bool = False

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
    total = sum(rec.matches.values())
    per = ", ".join(f"{k}={v}" for k, v in sorted(rec.matches.items())) or "none"
    log.info("difffuse: graph %s lowering=%s matches: %s (%d), misses: %d%s", rec.graph,
             rec.lowering, per, total, len(rec.misses), " [from cache]" if rec.cached else "")


def reset() -> None:
    """Forget the recorded compilations."""
    _RECORDS.clear()


class Report:
    """What the recorded compilations did: per graph and in total, matches per family and
    lowering, and every miss with its reason and source line."""

    def __init__(self, records: list[GraphRecord]):
        self.graphs = list(records)

    def matches(self, family: Optional[str] = None) -> dict | int:
        total: collections.Counter = collections.Counter()
        for g in self.graphs:
            total.update(g.matches)
        return total[family] if family else dict(total)

    def variants(self) -> dict:
        total: collections.Counter = collections.Counter()
        for g in self.graphs:
            total.update(g.variants)
        return dict(total)

    def sites(self) -> list[tuple[str, str, list]]:
        """(family, variant, module paths it covers) for every match: which modules of the
        user's model each fused op came from (paths relative to the compiled module)."""
        return [(f, v, list(m)) for g in self.graphs for f, v, m in g.sites]

    def modules(self) -> set:
        """Module paths that have at least one node in a compiled graph (before the rewrite)."""
        return {p for g in self.graphs for p in g.modules}

    @property
    def misses(self) -> list[Miss]:
        return [m for g in self.graphs for m in g.misses]

    def by_lowering(self) -> dict:
        total: collections.Counter = collections.Counter()
        for g in self.graphs:
            for fam, n in g.matches.items():
                total[(fam, g.lowering)] += n
        return dict(total)

    def __str__(self) -> str:
        from ..families import NAMES

        fams = [f for f in NAMES if any(f in g.matches for g in self.graphs)] or list(NAMES[:4])
        head = ["graph", "lowering"] + fams + ["misses"]
        rows = []
        for g in self.graphs:
            name = g.graph + (" (cached)" if g.cached else "")
            rows.append([name, g.lowering] + [str(g.matches.get(f, 0)) for f in fams]
                        + [str(len(g.misses))])
        rows.append(["total", ""] + [str(self.matches(f)) for f in fams] + [str(len(self.misses))])
        widths = [max(len(r[i]) for r in rows + [head]) for i in range(len(head))]
        fmt = "  ".join("{:<%d}" % w for w in widths)
        lines = ["difffuse fusion report", fmt.format(*head), fmt.format(*["-" * w for w in widths])]
        lines += [fmt.format(*r) for r in rows]
        for g in self.graphs:
            for note in g.notes:
                lines.append(f"note [{g.graph}]: {note}")
        for m in self.misses:
            lines.append(f"miss {m.family}: {m.reason}" + (f"  at {m.source}" if m.source else ""))
        return "\n".join(lines)

    __repr__ = __str__


def report() -> Report:
    """The fusion report for every compilation since the last `reset()`."""
    return Report(_RECORDS)


# ------------------------------------------------------------ warm-cache persistence
def _store_dir() -> str:
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    path = os.path.join(cache_dir(), "difffuse")
    os.makedirs(path, exist_ok=True)
    return path


def save_record(key: str, rec: GraphRecord) -> None:
    try:
        with open(os.path.join(_store_dir(), key + ".json"), "w") as f:
            json.dump(rec.to_json(), f)
    except OSError as exc:  # a read-only cache dir must not break a compile
        log.debug("difffuse: could not store the match table: %s", exc)


def load_record(key: str) -> Optional[GraphRecord]:
    try:
        with open(os.path.join(_store_dir(), key + ".json")) as f:
            rec = GraphRecord.from_json(json.load(f))
    except (OSError, ValueError, TypeError):
        return None
    rec.cached = True
    return rec
