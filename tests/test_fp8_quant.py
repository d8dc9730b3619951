"""fp8_quant (issue 29): torchao's per-row float8 activation quantisation fused into the
difffuse op before it. The chain is spelled in torch code as torchao 0.18 writes it
(docs/fp8.md §1-2; torchao is not installed in CI): matching (three readers quantised
once, y kept only where read), near-misses reported with their reason, the reference op
against the formula of docs/fp8.md §5, zero rows, and the Triton kernels (interpreter on a
CPU) against the plain kernels and the reference."""
from __future__ import annotations

import pytest
import torch

import difffuse
from conftest import DEVICE  # noqa: F401
from conftest import compile_and_run as _compile_and_run
from difffuse.families import DEFAULTS

FP8_ON = [*DEFAULTS, "fp8_quant"]  # the family is opt-in until its CUDA kernels have run on a GPU


def compile_and_run(module, *args, options=None, **kwargs):
    """conftest's, with fp8_quant among the patterns unless the test names them."""
    return _compile_and_run(module, *args, options={"patterns": FP8_ON, **(options or {})}, **kwargs)


@pytest.fixture
def run_compiled():
    return compile_and_run
from difffuse.lowering import cuda, ops

BF16, F32, E4M3 = torch.bfloat16, torch.float32, torch.float8_e4m3fn


def quant(x, dims=(-1,), div=448.0, lo=-448.0, hi=448.0, dt=E4M3, clamp_amax=False, clamp=True):
    """torchao 0.18's _choose_scale_float8 + _quantize_affine_float8 (the "torch" path)."""
    amax = x.abs().amax(dims, keepdim=True)
    if clamp_amax:
        amax = amax.clamp(min=1e-4)
    scale = (amax / div).to(torch.float32)
    q = x.to(torch.float32) / scale
    if clamp:
        q = q.clamp(lo, hi)
    return q.to(dt), scale


def formula(y, per_row=True):
    """docs/fp8.md §5: what the fused op computes from the op's rounded output y."""
    yf = y.float()
    amax = yf.abs().amax(-1 if per_row else tuple(range(y.ndim)), keepdim=True)
    s = amax * torch.tensor(1 / 448, dtype=torch.float32)
    s = torch.where(amax == 0, torch.ones_like(s), s)
    return (yf / s).clamp(-448, 448).to(E4M3), s


def deq(q, s):
    return q.float() * s


class NormQKV(torch.nn.Module):
    """Wan's LayerNorm + modulation feeding three fp8 Linears (three identical chains)."""

    def __init__(self, d=32, readers=3, keep_y=False, **qkw):
        super().__init__()
        self.norm = torch.nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.readers, self.keep_y, self.qkw = readers, keep_y, qkw
        self.quant = quant

    def forward(self, x, scale, shift):
        h = (self.norm(x.float()) * (1 + scale) + shift).type_as(x)
        outs = [deq(*self.quant(h, **self.qkw)) for _ in range(self.readers)]
        return (*outs, h * 2) if self.keep_y else tuple(outs)


class RmsLinear(torch.nn.Module):
    def __init__(self, d=32, keep_y=False):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(d))
        self.keep_y = keep_y

    def forward(self, x):
        xf = x.float()
        h = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(x.dtype) * self.w.to(x.dtype)
        return (deq(*quant(h)), h * 2) if self.keep_y else deq(*quant(h))


class Modulate(torch.nn.Module):
    def __init__(self, keep_y=False):
        super().__init__()
        self.keep_y = keep_y

    def forward(self, x, scale, shift):
        h = x * (1 + scale) + shift
        return (deq(*quant(h)), h * 2) if self.keep_y else deq(*quant(h))


def inputs(d=32, dtype=BF16, zero_row=True):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 9, d, generator=g).to(dtype)
    x = x * torch.exp(torch.randn(2, 9, 1, generator=g))  # rows of spread magnitude
    scale, shift = torch.randn(2, 1, d, generator=g) * 0.3, torch.randn(2, 1, d, generator=g)
    if zero_row:
        x[0, 4] = 0
        shift = shift * 0  # a zero input row stays zero through LN + modulation
    return x, scale, shift


def fused_report(rep):
    return rep.matches().get("fp8_quant", 0)


def misses(rep, family="fp8_quant"):
    return [m.reason for m in rep.misses if m.family == family]


# ------------------------------------------------------------------ reference op
def test_reference_quant_is_the_documented_formula():
    y = (torch.randn(5, 40) * torch.tensor([1e-3, 1, 30, 0, 1e4])[:, None]).to(BF16)
    q, s = ops.fp8_row_quant_ref(y)
    qf, sf = formula(y)
    assert q.dtype == E4M3 and s.dtype == F32 and s.shape == (5, 1)
    assert torch.equal(s, sf) and torch.equal(q.view(torch.uint8), qf.view(torch.uint8))
    assert s[3].item() == 1.0 and (q[3].float() == 0).all()  # the zero row: scale 1, never 0 / NaN
    # every other row's scale is fp32(amax) * fp32(1/448), not amax / 448 rounded to bf16
    amax = y.float().abs().amax(-1)
    assert torch.equal(s[[0, 1, 2, 4], 0], amax[[0, 1, 2, 4]] * torch.tensor(1 / 448, dtype=F32))


# ------------------------------------------------------------------ matching (reference lowering)
@pytest.mark.parametrize("keep_y", [False, True])
def test_norm_modulation_three_readers_quantised_once(run_compiled, keep_y):
    x, scale, shift = inputs()
    model = NormQKV(keep_y=keep_y)
    out, rep = run_compiled(model, x, scale, shift)
    assert fused_report(rep) == 1 and not misses(rep), str(rep)
    assert rep.variants() .get("fp8_quant:norm_scale_shift/row") == 1
    assert "fp8_quant -> difffuse::norm_scale_shift_fp8 x1" in str(rep)
    assert "fp8_quant: 3 quantisations fused into 1 calls" in str(rep)
    # against the formula on y as the plain norm_scale_shift op computes it in the compiled graph
    plain, _ = run_compiled(NormQKV(readers=1, keep_y=True), x, scale, shift, options={"patterns": ["norm_scale_shift"]})
    y = plain[1] / 2
    want = deq(*formula(y))
    for o in out[:3]:
        assert not o.isnan().any()
        torch.testing.assert_close(o, want, rtol=0, atol=0)
    if keep_y:
        torch.testing.assert_close(out[3], y * 2, rtol=0, atol=0)


def test_unfused_chain_gives_nan_on_the_zero_row(run_compiled):
    """Without the family the zero row is torchao's scale 0 -> NaN; fused, 0 (docs/fp8.md §5)."""
    x, scale, shift = inputs()
    out, rep = run_compiled(NormQKV(readers=1), x, scale, shift,
                            options={"patterns": ["norm_scale_shift"]})
    assert out[0][0, 4].isnan().all() and not out[0][1].isnan().any()


@pytest.mark.parametrize("make,variant", [(RmsLinear, "rms_norm"), (Modulate, "scale_shift")])
def test_rms_norm_and_scale_shift_outputs(run_compiled, make, variant):
    x, scale, shift = inputs(zero_row=False)
    args = (x,) if make is RmsLinear else (x, scale, shift)
    torch.manual_seed(0)
    model = make()
    out, rep = run_compiled(model, *args)
    assert rep.variants().get(f"fp8_quant:{variant}/row") == 1 and not misses(rep), str(rep)
    model.keep_y = True
    plain, rep = run_compiled(model, *args, options={"patterns": [variant]})
    assert rep.matches().get(variant) == 1 and rep.matches().get("fp8_quant") is None
    torch.testing.assert_close(out, deq(*formula(plain[1] / 2)), rtol=0, atol=0)
    both, rep = run_compiled(model, *args)  # y kept for a reader: the same y, the same q and s
    assert rep.variants().get(f"fp8_quant:{variant}/row") == 1
    torch.testing.assert_close(both[1], plain[1], rtol=0, atol=0)
    torch.testing.assert_close(both[0], out, rtol=0, atol=0)


NEAR_MISSES = {
    "e5m2": (dict(div=57344.0, lo=-57344.0, hi=57344.0, dt=torch.float8_e5m2), "float8_e5m2"),
    "e5m2-scale-e4m3-cast": (dict(div=57344.0), "amax / 57344.0"),
    "amax-other-dim": (dict(dims=(1,)), "neither per row"),
    "amax-clamped": (dict(clamp_amax=True), "amax is clamped"),
    "no-clamp": (dict(clamp=False), "not preceded by clamp"),
    "other-clamp": (dict(lo=-400.0, hi=400.0), "clamps to +-448"),
}


@pytest.mark.parametrize("case", list(NEAR_MISSES))
def test_near_misses_are_reported_not_fused(run_compiled, case):
    kw, reason = NEAR_MISSES[case]
    x, scale, shift = inputs()
    out, rep = run_compiled(NormQKV(readers=1, **kw), x, scale, shift)
    assert fused_report(rep) == 0
    found = misses(rep)
    assert found and all(reason in r for r in found), found
    assert rep.matches().get("norm_scale_shift") == 1  # the norm itself still fuses


@pytest.mark.parametrize("lowering,batch,dims", [("reference", 2, (0, 1, 2)), ("cuda", 1, (1, 2))])
def test_per_tensor_fused(run_compiled, lowering, batch, dims):
    """torchao's PerTensor: amax over every dim of size > 1 ([1, 2] for one sample, as the
    probe's graph has it); one scale [1, 1, 1] for the readers; the zero tensor's scale 1."""
    x, scale, shift = inputs()
    x, scale, shift = x[:batch].to(DEVICE), scale[:batch].to(DEVICE), shift[:batch].to(DEVICE)
    out, rep = run_compiled(NormQKV(readers=2, dims=dims), x, scale, shift, options={"lowering": lowering})
    assert rep.variants().get("fp8_quant:norm_scale_shift/tensor") == 1 and not misses(rep), str(rep)
    plain, _ = run_compiled(NormQKV(readers=1, keep_y=True, dims=dims), x, scale, shift,
                            options={"lowering": lowering, "patterns": ["norm_scale_shift"]})
    want = deq(*formula(plain[1] / 2, per_row=False))
    for o in out:
        torch.testing.assert_close(o, want, rtol=0, atol=0)


def test_quantised_graph_input_is_reported(run_compiled):
    class Q(torch.nn.Module):
        def forward(self, x):
            return deq(*quant(x))

    out, rep = run_compiled(Q(), inputs()[0])
    assert fused_report(rep) == 0
    assert any("not the output of a difffuse norm or modulation op" in r for r in misses(rep)), misses(rep)


def test_quantised_cast_of_fused_output_is_reported(run_compiled):
    """The op's fp32 output read twice, once rounded to fp16 and quantised: the cast is the
    model's, not the op's output, so it is a reported miss (with what it is)."""
    class C(torch.nn.Module):
        def forward(self, x, scale, shift):
            h = torch.nn.functional.layer_norm(x.float(), (32,), eps=1e-6) * (1 + scale) + shift
            return deq(*quant(h.to(torch.float16))), h

    out, rep = run_compiled(C(), *inputs())
    assert fused_report(rep) == 0 and rep.matches().get("norm_scale_shift") == 1
    assert misses(rep) == ["the quantised tensor is a cast to torch.float16 of difffuse's norm_scale_shift output, "
                           "not the op's output itself"]


def test_lowering_without_fp8_kernel_reports(monkeypatch, run_compiled):
    """A lowering with no fp8_quant entry (NPU, ROCm today) names itself as the reason."""
    from difffuse.lowering import reference

    impls = {k: v for k, v in reference.IMPLS.items() if k != "fp8_quant"}
    monkeypatch.setattr(reference, "IMPLS", impls)
    x, scale, shift = inputs()
    out, rep = run_compiled(NormQKV(readers=2), x, scale, shift)
    assert fused_report(rep) == 0
    assert misses(rep) == ["the reference lowering has no fp8_quant kernel: left to Inductor"] * 2


# ------------------------------------------------------------------ Triton kernels
def _interp_cast(t):
    """The fp8 cast as the kernels' Triton does it (the CPU interpreter's own rounding, which
    misses the carry into the next binade for a few values; on a GPU it is the hardware's)."""
    if DEVICE == "cuda":
        return t.to(E4M3)
    import triton
    import triton.language as tl

    @triton.jit
    def cast_kernel(X, Y, N: tl.constexpr, BLOCK: tl.constexpr):
        i = tl.arange(0, BLOCK)
        tl.store(Y + i, tl.load(X + i, mask=i < N).to(tl.float8e4nv), mask=i < N)

    flat = t.contiguous().flatten()
    out = torch.empty(flat.shape, dtype=E4M3)
    cast_kernel[(1,)](flat, out, N=flat.numel(), BLOCK=triton.next_power_of_2(flat.numel()))
    return out.view(t.shape)


def _check_kernel(y_plain, y, q, s, store_y):
    """y bitwise the plain kernel's; s, q from y as docs/fp8.md §5 says (q cast by Triton)."""
    assert q.dtype == E4M3 and s.dtype == F32 and q.is_contiguous() and s.shape == (*y_plain.shape[:-1], 1)
    if store_y:
        assert torch.equal(y.view(-1), y_plain.view(-1)) or torch.equal(y, y_plain)
    else:
        assert y.numel() == 0
    yf = y_plain.float()
    amax = yf.abs().amax(-1, keepdim=True)
    s_want = torch.where(amax == 0, torch.ones_like(amax), amax * torch.tensor(1 / 448, dtype=F32))
    assert torch.equal(s, s_want)
    pre = (yf / s_want).clamp(-448, 448)
    assert torch.equal(q.view(torch.uint8), _interp_cast(pre).view(torch.uint8))


@pytest.mark.parametrize("store_y", [True, False])
def test_fp8_kernels_match_plain_kernels(store_y):
    g = torch.Generator().manual_seed(1)
    r = lambda *s: torch.randn(*s, generator=g).to(DEVICE)  # noqa: E731
    x = (r(2, 5, 40) * torch.exp(r(2, 5, 1))).to(BF16)
    x[1, 2] = 0
    sc, sh = r(2, 1, 40), r(2, 1, 40) * 0
    # norm_scale_shift, modulation only (the norm_modulate kernel) and with a gated residual
    args = (x, None, None, None, None, sc, sh, 1e-6, 1.0, False, F32, BF16)
    y_plain, _ = cuda.IMPLS["norm_scale_shift"](*args)
    y, r_out, q, s = cuda.fp8_quant("norm_scale_shift", dict(zip(NSS, args)), store_y)
    _check_kernel(y_plain, y, q, s, store_y)
    assert s[1, 2].item() == 1.0
    res, gate = r(2, 5, 40).to(BF16), r(2, 1, 40)
    args = (x, res, gate, r(40), r(40), sc, sh, 1e-6, 1.0, True, BF16, BF16)
    y_plain, r_plain = cuda.IMPLS["norm_scale_shift"](*args)
    y, r_out, q, s = cuda.fp8_quant("norm_scale_shift", dict(zip(NSS, args)), store_y)
    _check_kernel(y_plain, y, q, s, store_y)
    assert torch.equal(r_out, r_plain)
    # rms_norm, scale_shift (a strided input)
    w = r(40).to(BF16)
    y_plain = cuda.IMPLS["rms_norm"](x, w, 1e-6, BF16)
    y, _, q, s = cuda.fp8_quant("rms_norm", dict(x=x, weight=w, eps=1e-6, out_dtype=BF16), store_y)
    _check_kernel(y_plain, y, q, s, store_y)
    a = x.transpose(1, 2).contiguous().transpose(1, 2)
    y_plain = cuda.IMPLS["scale_shift"](a, sc, sh, 1.0, BF16)
    y, _, q, s = cuda.fp8_quant("scale_shift", dict(a=a, b=sc, c=sh, k=1.0, out_dtype=BF16), store_y)
    _check_kernel(y_plain, y, q, s, store_y)


def test_fp8_kernels_per_tensor():
    """per_row=False: the kernel's y and row amax, then the tensor's scale and cast."""
    g = torch.Generator().manual_seed(2)
    r = lambda *s: torch.randn(*s, generator=g).to(DEVICE)  # noqa: E731
    x = (r(2, 5, 40) * torch.exp(r(2, 5, 1))).to(BF16)
    sc, sh = r(2, 1, 40), r(2, 1, 40)
    args = (x, r(2, 5, 40).to(BF16), None, r(40), None, sc, sh, 1e-6, 1.0, True, BF16, BF16)
    y_plain, r_plain = cuda.IMPLS["norm_scale_shift"](*args)
    y, r_out, q, s = cuda.fp8_quant("norm_scale_shift", dict(zip(NSS, args)), False, False)
    q_want, s_want = formula(y_plain, per_row=False)
    assert s.shape == (1, 1, 1) and torch.equal(s, s_want) and torch.equal(r_out, r_plain)
    assert torch.equal(q.view(torch.uint8), q_want.view(torch.uint8))
    w = r(40).to(BF16)
    y_plain = cuda.IMPLS["rms_norm"](x, w, 1e-6, BF16)
    _, _, q, s = cuda.fp8_quant("rms_norm", dict(x=x, weight=w, eps=1e-6, out_dtype=BF16), True, False)
    q_want, s_want = formula(y_plain, per_row=False)
    assert torch.equal(s, s_want) and torch.equal(q.view(torch.uint8), q_want.view(torch.uint8))
    zero = torch.zeros_like(x)
    _, _, q, s = cuda.fp8_quant("scale_shift", dict(a=zero, b=sc, c=None, k=1.0, out_dtype=BF16), False, False)
    assert s.item() == 1.0 and (q.float() == 0).all()


NSS = ("x", "residual", "gate", "weight", "bias", "scale", "shift", "eps", "k", "is_rms", "residual_dtype",
       "out_dtype")


def test_cuda_lowering_compiled(run_compiled):
    """The CUDA lowering end to end (interpreted kernels on a CPU): one fp8 twin for the
    three readers, every output the formula of the plain kernel's y."""
    x, scale, shift = inputs()
    x, scale, shift = x.to(DEVICE), scale.to(DEVICE), shift.to(DEVICE)
    out, rep = run_compiled(NormQKV(), x, scale, shift, options={"lowering": "cuda"})
    assert rep.variants().get("fp8_quant:norm_scale_shift/row") == 1 and not misses(rep), str(rep)
    plain, _ = run_compiled(NormQKV(readers=1, keep_y=True), x, scale, shift,
                            options={"lowering": "cuda", "patterns": ["norm_scale_shift"]})
    yf = (plain[1] / 2).float()  # y as the plain norm kernel computes it in the compiled graph
    amax = yf.abs().amax(-1, keepdim=True)
    s = torch.where(amax == 0, torch.ones_like(amax), amax * torch.tensor(1 / 448, dtype=F32, device=DEVICE))
    want = _interp_cast((yf / s).clamp(-448, 448)).float() * s
    for o in out:
        torch.testing.assert_close(o, want, rtol=0, atol=0)


@pytest.mark.skipif(DEVICE == "cuda", reason="on a GPU test_cuda_lowering_compiled runs this path for real")
def test_cuda_triton_kernel_node_is_read_back():
    """Without the interpreter the CUDA lowering's replacements are Inductor's
    user-defined-Triton-kernel nodes (triton_kernel_wrapper_functional): the family reads the
    norm kernel's launch back from that node and emits the fp8 twin's. Runs on a CPU in a
    subprocess, stopped once the pass has recorded (with no GPU driver Inductor cannot build the kernels)."""
    import os
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent("""
        import torch, difffuse
        from difffuse.lowering import cuda
        from difffuse.fusion_pass import pass_manager
        cuda.INTERPRET = True  # the device rule only: replacements are still traced functionalized
        torch._inductor.config.fx_graph_cache = False
        run = pass_manager.DifffusePass.__call__

        def stop_after_pass(self, graph):  # no driver to build the kernels: stop once recorded
            run(self, graph)
            raise KeyboardInterrupt

        pass_manager.DifffusePass.__call__ = stop_after_pass
        import test_fp8_quant as t
        x, scale, shift = t.inputs()
        try:
            t.compile_and_run(t.NormQKV(), x, scale, shift, options={"lowering": "cuda"})
        except KeyboardInterrupt:
            pass
        rep = difffuse.report()
        print(rep)
        print("VARIANTS", rep.variants(), "MISSES", len(rep.misses))
    """)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    here = os.path.dirname(os.path.abspath(__file__))
    env["PYTHONPATH"] = os.pathsep.join([here, os.path.dirname(here), env.get("PYTHONPATH", "")])
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300, cwd=here)
    assert "fp8_quant -> triton:norm_scale_shift_fp8_kernel x1" in res.stdout, res.stdout + res.stderr[-3000:]
    assert "'fp8_quant:norm_scale_shift/row': 1" in res.stdout and "MISSES 0" in res.stdout, res.stdout
