"""Tiny diffusers Wan models (random init, built from configs): exact matches per family
(derived from num_layers: difffuse.testing.expected), zero misses, output close to eager,
for full-model compile and compile_repeated_blocks, fp32 and bf16. Wan 2.1 T2V / I2V, Wan
2.2 TI2V (per-token modulation) and SkyReels-V2 diffusion forcing (per-frame modulation).
Compiled once per case, shared with test_report_honesty (difffuse.testing.compiled)."""
from __future__ import annotations

import pytest
import torch

import difffuse
from conftest import TOL
from difffuse.testing.compiled import compile_tiny
from difffuse.testing.expected import expected
from difffuse.testing.tiny_models import MODELS

pytest.importorskip("diffusers")

LAYERS = 2

# the per-frame Wan shares the per-token Wan's structure: its full fp32 compile is shared with
# the honesty test, bf16 full and regional cover its rounding and its block graph
CASES = [(m, r, d) for m in MODELS if m != "wan-df-tiny" for r in (False, True)
         for d in (torch.float32, torch.bfloat16)]
CASES += [("wan-df-tiny", False, torch.float32), ("wan-df-tiny", False, torch.bfloat16),
          ("wan-df-tiny", True, torch.bfloat16)]


@pytest.fixture(scope="module", params=CASES, ids=lambda c: f"{c[0]}-{'regional' if c[1] else 'full'}-"
                                                              f"{str(c[2]).split('.')[-1]}")
def compiled_case(request):
    name, regional, dtype = request.param
    c = compile_tiny(name, LAYERS, dtype, regional)
    return name, regional, dtype, c.ref, c.out, c.report


def test_exact_matches(compiled_case):
    name, regional, dtype, _, _, rep = compiled_case
    assert rep.matches() == expected(name, LAYERS, regional, dtype), (str(rep), rep.variants())


def test_no_misses(compiled_case):
    rep = compiled_case[-1]
    assert rep.misses == [], str(rep)


def test_close_to_eager(compiled_case):
    _, _, dtype, ref, out, _ = compiled_case
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(out.float(), ref.float(), rtol=rtol * 5, atol=atol * 5)


def test_dynamic_resolutions_no_recompile_matches_kept():
    model, _ = MODELS["wan-t2v-tiny"](num_layers=1)
    torch._dynamo.reset()
    difffuse.reset_report()
    compiled = torch.compile(model, backend="difffuse", options={"lowering": "reference"}, dynamic=True)
    text = torch.randn(1, 7, 16)
    graphs_after_first = None
    with torch.no_grad():
        # h != w from the start: duck sizing would otherwise guard h == w (plain Inductor too)
        for f, h, w in [(3, 8, 12), (5, 12, 16), (2, 16, 8)]:
            x = torch.randn(1, 4, f, h, w)
            out = compiled(hidden_states=x, timestep=torch.tensor([10]), encoder_hidden_states=text,
                           return_dict=False)[0]
            ref = model(hidden_states=x, timestep=torch.tensor([10]), encoder_hidden_states=text,
                        return_dict=False)[0]
            torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
            graphs_after_first = graphs_after_first or len(difffuse.report().graphs)
    rep = difffuse.report()
    assert len(rep.graphs) == graphs_after_first, str(rep)  # no recompile
    assert rep.matches() == expected("wan-t2v-tiny", 1)
