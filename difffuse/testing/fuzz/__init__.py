"""Seeded fuzzing of the difffuse families (issue 20, item 4).

    python -m difffuse.testing.fuzz --seed 7 --cases 500 [--lowering reference|cuda] [--family rms_norm]

A seeded generator (one module per family, `gen_<family>.py`) draws each family's variant
space and its near-misses as small nn.Modules written out as source; `runner` compiles
each with difffuse (the reference lowering, and the CUDA lowering's Triton kernels under
`TRITON_INTERPRET=1` for a subset), compares with eager and plain Inductor, and counts
matches, false matches, wrong outputs, crashes, aborted passes and report
inconsistencies; a failure prints a shrunk, runnable reproduction. tests/test_fuzz.py runs
a fixed seed in CI.
"""
from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():  # the CUDA lowering's kernels run in Triton's CPU interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

from .case import Case, Draw, Expect  # noqa: E402
from .runner import (FAILURES, OUTCOMES, Result, Summary, generate, make_case, reproduction, run,  # noqa: E402
                     run_case, shrink)

__all__ = ["Case", "Draw", "Expect", "FAILURES", "OUTCOMES", "Result", "Summary", "generate", "make_case",
           "reproduction", "run", "run_case", "shrink"]
