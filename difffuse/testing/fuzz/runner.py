"""Run fuzz cases: compile each with difffuse, compare with eager (and, where difffuse is
off or raised, with plain Inductor), classify, shrink failures, and count.

Outcomes per case and lowering (the columns of `Summary.table`):
  matched    a site case whose family matched at least `want` times
  suspects   a near-miss case whose family matched at all (a smaller site inside may be fine)
  false      a family matched more than its `allow` (near-misses: the false matches)
  wrong      an output differs from eager by more than the dtype tolerance AND by more than
             3x plain Inductor's own difference from eager (dtype or shape differing: always)
  crash      the difffuse compile or run raised where plain Inductor does not
  aborted    the pass gave up on the graph (a "pass failed" note) or a check raised (an
             "internal error" miss, or a "check failed" warning where another variant then
             took the site): an exception is never how a site is turned away
  incons     a site left unfused (fewer than `want`/`report` matches) that is not a reported miss,
             or a miss reported for a family the case holds nothing of (`Expect.absent`), or a
             miss whose reason is the report's default "no pattern variant matched" (`Expect.precise`)
Plain Inductor is compiled lazily, only when it decides an outcome (a tolerance violation,
a crash): it is the noise floor, and compiling it for every case would cost most of the
budget. `baseline="always"` compiles it for every case and also records its error.
"""
from __future__ import annotations

import atexit
import collections
import contextlib
import dataclasses
import importlib.util
import logging
import os
import random
import shutil
import tempfile
import time
import traceback
from typing import Callable, Optional

import torch
from torch.utils._pytree import tree_leaves

from .case import VAGUE, Case, Draw

TOL = {  # dtype -> (rtol, atol): conftest's table
    "float64": (1e-5, 1e-5),
    "float32": (1e-5, 1e-5),
    "float16": (2e-3, 2e-3),
    "bfloat16": (2e-2, 2e-2),
}
OUTCOMES = ("matched", "suspects", "false", "wrong", "crash", "aborted", "incons")
FAILURES = ("false", "wrong", "crash", "aborted", "incons")
_TMP = None


def setup() -> None:
    """A fresh Inductor cache and no FX-graph / AOTAutograd cache, so every compile runs the pass."""
    global _TMP
    if _TMP is None:
        _TMP = tempfile.mkdtemp(prefix="difffuse-fuzz-")
        # the case files and (unless the caller chose one) Inductor's cache live there: removed at
        # exit, as a failure prints its reproduction in full and needs no file
        atexit.register(shutil.rmtree, _TMP, ignore_errors=True)
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(_TMP, "inductor"))
    from torch._functorch import config as functorch_config
    from torch._inductor import config as inductor_config

    inductor_config.fx_graph_cache = False
    functorch_config.enable_autograd_cache = False


def load(case: Case):
    """(module, inputs) from the case's source, written to a file so tracebacks show it."""
    setup()
    path = os.path.join(_TMP, f"case_{case.family}_{case.seed}_{abs(hash(case.source())) % 10**8}.py")
    with open(path, "w") as f:
        f.write(case.source())
    spec = importlib.util.spec_from_file_location(f"difffuse_fuzz_case_{abs(hash(path))}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    module, inputs = mod.make()
    if DEVICE != "cpu":  # real kernels on a GPU (dense strides are kept; sliced inputs become dense)
        module = module.to(DEVICE)
        inputs = tuple(t.to(DEVICE) if isinstance(t, torch.Tensor) else t for t in inputs)
    return module, inputs


# where cases run: "cpu" (the CUDA lowering's kernels under TRITON_INTERPRET=1) or, on a
# GPU machine, DIFFFUSE_FUZZ_DEVICE=cuda to fuzz the real Triton kernels
DEVICE = os.environ.get("DIFFFUSE_FUZZ_DEVICE", "cpu")


@dataclasses.dataclass
class Result:
    case: Case
    lowering: str
    inductor: bool
    counts: dict = dataclasses.field(default_factory=dict)
    misses: list = dataclasses.field(default_factory=list)  # (family, reason)
    notes: list = dataclasses.field(default_factory=list)
    err: float = 0.0            # difffuse vs eager, in tolerances
    err_inductor: Optional[float] = None
    error: str = ""             # the difffuse exception, if any
    invalid: str = ""           # eager itself raised: a generator bug
    flags: dict = dataclasses.field(default_factory=dict)  # outcome -> message
    warnings: list = dataclasses.field(default_factory=list)  # difffuse's WARNING log lines
    seconds: float = 0.0

    def failed(self) -> list:
        return [k for k in FAILURES if k in self.flags]


def _leaves(x) -> list:
    return [t for t in tree_leaves(x) if isinstance(t, torch.Tensor)]


def error(out, ref, tol: str, outliers: float = 0.0) -> float:
    """max |out - ref| / (atol + rtol |ref|) over every output (inf where dtype or shape
    differ, where NaN/inf is not where eager has it); with `outliers`, the (1 - outliers)
    quantile instead of the max; non-float outputs: the fraction of elements that differ
    by more than 1 (int) or at all (bool), over max(2 %, outliers)."""
    outs, refs = _leaves(out), _leaves(ref)
    if len(outs) != len(refs):
        return float("inf")
    worst = 0.0
    rtol, atol = TOL[tol]
    for o, r in zip(outs, refs):
        if o.dtype != r.dtype or tuple(o.shape) != tuple(r.shape):
            return float("inf")
        if r.numel() == 0:
            continue
        o, r = o.detach().cpu(), r.detach().cpu()
        if not r.is_floating_point():
            bad = (o.double() - r.double()).abs() > (0 if r.dtype == torch.bool else 1)
            worst = max(worst, bad.double().mean().item() / max(0.02, outliers))
            continue
        o, r = o.double(), r.double()
        fin = torch.isfinite(r)
        on, rn = o[~fin], r[~fin]  # inf where eager has that inf, NaN where eager has NaN
        if not torch.equal(fin, torch.isfinite(o)) or not ((on == rn) | (on.isnan() & rn.isnan())).all():
            return float("inf")
        if fin.any():
            ratio = (o[fin] - r[fin]).abs() / (atol + rtol * r[fin].abs())
            worst = max(worst, (ratio.quantile(1 - outliers) if outliers else ratio.max()).item())
    return worst


def _compile_run(module, inputs, backend: str, options: Optional[dict]):
    import difffuse

    torch._dynamo.reset()
    difffuse.reset_report()
    compiled = torch.compile(module, backend=backend, options=options)
    with torch.no_grad():
        return compiled(*inputs)


def run_case(case: Case, lowering: str = "reference", inductor: bool = True, baseline: str = "lazy") -> Result:
    import difffuse

    res = Result(case, lowering, inductor)
    start = time.time()
    try:
        module, inputs = load(case)
        with torch.no_grad():
            ref = module(*inputs)
    except Exception as exc:  # noqa: BLE001
        res.invalid = f"{type(exc).__name__}: {exc}"
        return res
    options = {"lowering": lowering, "inductor": inductor}
    with capture_warnings() as res.warnings:
        try:
            out = _compile_run(module, inputs, "difffuse", options)
        except Exception as exc:  # noqa: BLE001
            out, res.error = None, f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300] if str(exc) else ''}"
            res.error += "\n" + "".join(traceback.format_exception(exc)[-4:])[-1500:]
    rep = difffuse.report()
    res.counts = dict(rep.matches())
    res.misses = [(m.family, m.reason) for m in rep.misses]
    res.notes = [n for g in rep.graphs for n in g.notes]
    res.err = error(out, ref, case.tol, case.outliers) if out is not None else float("inf")

    def inductor_err():
        if res.err_inductor is None:
            try:
                res.err_inductor = error(_compile_run(module, inputs, "inductor", None), ref, case.tol,
                                         case.outliers)
            except Exception:  # noqa: BLE001
                res.err_inductor = float("nan")  # plain Inductor raised too
        return res.err_inductor

    if baseline == "always":
        inductor_err()
    _classify(res, inductor_err)
    res.seconds = time.time() - start
    return res


def _classify(res: Result, inductor_err: Callable[[], float]) -> None:
    case, f = res.case, res.flags
    if res.error:
        if inductor_err() != inductor_err():  # NaN: Inductor raised as well
            res.notes.append("plain Inductor raises on this case too")
        else:
            f["crash"] = res.error
    elif res.err > 1 and not res.err <= 3 * inductor_err():
        f["wrong"] = f"error {res.err:.3g} tolerances (plain Inductor {res.err_inductor:.3g})"
    if any(n.startswith("pass failed") for n in res.notes):
        f["aborted"] = next(n for n in res.notes if n.startswith("pass failed"))
    internal = [r for _, r in res.misses if r.startswith("internal error")] + [
        w for w in res.warnings if "check failed" in w or "pass failed" in w]
    if internal:  # a check that raised, even where another variant then took the site
        f["aborted"] = internal[0]
    # a site case is matched when every family that owes matches (want > 0) made them
    owed = {fam: exp.want for fam, exp in case.expect.items() if exp.want}
    if case.kind == "site" and owed and all(res.counts.get(fam, 0) >= k for fam, k in owed.items()):
        f["matched"] = ""
    for fam, exp in case.expect.items():
        n = res.counts.get(fam, 0)
        if case.kind == "near" and n:
            f["suspects"] = ""
        if n > exp.allow:
            f["false"] = f"{fam} matched {n} time(s), at most {exp.allow} allowed"
        missing = exp.report - n
        reported = sum(1 for fm, _ in res.misses if fm == fam)
        # split between other families (a norm fused as rms_norm, its modulation as scale_shift):
        # covered when each part is fused or a reported miss of its own family
        covered = exp.alt and all(res.counts.get(a, 0) + sum(1 for fm, _ in res.misses if fm == a) >= k
                                  for a, k in exp.alt.items())
        if missing > 0 and reported < missing and not covered and not res.error:
            f["incons"] = (f"{fam}: {n} match(es) and {reported} reported miss(es) for {exp.report} site(s); "
                           f"misses: {res.misses}")
        if exp.absent and reported:
            f["incons"] = f"{fam}: {reported} miss(es) reported where the case has none of it: {res.misses}"
        if exp.precise and any(fm == fam and r.startswith(VAGUE) for fm, r in res.misses):
            f["incons"] = f"{fam}: a miss with no reason ({VAGUE!r}): {res.misses}"


# ------------------------------------------------------------------ generation
def families() -> dict:
    import importlib
    mods = []
    for name in ("gen_rms_norm", "gen_scale_shift", "gen_qk_norm_rope", "gen_norm_scale_shift", "gen_linear_gelu",
                 "gen_attention", "gen_rope"):
        try:
            mods.append(importlib.import_module(f"difffuse.testing.fuzz.{name}"))
        except ModuleNotFoundError:
            pass
    return {g.FAMILY: g.draw for g in mods}


def make_case(family: str, seed: int, index: int, fixed: Optional[dict] = None) -> Case:
    """Case `index` of `family` for `seed`: the structure depends on these three only."""
    d = Draw(random.Random(f"{seed}:{family}:{index}"), fixed)
    case = families()[family](d)
    case.params, case.options, case.seed, case.index = dict(d.values), dict(d.options), seed, index
    return case


def generate(seed: int, n: int, only: Optional[list] = None) -> list:
    """n cases, round-robin over the families (or `only` those)."""
    fams = [f for f in families() if not only or f in only]
    return [make_case(fams[i % len(fams)], seed, i // len(fams)) for i in range(n)]


def shrink(res: Result, budget: int = 24) -> Result:
    """Set the failing case's choices, one at a time, to their plainest option (the first)
    while the same failure remains: the smallest reproduction found in `budget` compiles."""
    kinds, best = set(res.failed()), res
    for _ in range(2):
        changed = False
        for key in list(best.case.params):
            opts = best.case.options.get(key, ())
            if budget <= 0 or not opts or best.case.params[key] == opts[0]:
                continue
            budget -= 1
            try:
                cand = make_case(best.case.family, best.case.seed, best.case.index,
                                 {**best.case.params, key: opts[0]})
            except Exception:  # noqa: BLE001
                continue
            r = run_case(cand, best.lowering, best.inductor)
            if kinds & set(r.failed()) and not r.invalid:
                best, changed = r, True
        if not changed:
            break
    return best


# ------------------------------------------------------------------ the run and its table
class _Lines(logging.Handler):
    def __init__(self, lines: list):
        super().__init__(logging.WARNING)
        self.lines = lines

    def emit(self, record):
        self.lines.append(record.getMessage())


@contextlib.contextmanager
def capture_warnings():
    """Collect difffuse's WARNING lines (a check that raised, a pass that gave up) instead of
    printing them: they count as `aborted`."""
    log, lines = logging.getLogger("difffuse"), []
    handler, propagate, level = _Lines(lines), log.propagate, log.level
    log.addHandler(handler)
    log.propagate = False
    if log.getEffectiveLevel() > logging.WARNING:
        log.setLevel(logging.WARNING)
    try:
        yield lines
    finally:
        log.removeHandler(handler)
        log.propagate, log.level = propagate, level


@dataclasses.dataclass
class Summary:
    counts: dict = dataclasses.field(default_factory=lambda: collections.defaultdict(collections.Counter))
    failures: list = dataclasses.field(default_factory=list)  # shrunk Results
    invalid: list = dataclasses.field(default_factory=list)
    seconds: float = 0.0

    def add(self, res: Result) -> None:
        c = self.counts[(res.case.family, res.lowering)]
        c["cases"] += 1
        c[res.case.kind] += 1
        if res.invalid:
            c["invalid"] += 1
            self.invalid.append(res)
            return
        for k in OUTCOMES:
            c[k] += k in res.flags

    def total(self, key: str, lowering: Optional[str] = None) -> int:
        return sum(c[key] for (_, low), c in self.counts.items() if lowering in (None, low))

    def table(self) -> str:
        cols = ("cases", "site", "near", "free") + OUTCOMES + ("invalid",)
        head = ("family", "lowering") + cols
        rows = [(f, low) + tuple(str(c[k]) for k in cols) for (f, low), c in sorted(self.counts.items())]
        for low in sorted({low for _, low in self.counts}):
            rows.append(("total", low) + tuple(str(self.total(k, low)) for k in cols))
        w = [max(len(r[i]) for r in rows + [head]) for i in range(len(head))]
        fmt = "  ".join("{:<%d}" % x for x in w)
        return "\n".join([fmt.format(*head), fmt.format(*("-" * x for x in w))] + [fmt.format(*r) for r in rows])

    def report(self) -> str:
        parts = [self.table(), f"wall time {self.seconds:.0f} s"]
        parts += [reproduction(r) for r in self.failures]
        parts += [f"INVALID CASE (eager raised: a generator bug): {r.invalid}\n{r.case.source()}" for r in self.invalid]
        return "\n\n".join(parts)


def reproduction(res: Result) -> str:
    case = res.case
    opts = {"lowering": res.lowering, "inductor": res.inductor}
    pre = ('import os\nos.environ.setdefault("TRITON_INTERPRET", "1")  # CPU: Triton\'s interpreter\n'
           if res.lowering == "cuda" else "")
    what = "; ".join(f"{k.upper()}: {v}" for k, v in res.flags.items() if k in FAILURES)
    return (f"=== {case.family} case {case.index} (seed {case.seed}), {res.lowering} lowering, "
            f"inductor={res.inductor}: {what}\n"
            f"label {case.kind} ({case.name}); expected {case.expect}\n"
            f"observed matches {res.counts}, misses {res.misses}, notes {res.notes}, "
            f"error {res.err:.3g} tolerances of {case.tol} (plain Inductor {res.err_inductor})\n"
            f"--- reproduction\n{pre}{case.source()}\n\nimport difffuse\n\nm, inputs = make()\n"
            "with torch.no_grad():\n    ref = m(*inputs)\n"
            f"    out = torch.compile(m, backend=\"difffuse\", options={opts!r})(*inputs)\n"
            "print(difffuse.report(), difffuse.report().variants())\n"
            "for o, r in zip(*(x if isinstance(x, tuple) else (x,) for x in (out, ref))):\n"
            "    print(o.dtype, r.dtype, (o.double() - r.double()).abs().max())\n")


def run(seed: int = 0, n: int = 100, only: Optional[list] = None, lowerings=("reference", "cuda"),
        cuda_every: int = 4, inductor: str = "mix", baseline: str = "lazy", shrink_failures: int = 8,
        progress: Optional[Callable[[Result], None]] = None, budget_s: Optional[float] = None) -> Summary:
    """Generate and run `n` cases. Every case runs with the first lowering; every
    `cuda_every`-th also with the others. `inductor`: "mix" alternates difffuse's
    `inductor=True` / `False` by case, or "on" / "off". Stops early past `budget_s`."""
    setup()
    start, summary = time.time(), Summary()
    for i, case in enumerate(generate(seed, n, only)):
        if budget_s is not None and time.time() - start > budget_s:
            break
        ind = {"on": True, "off": False}.get(inductor, case.index % 2 == 0)
        for j, low in enumerate(lowerings):
            if j and i % cuda_every:
                continue
            res = run_case(case, low, ind, baseline)
            summary.add(res)
            if progress:
                progress(res)
            if res.failed():
                if len(summary.failures) < shrink_failures:
                    res = shrink(res)
                summary.failures.append(res)
    summary.seconds = time.time() - start
    return summary


__all__ = ["Case", "Result", "Summary", "run", "run_case", "generate", "make_case", "shrink", "reproduction",
           "error"]
