"""Tensor-parallel RMSNorm (design §3.1), on CPU with a 2-process gloo group: the variance
-> all-reduce(AVG) -> rsqrt-mul form matches (functional and in-place collectives, with
and without Inductor), is rewritten to difffuse::variance -> the same collective ->
difffuse::rsqrt_mul, equals the unfused graph, and on the NPU lowering calls exactly
fused_variance then fused_rsqrt_mul (stand-ins). Near-misses stay unfused with a reason.
All cases run in one spawn of 2 processes."""
from __future__ import annotations

import os
import sys

import pytest
import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as fc
import torch.multiprocessing as mp

from difffuse.testing.distributed import free_port
from difffuse.testing.vendor_stubs import npu_modules

WORLD, D = 2, 8


def sglang_form(x, w, group):
    """sglang's tensor_parallel_rms_norm (non-NPU branch), functional all-reduce."""
    xf = x.float()
    var = fc.all_reduce(xf.pow(2).mean(dim=-1, keepdim=True), "avg", group)
    return (xf * torch.rsqrt(var + 1e-6) * w.float()).to(x.dtype)


def inplace_sum_form(x, w, group):
    """`dist.all_reduce` (in place, SUM) then / world size."""
    var = x.pow(2).mean(-1, keepdim=True)
    dist.all_reduce(var, group=group)
    return x * torch.rsqrt(var / WORLD + 1e-5) * w


def bf16_variance(x, w, group):  # near-miss: the variance is all-reduced in bf16
    var = fc.all_reduce(x.pow(2).mean(-1, keepdim=True), "avg", group)
    return x * torch.rsqrt(var + 1e-6) * w


def wrong_divisor(x, w, group):  # near-miss: a sum divided by something else than the group size
    var = fc.all_reduce(x.pow(2).mean(-1, keepdim=True), "sum", group)
    return x * torch.rsqrt(var / 4 + 1e-6) * w


def _run(fn, x, w, options, graphs):
    import difffuse
    from difffuse.fusion_pass import pass_manager

    torch._dynamo.reset()
    difffuse.reset_report()
    graphs.clear()
    original = pass_manager.DifffusePass.__call__

    def recording(self, graph):
        original(self, graph)
        graphs.append(str(graph))

    pass_manager.DifffusePass.__call__ = recording
    try:
        with torch.no_grad():
            out = torch.compile(lambda a, b: fn(a, b, dist.group.WORLD), backend="difffuse", options=options)(x, w)
    finally:
        pass_manager.DifffusePass.__call__ = original
    return out, difffuse.report()


def worker(rank: int, port: int, tests_dir: str) -> None:
    sys.path.insert(0, tests_dir)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    from conftest import assert_close  # fresh Inductor cache dir, caches off

    torch.manual_seed(0)  # same full tensors on both ranks; each keeps its shard
    x_full, w_full = torch.randn(2, 3, WORLD * D), torch.randn(WORLD * D)
    x, w = x_full.tensor_split(WORLD, -1)[rank].contiguous(), w_full.tensor_split(WORLD)[rank].contiguous()
    full = torch.nn.functional.rms_norm(x_full, (WORLD * D,), w_full, eps=1e-6).tensor_split(WORLD, -1)[rank]
    graphs: list = []

    # 1. sglang's form in bf16, Inductor: variance -> same collective -> rsqrt_mul
    xb, wb = x.bfloat16(), w.bfloat16()
    with torch.no_grad():
        eager = sglang_form(xb, wb, dist.group.WORLD)
    assert_close(eager.float(), full, torch.bfloat16)  # the test's TP math is RMSNorm of the full row
    out, rep = _run(sglang_form, xb, wb, {"lowering": "reference"}, graphs)
    assert rep.matches() == {"rms_norm": 1}, str(rep)
    (variant,) = rep.variants()
    assert variant.startswith("rms_norm:tp/pow/avg/"), variant
    g = graphs[0]
    assert g.count("difffuse.variance") == 1 and g.count("difffuse.rsqrt_mul") == 1, g
    assert g.count("_c10d_functional.all_reduce") == 1 and "avg" in g and "rsqrt.default" not in g, g
    assert out.dtype == torch.bfloat16
    assert_close(out, eager)

    # 2. in-place dist.all_reduce (SUM) / world, fp32, graph run eagerly (the copy variant)
    with torch.no_grad():
        eager = inplace_sum_form(x, w, dist.group.WORLD)
    out, rep = _run(inplace_sum_form, x, w, {"lowering": "reference", "inductor": False}, graphs)
    assert list(rep.variants()) == ["rms_norm:tp/pow/sum_div_copy/w"], rep.variants()
    assert "sum" in graphs[0] and "difffuse.rsqrt_mul" in graphs[0]
    assert_close(out, eager)

    # 3. NPU lowering (stand-ins), eagerly run graph: exactly sglang's NPU calls
    calls: list = []
    sys.modules.update(npu_modules(calls))
    out, rep = _run(sglang_form, xb, wb, {"lowering": "npu", "inductor": False}, graphs)
    assert rep.matches() == {"rms_norm": 1} and rep.graphs[0].lowering == "npu", str(rep)
    f32 = torch.float32
    assert [(c[0], c[1]) for c in calls] == [
        ("fused_variance", [((1, 6, D), f32)]),
        ("fused_rsqrt_mul", [((1, 6, D), f32), ((1, 6, 1), f32), ((D,), f32)])], calls
    with torch.no_grad():
        assert torch.equal(out, sglang_form(xb, wb, dist.group.WORLD))

    # 4. near-misses: no match, a reason in the report, output unchanged
    for fn, why in [(bf16_variance, "variance computed in torch.bfloat16"),
                    (wrong_divisor, "not by the group size")]:
        with torch.no_grad():
            eager = fn(xb if fn is bf16_variance else x, wb if fn is bf16_variance else w, dist.group.WORLD)
        args = (xb, wb) if fn is bf16_variance else (x, w)
        out, rep = _run(fn, *args, {"lowering": "reference"}, graphs)
        assert rep.matches() == {}, (fn.__name__, str(rep))
        assert any(why in m.reason for m in rep.misses), (fn.__name__, [m.reason for m in rep.misses])
        assert_close(out, eager)
    dist.barrier()
    dist.destroy_process_group()


def test_tp_rms_norm_two_process_gloo():
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    mp.spawn(worker, args=(free_port(), os.path.dirname(os.path.abspath(__file__))), nprocs=WORLD, join=True)
