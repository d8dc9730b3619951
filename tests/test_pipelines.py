"""Tiny Wan pipelines end to end on CPU (issue: drop-in for real Wan pipelines):
T2V / I2V / TI2V with classifier-free guidance, full and regional compile, resolution
change, group offloading, a fused LoRA. Each compares with the same pipeline run eagerly."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import difffuse
from difffuse.testing.expected import expected, expected_misses, miss_counts
from difffuse.testing.tiny_pipelines import LAYERS, MODEL_OF, PIPELINES, call

pytest.importorskip("diffusers")
OPTS = {"lowering": "reference"}


@pytest.mark.parametrize("kind", ["t2v", "i2v", "ti2v"])
@pytest.mark.parametrize("regional", [False, True], ids=["full", "regional"])
def test_pipeline_matches_eager(kind, regional):
    pipe = PIPELINES[kind]()
    pipe.set_progress_bar_config(disable=True)
    ref = call(pipe, kind)
    torch._dynamo.reset()
    difffuse.reset_report()
    if regional:
        pipe.transformer.compile_repeated_blocks(backend="difffuse", options=OPTS)
    else:
        pipe.transformer = torch.compile(pipe.transformer, backend="difffuse", options=OPTS)
    out = call(pipe, kind)
    rep = difffuse.report()
    # one compiled graph (whole transformer, or the one repeated block) for every call: CFG
    # and the second step add no recompile, so no match is counted twice
    assert rep.matches() == expected(MODEL_OF[kind], LAYERS, regional), (str(rep), rep.variants())
    assert miss_counts(rep) == expected_misses(MODEL_OF[kind], LAYERS, regional), str(rep)
    np.testing.assert_allclose(out, ref, atol=2e-3)


def _compiles(backend, shapes):
    pipe = PIPELINES["t2v"]()
    pipe.set_progress_bar_config(disable=True)
    torch._dynamo.reset()
    difffuse.reset_report()
    n = [0]
    if backend == "inductor":
        from torch._inductor.compile_fx import compile_fx

        def counting(gm, ex):
            n[0] += 1
            return compile_fx(gm, ex)
        pipe.transformer.compile_repeated_blocks(backend=counting)
    else:
        pipe.transformer.compile_repeated_blocks(backend="difffuse", options=OPTS)
    for h, w, f in shapes:
        call(pipe, "t2v", h, w, f, steps=1)
    return n[0] if backend == "inductor" else len(difffuse.report().graphs)


def test_resolution_change_adds_no_recompile():
    shapes = [(32, 48, 9), (48, 64, 9), (32, 48, 13)]
    plain = _compiles("inductor", shapes)
    ours = _compiles("difffuse", shapes)
    assert ours == plain
    per_graph = [g.matches for g in difffuse.report().graphs]
    assert per_graph and all(m == expected("wan-t2v-tiny", LAYERS, regional=True) for m in per_graph), \
        per_graph  # every match kept after each


def test_group_offload_under_compile():
    pipe = PIPELINES["t2v"]()
    pipe.set_progress_bar_config(disable=True)
    ref = call(pipe, "t2v")
    pipe.transformer.enable_group_offload(torch.device("cpu"), offload_type="block_level",
                                          num_blocks_per_group=1)
    torch._dynamo.reset()
    difffuse.reset_report()
    pipe.transformer.compile_repeated_blocks(backend="difffuse", options=OPTS)
    out = call(pipe, "t2v")
    rep = difffuse.report()
    assert rep.matches() == expected("wan-t2v-tiny", LAYERS, regional=True) and rep.misses == [], str(rep)
    np.testing.assert_allclose(out, ref, atol=2e-3)


def test_fused_lora_under_compile():
    pytest.importorskip("peft")
    from peft import LoraConfig

    pipe = PIPELINES["t2v"]()
    pipe.set_progress_bar_config(disable=True)
    pipe.transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v"],
                                            init_lora_weights=False))
    ref_unfused = call(pipe, "t2v")
    pipe.transformer.fuse_lora()
    ref = call(pipe, "t2v")
    np.testing.assert_allclose(ref, ref_unfused, atol=2e-3)
    torch._dynamo.reset()
    difffuse.reset_report()
    pipe.transformer = torch.compile(pipe.transformer, backend="difffuse", options=OPTS)
    out = call(pipe, "t2v")
    rep = difffuse.report()
    assert rep.matches() == expected("wan-t2v-tiny", LAYERS) and rep.misses == [], str(rep)
    np.testing.assert_allclose(out, ref, atol=2e-3)


def test_fullgraph_no_graph_break_no_recompile():
    pipe = PIPELINES["t2v"]()
    pipe.set_progress_bar_config(disable=True)
    torch._dynamo.reset()
    difffuse.reset_report()
    pipe.transformer = torch.compile(pipe.transformer, backend="difffuse", options=OPTS, fullgraph=True)
    call(pipe, "t2v", steps=2)
    n = len(difffuse.report().graphs)
    call(pipe, "t2v", steps=2)
    assert len(difffuse.report().graphs) == n == 1
