"""`python -m difffuse.testing.fuzz --seed N --cases M [--lowering reference|cuda] [--family F]`:
run the fuzzer, print progress, the counts table and each failure's shrunk reproduction.
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

    summary = run(a.seed, a.cases, a.family, lowerings, a.cuda_every, a.inductor, a.baseline, a.shrink, progress)
    print(summary.report())
    return 1 if any(summary.total(k) for k in FAILURES) or summary.invalid else 0


if __name__ == "__main__":
    sys.exit(main())
