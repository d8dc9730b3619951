"""Running the rope recogniser as a family's pass: a Match built from what the
recogniser found (so replacements go through the same `replace_by_example` path as the
pattern families), the shared proofs, the lowering's eligibility, the report."""
from __future__ import annotations

import logging

from torch._inductor.pattern_matcher import Match, MatchContext

from .common import dependency_reason, inserted, left_by, module_paths, zero_size_reason
from torch._subclasses.fake_tensor import unset_fake_temporarily

from .rope import Found, casts_before_views, find_ropes

log = logging.getLogger("difffuse")


class _Output:
    """Stands in for the pattern of a match's output node."""


class RopeMatch(Match):
    """A Match over the nodes the recogniser found: `nodes` (in graph order), one output."""

    def __init__(self, graph, out, nodes):
        self._key = _Output()
        super().__init__(MatchContext([self._key], {self._key: out}, graph=graph), None)
        self.nodes = list(nodes)

    def set_output(self, node, extra=()):
        """The site ends at `node` (a join after the rope), which also covers `extra`."""
        self.ctx.pattern_to_node[self._key] = node
        self.nodes += [n for n in extra if n not in self.nodes]


def variant_name(f: Found, site: dict) -> str:
    spec = site["spec"]
    pairs = "interleaved" if spec.interleaved else "halves"
    tables = "half" if not spec.full_tables else ("direct" if spec.direct() else "gathered")
    extra = ["token_range"] if site.get("partial") else []
    extra += ["joint"] if site.get("calls") else []
    return "/".join([pairs, tables, *extra])


def anchors(family, graph) -> list:
    """The ropes `family` left when its pass ran, and those it takes still in the graph."""
    left = [a for a in left_by(graph, family.name) if not a._erased]
    found = []
    for f in find_ropes(graph):
        if not family.takes(f) or f.anchor in left or any(inserted(u) for u in f.root.users):
            continue  # (the last: what a fused rope left for another reader)
        # a rope first seen now (another family's rewrite exposed it): its own reason
        f.anchor.meta[MISS_REASON] = family.explain(f, f.reason or (
            "a rope whose value is also read where the fused op's output is not (a graph output, "
            "another dtype): it stays for that reader"))
        found.append(f.anchor)
    return left + found


MISS_REASON = "difffuse_miss_reason"


def _outside_reason(node, inside) -> str:
    if any(u.op == "output" for u in node.users if u not in inside):
        return (f"{node.name}, a value inside the rope, is also an output of this graph (Dynamo hands it back "
                "to Python, e.g. for a list the code appends to with a graph break in the function): it must "
                "stay as the model computes it, and the rope would be computed twice")
    return f"{node.name}, a value inside the rope, is also read outside it (it would be computed twice)"


class RopePass:
    """`apply(graph)` like a PatternMatcherPass: each rope the recogniser finds that this
    family takes (`family.takes(found)`) becomes its op call, or a reported miss."""

    def __init__(self, family, get_ctx):
        self.family, self.get_ctx = family, get_ctx

    def apply(self, graph) -> int:
        ctx, fam, done = self.get_ctx(), self.family, 0
        with unset_fake_temporarily():
            casts_before_views(graph)
        left = left_by(graph, fam.name)
        left.clear()
        for f in find_ropes(graph):
            if any(n._erased for n in [f.root, *f.nodes]):
                continue  # an earlier replacement took part of it
            if f.spec is None:
                if fam.takes(f):
                    ctx.rejected.setdefault(f.anchor, fam.explain(f, f.reason))
                    left.append(f.anchor)
                continue
            if not fam.takes(f):
                continue
            outside = next((n for n in f.nodes if n is not f.out and any(u not in f.nodes for u in n.users)), None)
            if outside is not None:  # the rope's input (or a part of its result) is read elsewhere too
                ctx.rejected.setdefault(f.anchor, fam.explain(f, _outside_reason(outside, f.nodes)))
                left.append(f.anchor)
                continue
            try:
                got = fam.site(f)
                if not isinstance(got, str):
                    match, site = got
                    got = self._judge(match, site, ctx) or got
            except Exception as exc:  # noqa: BLE001  (a bad site is a miss, never an aborted pass)
                log.warning("difffuse: %s check failed on a site (%s: %s); left to Inductor", fam.name,
                            type(exc).__name__, exc)
                got = f"internal error in the {fam.name} check ({type(exc).__name__}: {exc}); left to Inductor"
            if isinstance(got, str):
                ctx.rejected.setdefault(f.anchor, fam.explain(f, got))
                left.append(f.anchor)
                continue
            match, site = got
            done += self._replace(f, match, site, ctx)
        return done

    def _judge(self, match, site, ctx):
        reason = dependency_reason(match, site)
        if reason:
            return reason
        records = self.family.typed(site)
        reason = zero_size_reason(records)
        if reason:
            return reason
        reason = next((r for r in map(ctx.supports, records) if r), None)
        return f"{ctx.lowering} lowering does not take it: {reason}" if reason else None

    def _replace(self, f, match, site, ctx) -> int:
        fam = self.family
        name = variant_name(f, site)
        modules = module_paths(list(match.nodes) + list(site.get("norm_nodes", ())))
        before = list(match.graph.nodes)
        ctx.current = (fam.name, name)
        try:
            fam.replace(match, None, site, ctx)
        except Exception as exc:  # noqa: BLE001
            if list(match.graph.nodes) != before:
                raise  # half-rewritten: the pass restores its snapshot
            reason = f"the {ctx.lowering} replacement could not be built ({type(exc).__name__}: {exc})"
            log.warning("difffuse: %s: %s; left to Inductor", fam.name, reason)
            ctx.rejected.setdefault(f.anchor, reason)
            left_by(match.graph, fam.name).append(f.anchor)
            return 0
        graph = match.graph
        for n in reversed(match.nodes):  # the rope's own nodes now feed nothing
            if not n._erased and not n.users:
                graph.erase_node(n)
        ctx.record.add_match(fam.name, name, modules)
        return 1
