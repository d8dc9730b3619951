"""linear_gelu cases: `F.gelu(linear(x), approximate="tanh")` on 2-D and 3-D inputs (and
diffusers' GELU with its `.float()` upcast), fp32/bf16/fp16, odd widths, non-contiguous x.
Near-misses: erf-GELU, another cubic constant, the pre-activation also returned, GELU of
something that is not a Linear's output, SiLU; free: a Linear without bias (mm, no addmm),
a hand-written tanh-GELU (unfused, it must be reported)."""
from __future__ import annotations

from .case import Case, Draw, Expect, dims, near, randn, site

FAMILY = "linear_gelu"
NEAR = ("erf", "other_constant", "two_users", "not_linear", "silu")
FREE = ("no_bias", "handwritten")


def draw(d: Draw) -> Case:
    dtype = d("dtype", ("float32", "bfloat16", "float16"), (5, 3, 2))
    b, l = dims(d)
    din = d("d_in", (16, 13, 24, 1))
    dout = d("d_out", (32, 17, 8, 1))
    rank = d("rank", (3, 2), (2, 1))
    shape = [b, l, din] if rank == 3 else [b * max(l, 1), din]
    layout = d("layout", ("contig", "transposed", "sliced"), (5, 1, 1))
    kind = d("kind", ("site", "near", "free"), (5, 3, 2))
    what = d("near", NEAR) if kind == "near" else d("free", FREE) if kind == "free" else "none"
    bias = what != "no_bias"
    init = [f"self.lin = nn.Linear({din}, {dout}, bias={bias}, dtype=torch.{dtype})"]
    body = ["h = self.lin(x)"]
    upcast = d("upcast", (False, True), (3, 1))  # diffusers' GELU: gelu(h.float()).to(h.dtype)
    hin = "h.float()" if upcast else "h"
    if what == "not_linear":
        hin = f"({hin} * 2)"
    if what == "erf":
        g = f"F.gelu({hin})"
    elif what == "silu":
        g = f"F.silu({hin})"
    elif what in ("other_constant", "handwritten"):
        c = 0.05 if what == "other_constant" else 0.044715
        g = f"0.5 * {hin} * (1 + torch.tanh(0.7978845608028654 * ({hin} + {c} * {hin} * {hin} * {hin})))"
    else:
        g = f"F.gelu({hin}, approximate=\"tanh\")"
    body.append(f"y = {g}" + (".to(h.dtype)" if upcast else ""))
    body.append("return y, h" if what == "two_users" else "return y")
    expect = {FAMILY: site()}
    if kind == "near":
        expect = {FAMILY: near()}
    elif kind == "free":
        # a hand-written tanh-GELU is a reported miss in fp32 (test_linear_gelu_patterns); in
        # bf16/fp16 every op rounds, the graph differs, and linear_gelu is no report-honesty family
        expect = {FAMILY: Expect(want=0, allow=1, report=int(what == "handwritten" and dtype == "float32"))}
    if 0 in shape:
        kind, expect = "free", {FAMILY: Expect(want=0, allow=1, report=0)}
    name = f"{kind}:{what}/{dtype}/{shape}->{dout}/{layout}/upcast={upcast}"
    return Case(FAMILY, kind, name, init, body, [("x", randn(shape, dtype, layout))], expect, dtype)
