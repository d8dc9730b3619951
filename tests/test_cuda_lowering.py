"""The CUDA lowering: every Triton kernel against the reference op (odd shapes, broadcast and
strided operands, strided weights and biases, random full rope tables, fp32/bf16/fp16,
outputs poisoned with NaN) on sites its `supports` accepts, zero-size inputs, the
functionalized trace that turns a launcher into Inductor's user-defined-kernel node, and the
tiny Wan model compiled with ``lowering="cuda"``. On a CPU-only machine the kernels run in
Triton's interpreter (conftest sets TRITON_INTERPRET=1); on a GPU the same tests run on
CUDA tensors, and the ``cuda``-marked ones add real sizes and the generated code."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import difffuse
from conftest import DEVICE, TOL, assert_close
from difffuse.lowering import cuda, ops
from difffuse.lowering.sites import SITE_TYPES, TensorSpec
from difffuse.testing.expected import expected

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
F32 = torch.float32


def rnd(*shape, dtype=F32):
    return torch.randn(*shape, device=DEVICE, dtype=dtype)


def table(*shape):
    return torch.rand(*shape, device=DEVICE) * 2 - 1


def col(n, dtype=F32):
    """Column 0 of an [n, 2] parameter: a weight read with stride 2 (issue 20, item 4)."""
    return rnd(n, 2, dtype=dtype)[:, 0]


def complex_table(l, d):
    t = torch.polar(torch.ones(l, d // 2, device=DEVICE), torch.rand(l, d // 2, device=DEVICE) * 6.28)
    return torch.view_as_real(t).flatten(-2).unsqueeze(1)  # [L, 1, D]: (re, im) pairs, as the pattern passes


# family -> {case: fn(dtype) -> args of the reference op}
CASES = {
    "rms_norm": {
        "weight": lambda dt: (rnd(3, 37, 72, dtype=dt), rnd(72, dtype=dt), 1e-6, dt),
        "no-weight-2d": lambda dt: (rnd(37, 200, dtype=dt), None, 1e-5, dt),
        "strided-fp32-out": lambda dt: (rnd(2, 72, 11, dtype=dt).transpose(1, 2), rnd(72), 1e-6, F32),
        "strided-weight": lambda dt: (rnd(3, 37, 72, dtype=dt), col(72, dt), 1e-6, dt),
        "weight-widens-output": lambda dt: (rnd(37, 72, dtype=dt), rnd(1, 1, 72, dtype=dt), 1e-6, dt),
    },
    "scale_shift": {
        "per-sample": lambda dt: (rnd(2, 9, 40, dtype=dt), rnd(2, 1, 40), rnd(2, 1, 40), 1.0, dt),
        "shared-shift": lambda dt: (rnd(2, 9, 40, dtype=dt), rnd(2, 1, 40), rnd(1, 1, 40), 1.0, dt),
        "per-token": lambda dt: (rnd(2, 9, 40, dtype=dt), rnd(2, 9, 40, dtype=dt), rnd(2, 9, 40, dtype=dt), 1.0, dt),
        "per-frame": lambda dt: (rnd(2, 3, 5, 40, dtype=dt), rnd(2, 3, 1, 40), rnd(2, 3, 1, 40), 1.0, dt),
        "gated-residual": lambda dt: (rnd(2, 9, 40, dtype=dt), rnd(2, 1, 40), rnd(2, 9, 40, dtype=dt), 0.0, dt),
        "strided-no-shift": lambda dt: (rnd(2, 40, 9, dtype=dt).transpose(1, 2), rnd(40), None, 0.5, F32),
    },
    "norm_scale_shift": {
        # x, residual, gate, weight, bias, scale, shift, eps, k, is_rms, residual_dtype, out_dtype
        "ln-modulate": lambda dt: (rnd(2, 9, 40, dtype=dt), None, None, None, None, rnd(2, 1, 40), rnd(2, 1, 40),
                                   1e-6, 1.0, False, F32, dt),
        "gated-residual-affine-ln": lambda dt: (rnd(2, 9, 40, dtype=dt), rnd(2, 9, 40, dtype=dt), rnd(2, 1, 40),
                                                rnd(40), rnd(40), None, None, 1e-6, 1.0, False, dt, dt),
        "residual-ln-per-token": lambda dt: (rnd(2, 9, 40, dtype=dt), rnd(2, 9, 40, dtype=dt), None, None, None,
                                             rnd(2, 9, 40), rnd(2, 9, 40), 1e-5, 1.0, False, dt, dt),
        "rms-strided": lambda dt: (rnd(2, 40, 9, dtype=dt).transpose(1, 2), rnd(2, 9, 40), None, rnd(40), None,
                                   rnd(2, 1, 40), None, 1e-6, 0.0, True, F32, dt),
        "strided-weight-bias": lambda dt: (rnd(2, 9, 40, dtype=dt), rnd(2, 9, 40, dtype=dt), rnd(2, 1, 40),
                                           col(40), rnd(3, 40)[1], rnd(2, 1, 40), rnd(2, 1, 40), 1e-6, 1.0, False,
                                           dt, dt),
        "modulate-strided-weight-bias": lambda dt: (rnd(2, 9, 40, dtype=dt), None, None, col(40, dt),
                                                    rnd(40, 3, dtype=dt)[:, 2], rnd(2, 1, 40), rnd(2, 1, 40), 1e-6,
                                                    1.0, True, F32, dt),
    },
    "qk_norm_rope": {
        # x, weight, cos, sin, eps, num_heads, across_heads, interleaved, out_dtype
        "wan-across-interleaved": lambda dt: (rnd(2, 7, 24, dtype=dt), rnd(24), table(1, 7, 1, 8), table(1, 7, 1, 8),
                                              1e-6, 3, True, True, dt),
        "across-neox": lambda dt: (rnd(2, 7, 24, dtype=dt), None, table(7, 1, 8), table(7, 1, 8),
                                   1e-6, 3, True, False, dt),
        "per-head-interleaved": lambda dt: (rnd(2, 7, 3, 8, dtype=dt), rnd(8, dtype=dt), table(7, 1, 8),
                                            table(7, 1, 8), 1e-5, 3, False, True, dt),
        "per-head-neox-strided": lambda dt: (rnd(2, 3, 7, 8, dtype=dt).transpose(1, 2), rnd(8), table(2, 7, 1, 8),
                                             table(2, 7, 1, 8), 1e-6, 3, False, False, F32),
        "per-head-tables-hd12": lambda dt: (rnd(2, 5, 36, dtype=dt), rnd(36), table(2, 5, 3, 12), table(2, 5, 3, 12),
                                            1e-6, 3, True, False, dt),
        # 12 and 10 heads: several head chunks per token (two passes across heads)
        "across-12-heads": lambda dt: (rnd(2, 5, 96, dtype=dt), rnd(96), table(1, 5, 1, 8), table(1, 5, 1, 8),
                                       1e-6, 12, True, True, dt),
        "per-head-10-heads-neox": lambda dt: (rnd(2, 5, 10, 8, dtype=dt), rnd(8), table(5, 1, 8), table(5, 1, 8),
                                              1e-6, 10, False, False, dt),
        "complex-table": lambda dt: (rnd(2, 7, 3, 16, dtype=dt), rnd(16), *(complex_table(7, 16),) * 2,
                                     1e-6, 3, False, True, dt),
        # + bias, is_rms: LayerNorm per head (CogVideoX: [B, H, L, D] read through strides, one head per token)
        "layernorm-heads-first": lambda dt: ((rnd(2, 7, 3, 16, dtype=dt) + 3).transpose(1, 2).unsqueeze(-2),
                                             rnd(16, dtype=dt), table(7, 1, 16), table(7, 1, 16), 1e-6, 1, False,
                                             True, dt, rnd(16, dtype=dt), False),
        # one head per row: 16 rows per program, the last group partial (37 = 16 + 16 + 5)
        "one-head-rows-grouped": lambda dt: (rnd(37, 1, 64, dtype=dt), rnd(64), table(37, 1, 64), table(37, 1, 64),
                                             1e-6, 1, False, False, dt),
        "layernorm-heads-first-grouped": lambda dt: (rnd(2, 37, 3, 64, dtype=dt).transpose(1, 2).unsqueeze(-2),
                                                     rnd(64, dtype=dt), table(37, 1, 64), table(37, 1, 64), 1e-6, 1,
                                                     False, True, dt, rnd(64, dtype=dt), False),
        "layernorm-hd12-neox": lambda dt: (rnd(2, 7, 3, 12, dtype=dt) - 2, rnd(12), table(7, 1, 12),
                                           table(7, 1, 12), 1e-5, 3, False, False, dt, rnd(12), False),
        "layernorm-bias-only": lambda dt: (rnd(2, 5, 2, 8, dtype=dt), None, table(5, 1, 8), table(5, 1, 8),
                                           1e-6, 2, False, True, F32, rnd(8), False),
        # strided q/k weights and biases (W[:, 0] of a [D, 2] parameter), across heads and per head
        "strided-weight-across": lambda dt: (rnd(2, 7, 24, dtype=dt), col(24), table(1, 7, 1, 8), table(1, 7, 1, 8),
                                             1e-6, 3, True, True, dt),
        "strided-weight-bias-across-rms": lambda dt: (rnd(2, 7, 96, dtype=dt), col(96, dt), table(7, 1, 8),
                                                      table(7, 1, 8), 1e-6, 12, True, False, dt, col(96), True),
        "strided-weight-per-head": lambda dt: (rnd(2, 7, 3, 16, dtype=dt), col(16, dt), table(7, 1, 16),
                                               table(7, 1, 16), 1e-6, 3, False, True, dt),
        "strided-weight-one-head-rows": lambda dt: (rnd(37, 1, 64, dtype=dt), col(64), table(37, 1, 64),
                                                    table(37, 1, 64), 1e-6, 1, False, True, dt, col(64), False),
        # full tables (the stack form): random cos/sin, not pair-duplicated, in the q/k dtype or fp32
        "full-tables-across-strided-tables": lambda dt: (rnd(2, 7, 24, dtype=dt), rnd(24), table(1, 7, 1, 8, 2)[..., 0],
                                                         table(1, 7, 1, 8, 2)[..., 1], 1e-6, 3, True, True, dt,
                                                         None, True, True),
        "full-tables-across-12-heads": lambda dt: (rnd(2, 5, 96, dtype=dt), col(96), table(5, 1, 8).to(dt),
                                                   table(5, 1, 8).to(dt), 1e-6, 12, True, True, dt, None, True, True),
        "full-tables-per-head": lambda dt: (rnd(2, 7, 3, 16, dtype=dt), rnd(16, dtype=dt), table(7, 1, 16).to(dt),
                                            table(7, 1, 16).to(dt), 1e-5, 3, False, True, dt, None, True, True),
        "full-tables-per-head-hd12-tables-per-head": lambda dt: (rnd(2, 5, 3, 12, dtype=dt), None,
                                                                 table(2, 5, 3, 12), table(2, 5, 3, 12), 1e-6, 3,
                                                                 False, True, F32, None, True, True),
        "full-tables-one-head-rows": lambda dt: (rnd(37, 1, 64, dtype=dt), col(64), table(37, 1, 64),
                                                 table(37, 1, 64), 1e-6, 1, False, True, dt, None, True, True),
        "full-tables-layernorm-strided-x": lambda dt: (rnd(2, 3, 7, 8, dtype=dt).transpose(1, 2), rnd(8),
                                                       table(7, 1, 8), table(7, 1, 8), 1e-6, 3, False, True, dt,
                                                       rnd(8), False, True),
    },
}
REFS = {"rms_norm": ops.rms_norm_ref, "scale_shift": ops.scale_shift_ref,
        "norm_scale_shift": ops.norm_scale_shift_ref, "qk_norm_rope": ops.qk_norm_rope_ref}
PARAMS = [(f, c, d) for f in CASES for c in CASES[f] for d in DTYPES]


def record(family, args):
    """The typed site record of one op call (what `supports` sees), from its arguments."""
    return SITE_TYPES[family](*[TensorSpec.of(a) if isinstance(a, torch.Tensor) else a for a in args])


@pytest.fixture
def poisoned(monkeypatch):
    """Every torch.empty the launchers allocate starts as NaN: unwritten outputs show."""
    real = torch.empty

    def empty(*a, **k):
        t = real(*a, **k)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", empty)


@pytest.mark.parametrize("family,case,dtype", PARAMS, ids=[f"{f}-{c}-{str(d)[6:]}" for f, c, d in PARAMS])
def test_kernel_matches_reference(family, case, dtype, poisoned):
    args = CASES[family][case](dtype)
    assert cuda.supports(record(family, args)) is None  # every case is a site the lowering takes
    out = cuda.IMPLS[family](*args)
    ref = REFS[family](*args)
    for o, r in zip(out, ref) if isinstance(ref, tuple) else [(out, ref)]:
        assert o.shape == r.shape and o.dtype == r.dtype and o.is_contiguous()
        assert not o.isnan().any()
        assert_close(o, r, dtype)


@pytest.mark.parametrize("case", ["across-12-heads", "per-head-10-heads-neox", "full-tables-across-12-heads"])
@pytest.mark.parametrize("hc", [2, 16])
def test_qk_head_chunking(case, hc, monkeypatch, poisoned):
    """The qk kernel's head chunk: several chunks per token, or one chunk covering (and
    masking past) every head, which keeps x in registers."""
    from difffuse.lowering import triton_kernels as tk

    args = CASES["qk_norm_rope"][case](torch.bfloat16)
    monkeypatch.setattr(tk, "QK_HEADS", {args[5]: (hc, 2)})
    out = cuda.IMPLS["qk_norm_rope"](*args)
    assert not out.isnan().any()
    assert_close(out, ops.qk_norm_rope_ref(*args), torch.bfloat16)


def test_full_tables_read_both_entries_of_each_pair(poisoned):
    """The stack rope with tables that are not pair-duplicated (issue 20, item 3): with
    full_tables the kernel equals the full-table reference and differs from the half-table
    reading, which it still computes with full_tables=False."""
    x, w = rnd(2, 7, 3, 16), rnd(16)
    cos, sin = table(7, 1, 16), table(7, 1, 16)
    half = (x, w, cos, sin, 1e-6, 3, False, True, F32, None, True, False)
    full = half[:-1] + (True,)
    out_full, out_half = cuda.IMPLS["qk_norm_rope"](*full), cuda.IMPLS["qk_norm_rope"](*half)
    assert_close(out_full, ops.qk_norm_rope_ref(*full))
    assert_close(out_half, ops.qk_norm_rope_ref(*half))
    assert (out_full - out_half).abs().max() > 0.1  # the two readings differ on these tables


ZERO = {  # family -> args of the op with a zero-size dim (no tokens, or D = 0)
    "rms_norm": [lambda: (rnd(0, 16), rnd(16), 1e-6, F32), lambda: (rnd(3, 5, 0), rnd(0), 1e-6, torch.bfloat16)],
    "scale_shift": [lambda: (rnd(2, 0, 8), rnd(2, 1, 8), rnd(2, 1, 8), 1.0, F32),
                    lambda: (rnd(2, 3, 0), rnd(2, 1, 0), None, 0.0, F32)],
    "norm_scale_shift": [
        lambda: (rnd(2, 0, 8), rnd(2, 0, 8), None, rnd(8), rnd(8), rnd(2, 1, 8), rnd(2, 1, 8), 1e-6, 1.0, False,
                 F32, torch.bfloat16),
        lambda: (rnd(2, 3, 0), None, None, None, None, rnd(2, 1, 0), None, 1e-6, 1.0, True, F32, F32)],
    "qk_norm_rope": [
        lambda: (rnd(2, 0, 24), rnd(24), table(0, 1, 8), table(0, 1, 8), 1e-6, 3, True, True, F32),
        lambda: (rnd(2, 5, 0), None, table(5, 1, 0), table(5, 1, 0), 1e-6, 3, True, True, F32, None, True, True),
        lambda: (rnd(2, 5, 3, 0), None, table(5, 1, 0), table(5, 1, 0), 1e-6, 3, False, False, F32),
        lambda: (rnd(0, 1, 64), rnd(64), table(0, 1, 64), table(0, 1, 64), 1e-6, 1, False, True, F32),
        lambda: (rnd(2, 0, 3, 8), None, table(0, 1, 8), table(0, 1, 8), 1e-6, 3, False, True, F32, rnd(8), False)],
}
ZERO_PARAMS = [(f, i) for f in ZERO for i in range(len(ZERO[f]))]


@pytest.mark.parametrize("family,i", ZERO_PARAMS, ids=[f"{f}-{i}" for f, i in ZERO_PARAMS])
def test_zero_size_never_crashes(family, i):
    """Zero tokens or D = 0 (issue 20, item 5): the launcher returns an empty result of the
    reference op's shape and dtype without launching; `supports` leaves the site to Inductor."""
    args = ZERO[family][i]()
    out, ref = cuda.IMPLS[family](*args), REFS[family](*args)
    for o, r in zip(out, ref) if isinstance(ref, tuple) else [(out, ref)]:
        assert o.shape == r.shape and o.dtype == r.dtype and o.numel() == 0
    assert "zero-size" in cuda.supports(record(family, args))


def test_trace_emits_user_defined_triton_kernel():
    """Traced the way the pass traces a replacement, a launcher becomes Inductor's
    triton_kernel_wrapper_functional node (not an opaque op call). Runs without the
    interpreter, on fake tensors, so no GPU is needed."""
    code = textwrap.dedent("""
        import torch
        from torch._subclasses.fake_tensor import FakeTensorMode
        from difffuse.lowering import cuda
        with FakeTensorMode():
            x, w = torch.randn(4, 64), torch.randn(64)
            gm = cuda.trace_replacement(lambda x, w: cuda.IMPLS["rms_norm"](x, w, 1e-6, torch.float32), [x, w])
        print(gm.code)
    """)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "triton_kernel_wrapper_functional" in res.stdout, res.stdout
    assert "difffuse.triton_rms_norm" not in res.stdout


# ------------------------------------------------------------------ whole model
@pytest.mark.slow
def test_wan_with_cuda_lowering():
    pytest.importorskip("diffusers")
    from difffuse.testing.tiny_models import MODELS

    model, kwargs = MODELS["wan-t2v-tiny"](num_layers=2, dtype=torch.bfloat16)
    model.to(DEVICE)
    kwargs = {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    torch._dynamo.reset()
    difffuse.reset_report()
    with torch.no_grad():
        ref = model(**kwargs)[0]
        out = torch.compile(model, backend="difffuse", options={"lowering": "cuda"})(**kwargs)[0]
    rep = difffuse.report()
    # the reference lowering's matches (difffuse.testing.expected) less attention and, off a
    # GPU, linear_gelu (tanh-GELU needs CUDA tensors)
    want = {f: n for f, n in expected("wan-t2v-tiny", 2).items()
            if f != "attention" and (f != "linear_gelu" or DEVICE == "cuda")}
    # attention: the flash kernels take CUDA bf16 calls of their head dims, tested in
    # test_flash_attention_cuda.py; off a GPU every call is a reported decline
    assert {f: n for f, n in rep.matches().items() if f != "attention"} == want, str(rep)
    assert all("erf-GELU" in m.reason for m in rep.misses if m.family != "attention"), str(rep)
    rtol, atol = TOL[torch.bfloat16]
    torch.testing.assert_close(out.float(), ref.float(), rtol=2 * rtol, atol=2 * atol)


@pytest.mark.slow
def test_ti2v_per_token_modulation_left_to_inductor():
    """Wan 2.2 TI2V computes its per-token modulation in the graph (table + temb); the CUDA
    lowering leaves those sites to Inductor, which fuses that add, and says so."""
    pytest.importorskip("diffusers")
    from difffuse.testing.tiny_models import MODELS

    model, kwargs = MODELS["wan-ti2v-tiny"](num_layers=2, dtype=torch.bfloat16)
    model.to(DEVICE)
    kwargs = {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    torch._dynamo.reset()
    difffuse.reset_report()
    with torch.no_grad():
        ref = model(**kwargs)[0]
        model.compile_repeated_blocks(backend="difffuse", options={"lowering": "cuda"})
        out = model(**kwargs)[0]
    rep = difffuse.report()
    want = expected("wan-ti2v-tiny", 2, regional=True)
    assert all(rep.matches()[f] == want[f] for f in ("qk_norm_rope", "rms_norm")), str(rep)
    per_token = [m for m in rep.misses if "per-token" in m.reason]
    assert per_token and all("per-token" in m.reason or "erf-GELU" in m.reason
                             for m in rep.misses if m.family != "attention"), str(rep)
    rtol, atol = TOL[torch.bfloat16]
    torch.testing.assert_close(out.float(), ref.float(), rtol=2 * rtol, atol=2 * atol)


# ------------------------------------------------------------------ GPU only
@pytest.mark.cuda
@pytest.mark.parametrize("d", [1536, 5120])
def test_real_sizes(d):
    L = 4096
    x, r = rnd(1, L, d, dtype=torch.bfloat16), rnd(1, L, d, dtype=torch.bfloat16)
    s, t = rnd(1, 1, d), rnd(1, 1, d)
    w = rnd(d)
    assert_close(cuda.IMPLS["rms_norm"](x, w, 1e-6, torch.bfloat16), ops.rms_norm_ref(x, w, 1e-6, torch.bfloat16))
    args = (x, r, s, rnd(d), rnd(d), s, t, 1e-6, 1.0, False, torch.bfloat16, torch.bfloat16)
    for o, ref in zip(cuda.IMPLS["norm_scale_shift"](*args), ops.norm_scale_shift_ref(*args)):
        assert_close(o, ref)
    heads = d // 128
    q = rnd(1, L, d, dtype=torch.bfloat16)
    qargs = (q, rnd(d), table(1, L, 1, 128), table(1, L, 1, 128), 1e-6, heads, True, True, torch.bfloat16)
    assert_close(cuda.IMPLS["qk_norm_rope"](*qargs), ops.qk_norm_rope_ref(*qargs))
    # CogVideoX: LayerNorm per head on [B, H, L, D] (a transposed view), one head per token, text rows identity
    qh = (rnd(1, L, heads, 64, dtype=torch.bfloat16) + 1).transpose(1, 2).unsqueeze(-2)
    largs = (qh, rnd(64), table(L, 1, 64), table(L, 1, 64), 1e-6, 1, False, False, torch.bfloat16, rnd(64), False)
    assert_close(cuda.IMPLS["qk_norm_rope"](*largs), ops.qk_norm_rope_ref(*largs))
    # Flux's stack rope: per head, random full tables, a strided weight
    qf = rnd(1, L, heads, 128, dtype=torch.bfloat16)
    fargs = (qf, col(128), table(L, 1, 128), table(L, 1, 128), 1e-6, heads, False, True, torch.bfloat16, None, True,
             True)
    assert_close(cuda.IMPLS["qk_norm_rope"](*fargs), ops.qk_norm_rope_ref(*fargs))


@pytest.mark.cuda
def test_generated_code_launches_the_kernel():
    """Inductor's output code launches our Triton kernel itself: no op call through the
    dispatcher for difffuse's kernels."""
    from torch._inductor.utils import run_and_get_code

    norm = torch.nn.RMSNorm(1536, eps=1e-6, device="cuda", dtype=torch.bfloat16)
    x = rnd(2, 333, 1536, dtype=torch.bfloat16)
    torch._dynamo.reset()
    difffuse.reset_report()
    compiled = torch.compile(norm, backend="difffuse")
    with torch.no_grad():
        out, code = run_and_get_code(compiled, x)
    assert difffuse.report().matches() == {"rms_norm": 1}
    src = "\n".join(code)
    assert "rms_norm_kernel" in src and "torch.ops.difffuse" not in src, src[-3000:]
    assert_close(out, norm(x))


JIT_CASES = [(hd, inter, across, dt) for hd in (64, 128, 256) for inter in (True, False) for across in (True, False)
             for dt in DTYPES]


@pytest.mark.cuda
@pytest.mark.parametrize("hd,inter,across,dtype", JIT_CASES)
def test_jit_kernel_matches_reference(hd, inter, across, dtype, poisoned):
    """The NVRTC-compiled CUDA C++ qk kernel against the reference op."""
    from difffuse.lowering import cuda_jit

    why = cuda_jit.available()
    assert why is None, why  # on a CUDA machine with cuda-core the kernel must build
    heads = 6
    x = rnd(2, 33, heads * hd, dtype=dtype) if across else rnd(2, 33, heads, hd, dtype=dtype)
    n = heads * hd if across else hd
    w = col(n, dtype) if hd == 128 else rnd(n, dtype=dtype)  # strided and contiguous weights
    args = (x, w, table(33, 1, hd), table(33, 1, hd), 1e-6, heads, across, inter, dtype)
    assert cuda_jit.supports(record("qk_norm_rope", args)) is None
    out = cuda_jit.qk_norm_rope(*args)
    assert not out.isnan().any()
    assert_close(out, ops.qk_norm_rope_ref(*args), dtype)


def test_qk_kernel_jit_choice_falls_back_exactly(monkeypatch, poisoned):
    """With QK_KERNEL="jit", the CUDA lowering launches the JIT kernel only where it can be
    built and `cuda_jit.supports` takes the call, else the Triton kernel: either way the
    output is the reference op's. Full tables (the stack form) and LayerNorm q/k always go
    to Triton; off a GPU (or without cuda.core) `available()` says why."""
    from difffuse.lowering import cuda_jit

    why = cuda_jit.available()
    if DEVICE == "cpu":
        assert isinstance(why, str) and why
    jit_calls = []
    real_jit = cuda_jit.jit_op
    monkeypatch.setattr(cuda_jit, "jit_op", lambda *a: jit_calls.append(a) or real_jit(*a))
    monkeypatch.setattr(cuda, "QK_KERNEL", "jit")
    x, w, cos, sin = rnd(2, 9, 4 * 64, dtype=torch.bfloat16), col(4 * 64), table(9, 1, 64), table(9, 1, 64)
    half = (x, w, cos, sin, 1e-6, 4, True, True, torch.bfloat16, None, True, False)
    full = half[:-1] + (True,)
    layer = (x.unflatten(-1, (4, 64)), rnd(64), cos, sin, 1e-6, 4, False, True, torch.bfloat16, rnd(64), False)
    for args, jit in [(half, why is None and DEVICE == "cuda"), (full, False), (layer, False)]:
        n = len(jit_calls)
        out = cuda.IMPLS["qk_norm_rope"](*args)
        assert_close(out, ops.qk_norm_rope_ref(*args), torch.bfloat16)
        assert len(jit_calls) == n + jit


@pytest.mark.parametrize("case", ["wan-across-interleaved", "per-head-neox-strided", "layernorm-heads-first"])
def test_qk_eps_as_a_tensor(case, poisoned):
    """eps as a 0-d fp64 CPU tensor (a Python float Dynamo lifted under dynamic=True): read at
    run time, equal to the constant-eps result with the same value and different from
    another value (eps large enough to matter)."""
    args = list(CASES["qk_norm_rope"][case](torch.float32))
    args[0] = args[0] * 1e-2  # mean(x^2) ~ 1e-4: eps 1e-3 against 0.5 changes every row
    args[4] = 1e-3
    const = cuda.IMPLS["qk_norm_rope"](*args)
    args[4] = 123.0  # ignored: eps_t wins
    lifted = cuda.IMPLS["qk_norm_rope"](*args, eps_t=torch.tensor(1e-3, dtype=torch.float64))
    other = cuda.IMPLS["qk_norm_rope"](*args, eps_t=torch.tensor(0.5, dtype=torch.float64))
    ref = ops.qk_norm_rope_ref(*args, eps_t=torch.tensor(1e-3, dtype=torch.float64))
    assert_close(lifted, const)
    assert_close(lifted, ref)
    assert (other - lifted).abs().max() > 1e-2
