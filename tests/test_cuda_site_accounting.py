"""Site accounting with the CUDA lowering, on a CPU (issue 28, Report): every site a
family's anchor sees is matched or reported with the reason that stopped it. The fuzzer on
CUDA tensors (seed 4242) found sites that were neither:

- attention: SDPA's dispatcher sends a call no fused kernel takes (fp32, head dim 5 on
  CUDA) to its math fallback, so the graph holds matmul / softmax / matmul and no attention
  op; the anchor looked for attention ops only. Reproduced here with the math backend forced.
- linear_gelu: Inductor's pad_mm (CUDA, by benchmark: intermittent) pads the Linear's matmul
  and the GELU reads a slice of it; a bf16/fp16 one-output Linear is decomposed into
  sum(x * w) + b with casts around it. The anchor's walk from the GELU back to the Linear
  stopped at the slice / the cast. Reproduced with the slice of a padded Linear written out,
  and with a one-output bf16 Linear (decomposed on a CPU as well).

Each case runs through the fuzzer's accounting (`runner.run_case`: `incons` = a site left
unfused and not reported) with the CUDA lowering (its Triton kernels under the interpreter,
its eligibility as on a GPU)."""
from __future__ import annotations

import contextlib

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from difffuse.testing.fuzz import runner
from difffuse.testing.fuzz.case import Case, randn, site

pytest.importorskip("triton")

ATTENTION = Case(
    "attention", "site", "math-fallback/float32/H3/D5", [],
    ["q_, k_, v_ = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)",
     "o = F.scaled_dot_product_attention(q_, k_, v_)",
     "return o.transpose(1, 2).flatten(2)"],
    [(n, randn([2, 7, 3, 5])) for n in "qkv"], {"attention": site()})

PADDED_LINEAR = Case(  # pad_mm's graph, written out: pad rows, Linear, slice the rows back
    "linear_gelu", "site", "padded-matmul/float32/[10, 13]->1", ["self.lin = nn.Linear(13, 1)"],
    ["h = self.lin(F.pad(x, (0, 0, 0, 6)))[:10]", "return F.gelu(h, approximate=\"tanh\")"],
    [("x", randn([10, 13]))], {"linear_gelu": site()})

ONE_OUTPUT_BF16 = Case(  # Inductor's sum(x * w) + b, computed in fp32 and cast back to bf16
    "linear_gelu", "site", "one-output/bfloat16/[1, 1, 24]->1", ["self.lin = nn.Linear(24, 1, dtype=torch.bfloat16)"],
    ["return F.gelu(self.lin(x), approximate=\"tanh\")"],
    [("x", randn([1, 1, 24], "bfloat16", "transposed"))], {"linear_gelu": site()}, tol="bfloat16")

CASES = {  # case, context it compiles in, words the miss's reason must hold
    "attention-math-fallback": (ATTENTION, lambda: sdpa_kernel(SDPBackend.MATH), "math fallback (float32 q, head dim 5)"),
    "linear-gelu-padded-matmul": (PADDED_LINEAR, contextlib.nullcontext, "slice of the Linear's matmul"),
    "linear-gelu-one-output-bf16": (ONE_OUTPUT_BF16, contextlib.nullcontext, "sum(x * w) + b"),
}


@pytest.mark.parametrize("inductor", [True, False], ids=["inductor", "eager"])
@pytest.mark.parametrize("name", list(CASES))
def test_site_is_matched_or_reported(name, inductor):
    case, context, words = CASES[name]
    with context():
        res = runner.run_case(case, "cuda", inductor)
    assert not res.invalid and not res.error, (res.invalid, res.error)
    assert not res.failed(), (res.flags, res.misses, res.counts)
    assert res.counts.get(case.family, 0) == 0 and [f for f, _ in res.misses] == [case.family], res.misses
    assert words in res.misses[0][1], res.misses


def test_math_fallback_miss_names_the_sdpa_line():
    """The math path's nodes may have been re-traced by an Inductor pattern (no stack trace
    of their own): the miss takes the line of the SDPA call from the node they feed."""
    import difffuse

    with sdpa_kernel(SDPBackend.MATH):
        res = runner.run_case(ATTENTION, "reference", True)
    assert [f for f, _ in res.misses] == ["attention"], res.misses
    assert "scaled_dot_product_attention" in difffuse.report().misses[0].source


def test_attention_op_still_routed_on_cpu():
    """Without the math fallback the same call is one attention op: matched, no miss."""
    res = runner.run_case(ATTENTION, "reference", True)
    assert res.counts == {"attention": 1} and not res.misses and not res.failed(), (res.counts, res.misses)
