"""`python -m difffuse.testing.fuzz --seed N --cases M [--lowering reference|cuda] [--family F]`:
run the fuzzer, print progress, the counts table and each failure's shrunk reproduction.
`--family F --case I` reruns one case (a failure's one-line reproduction).
Exit status 1 if any case failed."""
from __future__ import annotations

import argparse
import sys

from . import FAILURES, run
from .runner import families


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m difffuse.testing.fuzz", description=__doc__)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cases", type=int, default=100)
    p.add_argument("--lowering", choices=("reference", "cuda", "both"), default="both",
                   help="reference only, cuda only, or both (cuda on every --cuda-every-th case)")
    p.add_argument("--cuda-every", type=int, default=4)
    p.add_argument("--family", action="append", choices=sorted(families()), help="repeatable; default all")
    p.add_argument("--inductor", choices=("mix", "on", "off"), default="mix",
                   help="difffuse's inductor option: alternate by case (mix), always, never")
    p.add_argument("--baseline", choices=("lazy", "always"), default="lazy",
                   help="compile plain Inductor only where it decides an outcome, or for every case")
    p.add_argument("--shrink", type=int, default=8, help="shrink at most this many failures")
    p.add_argument("--case", type=int, action="append",
                   help="repeatable: run only case INDEX of the one --family (as numbered in the progress lines), "
                        "with each lowering, and print its (shrunk) reproduction if it fails")
    p.add_argument("-q", "--quiet", action="store_true")
    a = p.parse_args(argv)
    lowerings = {"reference": ("reference",), "cuda": ("cuda",), "both": ("reference", "cuda")}[a.lowering]

    def progress(res):
        if a.quiet:
            return
        bad = ",".join(res.failed()) or ("INVALID" if res.invalid else "ok")
        print(f"[{res.case.family} #{res.case.index} {res.lowering} {res.seconds:.1f}s] {res.case.kind:<4} {bad:<8} "
              f"{res.counts} {res.case.name}" + (f" misses: {res.misses}" if res.misses else ""),
              file=sys.stderr, flush=True)

    if a.case:
        if not a.family or len(a.family) != 1:
            p.error("--case needs exactly one --family")
        import time

        from .runner import Summary, make_case, run_case, setup, shrink
        setup()
        summary, start = Summary(), time.time()
        for i in a.case:
            case = make_case(a.family[0], a.seed, i)
            for low in lowerings:
                ind = {"on": True, "off": False}.get(a.inductor, case.index % 2 == 0)
                res = run_case(case, low, ind, a.baseline)
                summary.add(res)
                progress(res)
                if res.failed():
                    summary.failures.append(shrink(res) if a.shrink else res)
        summary.seconds = time.time() - start
        print(summary.report())
        return 1 if summary.failures or summary.invalid else 0
    summary = run(a.seed, a.cases, a.family, lowerings, a.cuda_every, a.inductor, a.baseline, a.shrink, progress)
    print(summary.report())
    return 1 if any(summary.total(k) for k in FAILURES) or summary.invalid else 0


if __name__ == "__main__":
    sys.exit(main())
