"""Fusion sites of a model counted in eager, against what the compiled graph fused and
what the report says it missed.

A *site* is found by running the model once eagerly, independently of the patterns:

- norm: a call of a normalisation module (nn.LayerNorm, nn.RMSNorm and diffusers' own
  RMSNorm / LayerNorm classes, wherever they sit: q/k norms, AdaLN's inner norm, ...) that
  a family is for (design §3): every RMSNorm; a LayerNorm that reads a residual sum (an
  add of two tensors, through dtype casts), whose output is modulated, or whose output is
  roped (CogVideoX's q/k LayerNorm). A LayerNorm with none of these (HunyuanVideo's token
  refiner norm1, on a Linear's output) is counted as `plain`: no family is for it, it is
  not a site;
- modulation: a norm call whose output is next multiplied by a tensor other than the
  norm's own weight (`norm(x) * (1 + scale) + shift`, AdaLN-Zero, Wan's `norm1`);
- rope: a call of one of diffusers' `apply_rotary_emb*` functions (one per q or k tensor),
  or, outside those, a rope written inline in a processor (Wan's, SkyReels-V2's): an
  `unbind` of a last dim of size 2 (the interleaved pairs) or a `view_as_complex`;
  attributed to the module it runs in (the attention module).

The compiled side is `Report.sites()`: the module paths each match covers, and
`Report.misses`: each reported miss with the module it was traced in. A site at path p is
fused as often as matches cover p (a norm: any match; a modulation: norm_scale_shift
matches that include the modulation; a rope: qk_norm_rope matches in the module the rope
ran in); an unfused site is *reported* where a miss was traced in p, else *silent*.
Honest report: per kind, sites = fused + reported (`honesty`).
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
KINDS = ("norm", "modulation", "rope")
# families whose matches and misses are about these sites (linear_gelu is not); a scale_shift
# miss may explain an unfused modulation, but its own sites (gated residuals) are no kind here
SITE_FAMILIES = ("rms_norm", "norm_scale_shift", "qk_norm_rope", "scale_shift")
NORM_ROPE_FAMILIES = ("rms_norm", "norm_scale_shift", "qk_norm_rope")  # every match / miss is at a site


def is_norm(module: torch.nn.Module) -> bool:
    return isinstance(module, (torch.nn.LayerNorm, torch.nn.RMSNorm)) or type(module).__name__ in NORM_CLASS_NAMES


def is_rms(module: torch.nn.Module) -> bool:
    return isinstance(module, torch.nn.RMSNorm) or "RMS" in type(module).__name__


@dataclasses.dataclass
class EagerSites:
    norms: collections.Counter  # module path -> calls (family sites)
    modulated: collections.Counter  # module path -> calls whose output is modulated
    ropes: collections.Counter  # module path the rope ran in -> calls
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
    modulated: bool = False
    roped: bool = False


_ADDS = {torch.add, torch.Tensor.add, torch.Tensor.__add__, torch.Tensor.__radd__, torch.Tensor.add_,
         torch.Tensor.__iadd__}
_MULS = {torch.mul, torch.Tensor.mul, torch.Tensor.__mul__, torch.Tensor.__rmul__}
# a result that is its first argument's values in another dtype or another view
_CASTS = {torch.Tensor.float, torch.Tensor.to, torch.Tensor.type_as, torch.Tensor.type, torch.Tensor.half,
          torch.Tensor.bfloat16, torch.Tensor.double, torch.Tensor.contiguous}
_VIEWS = {torch.Tensor.view, torch.Tensor.reshape, torch.reshape, torch.Tensor.unflatten, torch.Tensor.flatten,
          torch.flatten, torch.Tensor.transpose, torch.transpose, torch.Tensor.permute, torch.permute,
          torch.Tensor.__getitem__, torch.Tensor.unsqueeze, torch.unsqueeze, torch.Tensor.squeeze, torch.squeeze}
_UNBINDS = {torch.unbind, torch.Tensor.unbind}
_COMPLEX = {torch.view_as_complex}


class _Tracker(TorchFunctionMode):
    """Follows tensors by identity through one eager run: residual sums (through casts),
    norm outputs (through casts and views); counts a norm output used as a factor of a mul
    with a non-parameter (a modulation) and inline ropes (an unbind of interleaved pairs or
    a view_as_complex outside diffusers' rope functions) and whether they rope a norm output."""

    def __init__(self, calls: dict, ropes: collections.Counter, current: list, in_rope: list):
        super().__init__()
        self.calls, self.ropes, self.current, self.in_rope = calls, ropes, current, in_rope
        self.residuals: dict = {}  # id -> tensor (kept alive so its id is not reused)
        self.normed: dict = {}  # id -> (norm call, tensor): a norm output or a cast / view of one
        self.fresh: dict = {}  # id -> norm call: the norm's own output, not yet multiplied

    def norm_output(self, call: _NormCall, out: torch.Tensor) -> None:
        self.normed[id(out)] = (call, out)
        self.fresh[id(out)] = call

    def norm_of(self, t) -> _NormCall | None:
        if not isinstance(t, torch.Tensor):
            return None
        hit = self.normed.get(id(t)) or (self.normed.get(id(t._base)) if t._base is not None else None)
        return hit[0] if hit else None

    def roped(self, t) -> None:
        call = self.norm_of(t)
        if call is not None:
            call.roped = True

    def __torch_function__(self, func, types_, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.in_rope or not args:
            return out
        a0 = args[0]
        if func in _MULS and len(args) == 2:
            for a, b in (args, args[::-1]):
                call = self.fresh.pop(id(a), None) if isinstance(a, torch.Tensor) else None
                if call is not None and isinstance(b, torch.Tensor) and not isinstance(b, torch.nn.Parameter):
                    call.modulated = True
        elif func in _ADDS and len(args) >= 2 and all(isinstance(a, torch.Tensor) for a in args[:2]):
            self.residuals[id(out)] = out
        elif func in _CASTS or func in _VIEWS:
            if isinstance(out, torch.Tensor) and id(a0) in self.residuals and func in _CASTS:
                self.residuals[id(out)] = out
            call = self.norm_of(a0)
            if call is not None and isinstance(out, torch.Tensor):
                self.normed[id(out)] = (call, out)
        elif func in _UNBINDS and isinstance(a0, torch.Tensor):
            dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
            if a0.ndim >= 2 and dim in (-1, a0.ndim - 1) and a0.shape[-1] == 2:
                self.ropes[self.current[-1] if self.current else ""] += 1
                self.roped(a0)
        elif func in _COMPLEX and isinstance(a0, torch.Tensor):
            self.ropes[self.current[-1] if self.current else ""] += 1
            self.roped(a0)
        return out


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
def _count_ropes(counter: collections.Counter, current: list, in_rope: list, tracker: list):
    patched = []

    def wrap(fn):
        def counted(*args, **kwargs):
            counter[current[-1] if current else ""] += 1
            if tracker and args:
                tracker[0].roped(args[0])
            in_rope.append(True)  # the rope's own `x * cos` is not a modulation, its unbind no second rope
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
    ropes = collections.Counter()
    calls: list[_NormCall] = []
    current: list = []
    in_rope: list = []
    tracker: list = []  # the active _Tracker (the hooks need it)
    handles = []
    for path, module in model.named_modules():
        if not path:
            continue

        def pre(m, a, p=path):
            current.append(p)
            if is_norm(m) and tracker:
                x = a[0] if a else None
                residual = isinstance(x, torch.Tensor) and id(x) in tracker[0].residuals
                calls.append(_NormCall(p, is_rms(m), residual))
                m._difffuse_call = calls[-1]

        def post(m, a, out, p=path):
            current.pop()
            call = getattr(m, "_difffuse_call", None)
            if call is not None:
                del m._difffuse_call
                if isinstance(out, torch.Tensor):
                    tracker[0].norm_output(call, out)
                else:
                    calls.remove(call)
        handles.append(module.register_forward_pre_hook(pre))
        handles.append(module.register_forward_hook(post))
    try:
        with torch.no_grad(), _count_ropes(ropes, current, in_rope, tracker):
            with _Tracker(calls, ropes, current, in_rope) as mode:
                tracker.append(mode)
                model(**kwargs)
    finally:
        tracker.clear()
        for h in handles:
            h.remove()
    norms, modulated, plain = collections.Counter(), collections.Counter(), collections.Counter()
    for c in calls:
        if c.rms or c.residual or c.modulated or c.roped:
            norms[c.path] += 1
            modulated[c.path] += c.modulated
        else:
            plain[c.path] += 1
    modulated = collections.Counter({p: n for p, n in modulated.items() if n})
    return EagerSites(norms, modulated, ropes, plain)


def _modulating(family: str, variant: str) -> bool:
    """A match that includes an AdaLN modulation (norm_scale_shift variants say "/mod")."""
    return family == "norm_scale_shift" and "/mod" in variant


SILENT = "not fused and no miss reported in this module"


def _kind_hits(report) -> dict:
    """kind -> Counter(module path -> matches of the kind's families that cover it)."""
    covers = {"norm": lambda f, v: f in NORM_ROPE_FAMILIES, "modulation": _modulating,
              "rope": lambda f, v: f == "qk_norm_rope"}
    return {kind: collections.Counter(p for f, v, paths in report.sites() if covers[kind](f, v) for p in set(paths))
            for kind in KINDS}


def coverage(eager: EagerSites, report) -> dict:
    """Per kind: sites, fused, reported, silent, dead and the unfused sites {module path:
    {count, reason, reported}}.

    A site at path p is fused as often as a match of the kind's families covers p (capped
    by its calls). An unfused site is reported where the report has misses traced in p (as
    many as there are such misses: one miss of a norm + modulation site stands for both
    kinds), else silent. A site whose module has no node in the compiled graph is dead code
    there (its output is unused: e.g. the text stream after the last dual-stream block)
    and is not counted. For a full-model compile (paths are relative to the compiled module)."""
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
                reported = min(unfused, len(reasons))
                entry["reported"] += reported
                entry["silent"] += unfused - reported
                entry["missed"][p] = {"count": unfused, "reported": reported,
                                      "reason": "; ".join(dict.fromkeys(reasons)) or SILENT}
        table[kind] = entry
    return table


def honesty(eager: EagerSites, report) -> dict:
    """The report checked against the eager sites: per kind {sites, fused, reported, silent}
    (honest: sites == fused + reported, silent == 0), plus the report's own claims that no
    eager site backs: `stray_misses` (misses of rms_norm / norm_scale_shift / qk_norm_rope
    traced in a module with no site of any kind) and `phantom_matches` (their matches that
    cover no norm or rope site)."""
    table = coverage(eager, report)
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
