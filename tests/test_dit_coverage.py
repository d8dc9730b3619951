"""Beyond Wan: tiny Flux, Qwen-Image, HunyuanVideo, LTX-Video and CogVideoX transformers
(random init, built from configs) compiled whole with difffuse. For each: the exact matches
per family, the site table (norms, modulations, ropes counted in eager by
`difffuse.testing.sites`, against the modules each match covers), every unfused site with
its reason, and the output close to eager (fp32 and bf16)."""
from __future__ import annotations

import pytest
import torch

import difffuse
from conftest import TOL, without_attention
from difffuse.testing import sites
from difffuse.testing.tiny_dits import DITS

pytest.importorskip("diffusers")

LAYERS = 2  # double- and single-stream stacks alike

# per model, with LAYERS blocks in each stack: matches per family, and (fused, sites) per kind
EXPECTED = {
    "flux-tiny": ({"qk_norm_rope": 8, "norm_scale_shift": 11, "scale_shift": 4, "linear_gelu": 6},
                  {"norm": (23, 23), "modulation": (11, 11), "rope": (8, 8)}),
    "qwen-image-tiny": ({"qk_norm_rope": 8, "norm_scale_shift": 8, "rms_norm": 1, "linear_gelu": 3},
                        {"norm": (17, 17), "modulation": (8, 8), "rope": (8, 8)}),
    "hunyuan-video-tiny": ({"qk_norm_rope": 8, "norm_scale_shift": 12, "rms_norm": 4, "scale_shift": 7,
                            "linear_gelu": 6},
                           {"norm": (24, 25), "modulation": (11, 11), "rope": (8, 8)}),
    "ltx-video-tiny": ({"qk_norm_rope": 4, "norm_scale_shift": 5, "rms_norm": 4, "scale_shift": 2,
                        "linear_gelu": 3},
                       {"norm": (13, 13), "modulation": (5, 5), "rope": (4, 4)}),
    "cogvideox-tiny": ({"qk_norm_rope": 4, "norm_scale_shift": 10, "linear_gelu": 2},
                       {"norm": (14, 14), "modulation": (9, 9), "rope": (4, 4)}),
}
# unfused sites every model is allowed, with the words their reason must contain
KNOWN_MISSES = {
    "hunyuan-video-tiny": {"context_embedder.token_refiner.refiner_blocks.0.norm1": "no family covers it"},
}
CASES = [(m, d) for m in DITS for d in (torch.float32, torch.bfloat16)]


@pytest.fixture(scope="module", params=CASES, ids=lambda c: f"{c[0]}-{str(c[1]).split('.')[-1]}")
def compiled(request):
    name, dtype = request.param
    model, kwargs = DITS[name](num_layers=LAYERS, dtype=dtype)
    eager_sites = sites.count_eager_sites(model, kwargs)
    torch._dynamo.reset()
    difffuse.reset_report()
    with torch.no_grad():
        ref = model(**kwargs)[0]
        out = torch.compile(model, backend="difffuse", options={"lowering": "reference"})(**kwargs)[0]
    rep = difffuse.report()
    return name, dtype, ref, out, rep, sites.coverage(eager_sites, rep)


def test_exact_matches(compiled):
    name, _, _, _, rep, _ = compiled
    assert without_attention(rep.matches()) == EXPECTED[name][0], (str(rep), rep.variants())


def test_site_table(compiled):
    name, _, _, _, _, table = compiled
    got = {k: (t["fused"], t["sites"]) for k, t in table.items()}
    assert got == EXPECTED[name][1], sites.format_table(name, table)


def test_every_unfused_site_is_known_with_its_reason(compiled):
    name, _, _, _, _, table = compiled
    missed = {p: m["reason"] for t in table.values() for p, m in t["missed"].items()}
    known = KNOWN_MISSES.get(name, {})
    assert set(missed) == set(known), sites.format_table(name, table)
    for path, words in known.items():
        assert words in missed[path], (path, missed[path])


def test_close_to_eager(compiled):
    _, dtype, ref, out, _, _ = compiled
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(out.float(), ref.float(), rtol=rtol * 5, atol=atol * 5)


def test_site_counter_sees_every_kind():
    """The eager counter is independent of the patterns: a Flux block has its norms, its
    AdaLN modulations and one rope per q and k."""
    model, kwargs = DITS["flux-tiny"](num_layers=1)
    eager = sites.count_eager_sites(model, kwargs)
    assert eager.norms["transformer_blocks.0.attn.norm_q"] == 1
    assert eager.modulated["transformer_blocks.0.norm1.norm"] == 1
    assert "transformer_blocks.0.attn.norm_q" not in eager.modulated  # the rope's x * cos is not one
    assert eager.ropes["transformer_blocks.0.attn"] == 2


@pytest.mark.slow
@pytest.mark.parametrize("name", ["flux-tiny", "hunyuan-video-tiny", "qwen-image-tiny", "ltx-video-tiny",
                                  "cogvideox-tiny"])
def test_cuda_lowering_takes_every_rope_site(name):
    """The Triton kernels (interpreted on a CPU, real on a GPU) take the joint-stream,
    token-range, complex, across-heads and LayerNorm in-place rope sites; the output stays
    close to eager."""
    from conftest import DEVICE

    model, kwargs = DITS[name](num_layers=1, dtype=torch.bfloat16)
    model.to(DEVICE)
    kwargs = {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    eager = sites.count_eager_sites(model, kwargs)
    torch._dynamo.reset()
    difffuse.reset_report()
    with torch.no_grad():
        ref = model(**kwargs)[0]
        out = torch.compile(model, backend="difffuse", options={"lowering": "cuda"})(**kwargs)[0]
    rep = difffuse.report()
    table = sites.coverage(eager, rep)
    assert table["rope"]["fused"] == table["rope"]["sites"] > 0, sites.format_table(name, table)
    rtol, atol = TOL[torch.bfloat16]
    torch.testing.assert_close(out.float(), ref.float(), rtol=5 * rtol, atol=5 * atol)
