"""Fusion sites of a model counted in eager, against what the compiled graph fused.

A *site* is found by running the model once eagerly, independently of the patterns:

- norm: a call of a normalisation module (nn.LayerNorm, nn.RMSNorm and diffusers' own
  RMSNorm / LayerNorm classes, wherever they sit: q/k norms, AdaLN's inner norm, ...);
- modulation: a norm call whose output is next multiplied by a tensor other than the
  norm's own weight (`norm(x) * (1 + scale) + shift`, AdaLN-Zero, Wan's `norm1`);
- rope: a call of one of diffusers' `apply_rotary_emb*` functions (one per q or k tensor),
  attributed to the module it runs in (the attention module). Ropes written inline in a
  processor (Wan's) are not functions we can count and do not appear.

The compiled side is `Report.sites()`: the module paths each match covers. A norm site is
fused as often as matches cover its module (a modulation: norm_scale_shift matches that
include the modulation; a rope: qk_norm_rope matches in the module the rope ran in).
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import sys
import types

import torch
from torch.overrides import TorchFunctionMode

NORM_CLASS_NAMES = ("RMSNorm", "LayerNorm", "FP32LayerNorm")


def is_norm(module: torch.nn.Module) -> bool:
    return isinstance(module, (torch.nn.LayerNorm, torch.nn.RMSNorm)) or type(module).__name__ in NORM_CLASS_NAMES


@dataclasses.dataclass
class EagerSites:
    norms: collections.Counter  # module path -> calls
    modulated: collections.Counter  # module path -> calls whose output is modulated
    ropes: collections.Counter  # module path the rope ran in -> calls

    def totals(self) -> dict:
        return {"norm": sum(self.norms.values()), "modulation": sum(self.modulated.values()),
                "rope": sum(self.ropes.values())}


class _Modulations(TorchFunctionMode):
    """Counts a norm output (by identity) used as a factor of a mul with a non-parameter."""

    def __init__(self, outputs: dict, counter: collections.Counter, in_rope: list):
        super().__init__()
        self.outputs, self.counter, self.in_rope = outputs, counter, in_rope

    def __torch_function__(self, func, types_, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not self.in_rope and func in (torch.mul, torch.Tensor.mul, torch.Tensor.__mul__, torch.Tensor.__rmul__) and len(args) == 2:
            for a, b in (args, args[::-1]):
                path, _ = self.outputs.pop(id(a), (None, None)) if isinstance(a, torch.Tensor) else (None, None)
                if path is not None and isinstance(b, torch.Tensor) and not isinstance(b, torch.nn.Parameter):
                    self.counter[path] += 1
        return func(*args, **kwargs)


def _rope_functions():
    """(module, name, fn) for every `apply_rotary_emb*` function bound in a loaded diffusers module."""
    found = []
    for mod_name, mod in list(sys.modules.items()):
        if not mod_name.startswith("diffusers.") or mod is None:
            continue
        for name, fn in list(vars(mod).items()):
            if name.startswith("apply_rotary_emb") and isinstance(fn, types.FunctionType):
                found.append((mod, name, fn))
    return found


@contextlib.contextmanager
def _count_ropes(counter: collections.Counter, current: list, in_rope: list):
    patched = []

    def wrap(fn):
        def counted(*args, **kwargs):
            counter[current[-1] if current else ""] += 1
            in_rope.append(True)  # the rope's own `x * cos` is not a modulation
            try:
                return fn(*args, **kwargs)
            finally:
                in_rope.pop()
        counted.__wrapped__ = fn
        return counted

    for mod, name, fn in _rope_functions():
        setattr(mod, name, wrap(fn))
        patched.append((mod, name, fn))
    try:
        yield
    finally:
        for mod, name, fn in patched:
            setattr(mod, name, fn)


def count_eager_sites(model: torch.nn.Module, kwargs: dict) -> EagerSites:
    """Run `model(**kwargs)` once in eager and count its norm, modulation and rope sites."""
    norms, modulated, ropes = collections.Counter(), collections.Counter(), collections.Counter()
    outputs: dict = {}
    current: list = []
    in_rope: list = []
    handles = []
    for path, module in model.named_modules():
        if not path:
            continue
        handles.append(module.register_forward_pre_hook(lambda m, a, p=path: current.append(p)))

        def post(m, a, out, p=path):
            current.pop()
            if is_norm(m) and isinstance(out, torch.Tensor):
                norms[p] += 1
                outputs[id(out)] = (p, out)  # kept alive so its id is not reused
        handles.append(module.register_forward_hook(post))
    try:
        with torch.no_grad(), _count_ropes(ropes, current, in_rope), _Modulations(outputs, modulated, in_rope):
            model(**kwargs)
    finally:
        for h in handles:
            h.remove()
    return EagerSites(norms, modulated, ropes)


def _modulating(family: str, variant: str) -> bool:
    """A match that includes an AdaLN modulation (norm_scale_shift variants say "/mod")."""
    return family == "norm_scale_shift" and "/mod" in variant


DEFAULT_REASON = {
    "norm": "no family covers it (no residual before it, no modulation after it, and not an RMSNorm "
            "before a rope): Inductor compiles it",
    "modulation": "no norm_scale_shift variant matched this modulation",
    "rope": "no qk_norm_rope variant matched this rope",
}


def coverage(eager: EagerSites, report) -> dict:
    """Per kind: sites, fused, dead and the unfused sites {module path: {count, reason}}.

    A site at path p is fused as often as a match of the kind's families covers p (capped
    by its calls). A site whose module has no node in the compiled graph is dead code
    there (its output is unused: e.g. the text stream after the last dual-stream block)
    and is not counted. For a full-model compile (paths are relative to the compiled module)."""
    sites, present = report.sites(), report.modules()
    misses = {}
    for m in report.misses:
        if m.family != "attention":  # an attention call is none of these kinds (it shares the attn path)
            misses.setdefault(m.module, m.reason)
    kinds = (("norm", eager.norms, lambda f, v: True), ("modulation", eager.modulated, _modulating),
             ("rope", eager.ropes, lambda f, v: f == "qk_norm_rope"))
    table = {}
    for kind, counter, counts in kinds:
        hits = collections.Counter(p for f, v, paths in sites if counts(f, v) for p in set(paths))
        entry = {"sites": 0, "fused": 0, "dead": 0, "missed": {}}
        for p, n in sorted(counter.items()):
            if p not in present:
                entry["dead"] += n
                continue
            entry["sites"] += n
            entry["fused"] += min(n, hits[p])
            if hits[p] < n:
                entry["missed"][p] = {"count": n - hits[p], "reason": misses.get(p, DEFAULT_REASON[kind])}
        table[kind] = entry
    return table


def percent(table: dict) -> float:
    sites = sum(t["sites"] for t in table.values())
    return 100.0 * sum(t["fused"] for t in table.values()) / max(sites, 1)


def format_table(name: str, table: dict) -> str:
    cells = ", ".join(f"{k} {t['fused']}/{t['sites']}" for k, t in table.items())
    dead = sum(t["dead"] for t in table.values())
    lines = [f"{name}: {cells} -> {percent(table):.1f}% of sites fused"
             + (f" ({dead} dead in the compiled graph, not counted)" if dead else "")]
    for k, t in table.items():
        for p, miss in t["missed"].items():
            count = f" (x{miss['count']})" if miss["count"] > 1 else ""
            lines.append(f"  unfused {k}: {p}{count}: {miss['reason']}")
    return "\n".join(lines)
