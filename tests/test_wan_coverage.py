"""Tiny diffusers Wan models (random init, built from configs): exact matches per family
as a function of num_layers, zero misses, output close to eager, for full-model compile
and compile_repeated_blocks, fp32 and bf16. Compiled once per case (module fixture)."""
from __future__ import annotations

import pytest
import torch

import difffuse
from conftest import TOL, without_attention
from difffuse.testing.tiny_models import MODELS

pytest.importorskip("diffusers")

LAYERS = 2


def expected(model: str, regional: bool, n: int) -> dict:
    """Matches per family for a Wan model of n blocks.

    Per block: self-attention q and k (norm across heads + interleaved rope) -> 2
    qk_norm_rope; cross-attention q and k norms (and I2V's image-key norm) -> rms_norm;
    norm1 (LN -> *(1+scale)+shift), norm2 (h + attn*gate -> affine LN) and norm3 (h + attn ->
    LN -> *(1+c_scale)+c_shift) -> 3 norm_scale_shift. The FFN's gated residual is a
    scale_shift at a block boundary (regional compile); in a full-model compile it feeds
    the next block's norm1 (or norm_out) and fuses into that norm_scale_shift, and
    norm_out with its modulation adds one norm_scale_shift. Every FFN (and, outside the
    blocks, the text embedder's gelu_tanh projection) is a Linear + tanh-GELU.
    """
    rms = 3 if model == "wan-i2v-tiny" else 2
    if regional:
        return {"qk_norm_rope": 2, "rms_norm": rms, "norm_scale_shift": 3, "linear_gelu": 1, "scale_shift": 1}
    return {"qk_norm_rope": 2 * n, "rms_norm": rms * n, "norm_scale_shift": 3 * n + 1, "linear_gelu": n + 1}


CASES = [(m, r, d) for m in MODELS for r in (False, True) for d in (torch.float32, torch.bfloat16)]


@pytest.fixture(scope="module", params=CASES, ids=lambda c: f"{c[0]}-{'regional' if c[1] else 'full'}-"
                                                              f"{str(c[2]).split('.')[-1]}")
def compiled_case(request):
    name, regional, dtype = request.param
    model, kwargs = MODELS[name](num_layers=LAYERS, dtype=dtype)
    torch._dynamo.reset()
    difffuse.reset_report()
    with torch.no_grad():
        ref = model(**kwargs)[0]
        if regional:
            model.compile_repeated_blocks(backend="difffuse", options={"lowering": "reference"})
            out = model(**kwargs)[0]
        else:
            out = torch.compile(model, backend="difffuse", options={"lowering": "reference"})(**kwargs)[0]
    return name, regional, dtype, ref, out, difffuse.report()


def test_exact_matches(compiled_case):
    name, regional, dtype, _, _, rep = compiled_case
    assert without_attention(rep.matches()) == expected(name, regional, LAYERS), (str(rep), rep.variants())


def test_no_misses(compiled_case):
    rep = compiled_case[-1]
    assert rep.misses == [], str(rep)


def test_close_to_eager(compiled_case):
    _, _, dtype, ref, out, _ = compiled_case
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(out.float(), ref.float(), rtol=rtol * 5, atol=atol * 5)


def test_counts_scale_with_layers():
    model, kwargs = MODELS["wan-t2v-tiny"](num_layers=3)
    torch._dynamo.reset()
    difffuse.reset_report()
    with torch.no_grad():
        torch.compile(model, backend="difffuse", options={"lowering": "reference"})(**kwargs)
    assert without_attention(difffuse.report().matches()) == expected("wan-t2v-tiny", False, 3)


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
    assert without_attention(rep.matches()) == expected("wan-t2v-tiny", False, 1)
