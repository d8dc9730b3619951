"""Beyond Wan: tiny Flux, Qwen-Image, HunyuanVideo, LTX-Video and CogVideoX transformers
(random init, built from configs) compiled whole with difffuse. For each: the exact matches
per family and the site table (norms, modulations, ropes counted in eager by
`difffuse.testing.sites`, against the modules each match covers), both derived from the
number of blocks (difffuse.testing.expected), every site fused, and the output close to
eager (fp32 and bf16). The fp32 compiles are shared with test_report_honesty, which checks
that every unfused site would be a reported miss."""
from __future__ import annotations

import pytest
import torch

import difffuse
from conftest import TOL
from difffuse.testing import sites
from difffuse.testing.compiled import compile_tiny
from difffuse.testing.expected import expected, expected_sites, plain_norms
from difffuse.testing.tiny_dits import DITS

pytest.importorskip("diffusers")

LAYERS = 2  # double- and single-stream stacks alike
CASES = [(m, d) for m in DITS for d in (torch.float32, torch.bfloat16)]


@pytest.fixture(scope="module", params=CASES, ids=lambda c: f"{c[0]}-{str(c[1]).split('.')[-1]}")
def compiled(request):
    name, dtype = request.param
    c = compile_tiny(name, LAYERS, dtype)
    return name, dtype, c.ref, c.out, c.report, c.coverage(), c.eager


def test_exact_matches(compiled):
    name, dtype, _, _, rep, _, _ = compiled
    assert rep.matches() == expected(name, LAYERS, dtype=dtype), (str(rep), rep.variants())


def test_site_table(compiled):
    name, _, _, _, _, table, eager = compiled
    got = {k: (t["fused"], t["sites"]) for k, t in table.items()}
    want = {k: (n, n) for k, n in expected_sites(name, LAYERS).items()}
    assert got == want, sites.format_table(name, table, eager)


def test_every_site_fused_and_plain_norms_known(compiled):
    name, _, _, _, _, table, eager = compiled
    missed = {p: m["reason"] for t in table.values() for p, m in t["missed"].items()}
    assert missed == {}, sites.format_table(name, table, eager)
    # LayerNorms no family is for (no residual before, no modulation after, no rope): not sites
    assert dict(eager.plain) == plain_norms(name), sites.format_table(name, table, eager)


def test_close_to_eager(compiled):
    _, dtype, ref, out, _, _, _ = compiled
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
    want = expected_sites(name, 1)["rope"]
    assert table["rope"]["fused"] == table["rope"]["sites"] == want, sites.format_table(name, table, eager)
    rtol, atol = TOL[torch.bfloat16]
    torch.testing.assert_close(out.float(), ref.float(), rtol=5 * rtol, atol=5 * atol)
