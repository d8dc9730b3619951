"""The report is honest (issue 20, item 7): for every tiny model in difffuse.testing and a
Wan with per-frame modulation (SkyReels-V2 diffusion forcing), compiled whole with the
reference lowering, the sites counted in eager by `difffuse.testing.sites` equal the
matches plus the reported misses, per kind (norm / modulation / rope): every unfused site
is a miss traced in its module, no miss lacks a site and no match covers none. And the
exact state today: every site fused, zero misses, matches as derived from the number of
blocks (difffuse.testing.expected), at two block counts. The 2-block compiles are shared
with test_wan_coverage / test_dit_coverage (difffuse.testing.compiled)."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from difffuse.fusion_pass.report import GraphRecord, Miss, Report
from difffuse.testing import sites
from difffuse.testing.compiled import BUILDERS, compile_tiny
from difffuse.testing.expected import expected, expected_misses, expected_sites, miss_counts, plain_norms

pytest.importorskip("diffusers")

CASES = [(name, n) for n in (2, 1) for name in BUILDERS]


@pytest.fixture(scope="module", params=CASES, ids=lambda c: f"{c[0]}-{c[1]}layers")
def compiled(request):
    name, n = request.param
    return compile_tiny(name, n)


def _explain(c) -> str:
    h = c.honesty()
    return "\n".join([c.table(), str(c.report), f"stray misses: {h['stray_misses']}",
                      f"phantom matches: {h['phantom_matches']}"])


def test_sites_are_matches_plus_reported_misses(compiled):
    h = compiled.honesty()
    for kind in sites.KINDS:
        assert h[kind]["silent"] == 0, (kind, _explain(compiled))
        assert h[kind]["sites"] == h[kind]["fused"] + h[kind]["reported"], (kind, _explain(compiled))
    assert h["stray_misses"] == [] and h["phantom_matches"] == [], _explain(compiled)


def test_every_site_fused_no_misses(compiled):
    """The exact expectation: the eager sites per kind as derived, all fused; the only misses
    are the masked attention calls."""
    h = compiled.honesty()
    got = {k: (h[k]["fused"], h[k]["sites"]) for k in sites.KINDS}
    want = {k: (n, n) for k, n in expected_sites(compiled.name, compiled.num_layers).items()}
    assert got == want, _explain(compiled)
    assert miss_counts(compiled.report) == expected_misses(compiled.name, compiled.num_layers), _explain(compiled)


def test_matches_derived_from_num_layers(compiled):
    assert compiled.report.matches() == expected(compiled.name, compiled.num_layers), _explain(compiled)


def test_close_to_eager(compiled):
    torch.testing.assert_close(compiled.out.float(), compiled.ref.float(), rtol=5e-5, atol=5e-5)


# --------------------------------------------------------------- the check itself can fail
def _without(report, family: str, path: str, miss: bool) -> Report:
    """The report with the matches of `family` that cover `path` dropped (and, if `miss`, a
    miss traced in `path` added in their place)."""
    records = []
    for g in report.graphs:
        kept = [s for s in g.sites if not (s[0] == family and path in s[2])]
        misses = list(g.misses) + ([Miss(family, "left unfused on purpose", "", path)] * (len(g.sites) - len(kept))
                                   if miss else [])
        records.append(dataclasses.replace(g, sites=kept, misses=misses))
    return Report(records)


def test_honesty_check_catches_a_silent_and_a_stray_miss():
    """An unfused site without a miss is silent; with one it is reported; a miss where no
    site is, and a match that covers no site, are flagged."""
    c = compile_tiny("wan-t2v-tiny", 2)
    silent = sites.honesty(c.eager, _without(c.report, "norm_scale_shift", "blocks.0.norm2", miss=False))
    assert silent["norm"]["silent"] == 1 and not sites.is_honest(silent)
    reported = sites.honesty(c.eager, _without(c.report, "norm_scale_shift", "blocks.0.norm2", miss=True))
    norms = expected_sites("wan-t2v-tiny", 2)["norm"]
    assert reported["norm"] == {"sites": norms, "fused": norms - 1, "reported": 1, "silent": 0}
    assert sites.is_honest(reported)
    # a modulated norm left unfused: one miss stands for the norm and its modulation
    both = sites.honesty(c.eager, _without(c.report, "norm_scale_shift", "blocks.1.norm3", miss=True))
    assert both["modulation"]["reported"] == 1 and both["norm"]["reported"] == 1 and sites.is_honest(both)
    stray = Report([GraphRecord("g", "reference", misses=[Miss("rms_norm", "r", "", "patch_embedding")],
                                sites=[["rms_norm", "v", ["proj_out"]]], modules=["proj_out"])])
    h = sites.honesty(c.eager, stray)
    assert len(h["stray_misses"]) == 1 and len(h["phantom_matches"]) == 1 and not sites.is_honest(h)


# --------------------------------------------------------------- the eager counter
def test_eager_counter_sees_inline_ropes_and_plain_norms():
    """Wan's rope is written inline in its processor (an unbind of interleaved pairs): one per
    q and k of the self-attention, none in the cross-attention. A LayerNorm that reads no
    residual, is not modulated and not roped is no site (HunyuanVideo's token-refiner
    norm1, Wan I2V's image-embedder norms); one that reads a residual sum is (the refiner's
    norm2, Wan's norm2: affine LN, no modulation)."""
    model, kwargs = BUILDERS["wan-i2v-tiny"](num_layers=1)
    eager = sites.count_eager_sites(model, kwargs)
    assert dict(eager.ropes) == {"blocks.0.attn1": 2}
    assert eager.norms["blocks.0.norm2"] == 1 and "blocks.0.norm2" not in eager.modulated
    assert eager.modulated["blocks.0.norm1"] == eager.modulated["blocks.0.norm3"] == 1
    assert dict(eager.plain) == plain_norms("wan-i2v-tiny")
    model, kwargs = BUILDERS["hunyuan-video-tiny"](num_layers=1)
    eager = sites.count_eager_sites(model, kwargs)
    assert dict(eager.plain) == plain_norms("hunyuan-video-tiny")
    assert eager.norms["context_embedder.token_refiner.refiner_blocks.0.norm2"] == 1


def test_eager_counter_sees_layernorm_before_rope():
    """CogVideoX's per-head q/k LayerNorm reads no residual and is not modulated, but its
    output is roped (in place, on the video tokens): a site."""
    model, kwargs = BUILDERS["cogvideox-tiny"](num_layers=1)
    eager = sites.count_eager_sites(model, kwargs)
    assert eager.norms["transformer_blocks.0.attn1.norm_q"] == eager.norms["transformer_blocks.0.attn1.norm_k"] == 1
    assert eager.ropes["transformer_blocks.0.attn1"] == 2 and not eager.plain
