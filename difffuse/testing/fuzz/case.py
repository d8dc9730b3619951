"""A fuzz case: a small nn.Module written out as Python source (so a failure prints a
reproduction that runs as is), its inputs, and what difffuse must do with it.

A family generator draws the case's *structure* from a seeded `random.Random` through
`Draw`, which records every choice and its options; re-rendering with some choices fixed
to their first (plainest) option is how `runner.shrink` minimises a failing case. Tensor
*values* are not seeded: each run draws fresh `torch.randn` inputs and parameters.

Labels (per family the case names, `Expect`):
  site  the family SHOULD match `want` times: a match that is missing must be a reported miss
  near  the math differs from the family's op: at most `allow` matches (a smaller site
        inside it may be fine, e.g. the bare norm of a norm with a [L, 1] "weight")
  free  matching is optional (e.g. `add(m, eps, alpha=100)`: an RMSNorm with eps*100, which a
        canonicalising matcher may fuse) but the output must stay exact; unfused, it must be
        a reported miss
"""
from __future__ import annotations

import dataclasses
import random
from typing import Any, Optional, Sequence

RANK = {"float64": 0, "float32": 1, "float16": 2, "bfloat16": 3}  # higher = looser tolerance


@dataclasses.dataclass
class Expect:
    want: int = 0    # matches a correct difffuse makes (site cases)
    allow: int = 0   # more than this is a false match
    report: int = 0  # unmatched instances (up to this many) must be reported misses
    # other families whose matches together also cover the site (an RMSNorm + modulation
    # fused as rms_norm + scale_shift leaves nothing unfused): then no miss is owed
    alt: dict = dataclasses.field(default_factory=dict)
    # the case holds nothing of this family (no rope in a modulation case): a miss reported
    # for it is a spurious one, a report inconsistency
    absent: bool = False
    # this family's misses must give their reason: "no pattern variant matched this spelling"
    # (the report's default for an anchor no check explained) is a report inconsistency
    precise: bool = False


VAGUE = "no pattern variant matched"


def absent() -> Expect:
    return Expect(absent=True)


def site(n: int = 1) -> Expect:
    return Expect(want=n, allow=n, report=n)


def near(allow: int = 0) -> Expect:
    return Expect(want=0, allow=allow, report=0)


def free(n: int = 1) -> Expect:
    return Expect(want=0, allow=n, report=n)


class Draw:
    """Seeded choices, recorded with their options; `fixed` overrides choices (shrinking)."""

    def __init__(self, rng: random.Random, fixed: Optional[dict] = None):
        self.rng, self.fixed = rng, dict(fixed or {})
        self.values: dict[str, Any] = {}
        self.options: dict[str, tuple] = {}

    def __call__(self, key: str, options: Sequence, weights: Optional[Sequence[float]] = None):
        options = tuple(options)
        self.options[key] = options
        if key in self.fixed and self.fixed[key] in options:
            v = self.fixed[key]
        else:
            v = self.rng.choices(options, weights)[0]
        self.values[key] = v
        return v

    def flag(self, key: str, p: float) -> bool:
        """A yes/no choice, no (the plain option) first."""
        return self(key, (False, True), (1 - p, p))


@dataclasses.dataclass
class Case:
    family: str
    kind: str                      # "site" | "near" | "free"
    name: str                      # what was drawn, short
    init: list                     # lines of M.__init__ after super().__init__()
    body: list                     # lines of M.forward (the last one returns)
    args: list                     # [(name, expression)] inputs
    expect: dict                   # family -> Expect
    tol: str = "float32"           # the loosest float dtype the case computes in
    # fraction of output elements allowed past the tolerance: an integer cast after the site
    # turns a last-bit difference into a whole unit (Triton's CPU interpreter truncates
    # fp32 -> bf16 where a GPU rounds); a false match moves most elements, not a few
    outliers: float = 0.0
    helpers: list = dataclasses.field(default_factory=list)  # module-level source blocks
    params: dict = dataclasses.field(default_factory=dict)
    options: dict = dataclasses.field(default_factory=dict)
    seed: int = 0                  # the rng seed that drew it (with params: the structure)
    index: int = 0

    def source(self) -> str:
        helpers = "".join(h.strip("\n") + "\n\n\n" for h in dict.fromkeys(self.helpers))
        init = "\n".join("        " + ln for ln in self.init) or "        pass"
        body = "\n".join("        " + ln for ln in self.body)
        names = ", ".join(n for n, _ in self.args)
        exprs = "".join(f"        {e},\n" for _, e in self.args)
        return (
            "import torch\nimport torch.nn as nn\nimport torch.nn.functional as F\n\n\n"
            f"{helpers}"
            "class M(nn.Module):\n"
            "    def __init__(self):\n        super().__init__()\n"
            f"{init}\n\n"
            f"    def forward(self, {names}):\n{body}\n\n\n"
            "def make():\n"
            f"    return M().eval(), (\n{exprs}    )\n"
        )


# ------------------------------------------------------------------ tensor expressions
def dt(name: str) -> str:
    return f"torch.{name}"


def randn(shape: Sequence[int], dtype: str = "float32", layout: str = "contig", scale: float = 1.0) -> str:
    """Source for a fresh random tensor of `shape`, laid out as `layout`:
    contig | transposed (last two dims swapped in memory) | sliced (rows padded) |
    strided (every other element of the last dim) | batch_step (every other batch)."""
    shape = list(shape)
    kw = "" if dtype == "float32" else f", dtype={dt(dtype)}"
    mul = "" if scale == 1.0 else f" * {scale}"

    def mk(s):
        return f"torch.randn({', '.join(map(str, s))}{kw})"
    if layout == "transposed" and len(shape) >= 2:
        s = shape[:-2] + [shape[-1], shape[-2]]
        e = f"{mk(s)}.transpose(-1, -2)"
    elif layout == "sliced" and len(shape) >= 2:
        e = f"{mk(shape[:-1] + [shape[-1] + 3])}[..., :{shape[-1]}]"
    elif layout == "strided":
        e = f"{mk(shape[:-1] + [2 * shape[-1]])}[..., ::2]"
    elif layout == "batch_step" and len(shape) >= 2:
        e = f"{mk([2 * shape[0]] + shape[1:])}[::2]"
    else:
        e = mk(shape)
    return f"({e}{mul})" if mul else e


def param(name: str, shape: Sequence[int], dtype: str = "float32", scale: Optional[float] = None) -> str:
    kw = "" if dtype == "float32" else f", dtype={dt(dtype)}"
    mul = "" if scale is None else f" * {scale}"
    return f"self.{name} = nn.Parameter(torch.randn({', '.join(map(str, shape))}{kw}){mul})"


def loosest(*dtypes: str) -> str:
    return max((d for d in dtypes if d in RANK), key=RANK.get, default="float32")


def dims(d: Draw, zero: float = 0.02):
    """B and L: small sizes, 1 and odd ones included; now and then a zero-size dim."""
    b = d("B", (2, 1, 3, 0), (5, 3, 2, zero * 10))
    l = d("L", (5, 1, 4, 7, 0), (4, 2, 2, 2, zero * 10))
    return b, l
