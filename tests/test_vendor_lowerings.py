"""NPU / ROCm / MUSA lowerings, contract-tested on CPU (design §5): stand-in `sgl_kernel_npu`,
`torch_npu` and `aiter` modules (difffuse.testing.vendor_stubs) go into sys.modules, compute
in PyTorch, ENFORCE what the real kernels assert or silently assume (read from the upstream
sources cited in difffuse/lowering/{npu,rocm}.py) and record every call. Asserted: each
lowering calls exactly the expected vendor function with the expected shapes, dtypes and
constants; sites a kernel cannot do exactly stay with Inductor and the report says why; a
missing package gives one WARNING naming it and the fallback; `inductor=False` and device
detection (overridden) work. Not run on Ascend or AMD hardware."""
from __future__ import annotations

import logging
import types

import pytest
import torch
import torch.nn as nn

from conftest import assert_close, compile_and_run
from difffuse.fusion_pass import backend, device, pass_manager
from difffuse.lowering import ops
from difffuse.lowering.sites import SITE_TYPES, TensorSpec
from difffuse.testing.expected import expected
from difffuse.testing.vendor_stubs import aiter_modules, install, npu_modules


@pytest.fixture
def npu_calls(monkeypatch):
    calls: list = []
    install(monkeypatch, npu_modules(calls), "difffuse.lowering.npu")
    return calls


@pytest.fixture
def aiter_calls(monkeypatch):
    calls: list = []
    install(monkeypatch, aiter_modules(calls), "difffuse.lowering.rocm")
    return calls


class Block(nn.Module):
    """Linear -> RMSNorm -> Linear: one rms_norm site (the family that exists everywhere)."""

    def __init__(self, d=16, weight=True, dtype=torch.float32):
        super().__init__()
        self.a, self.b = nn.Linear(d, d, dtype=dtype), nn.Linear(d, d, dtype=dtype)
        self.n = nn.RMSNorm(d, eps=1e-6, elementwise_affine=weight, dtype=dtype)

    def forward(self, x):
        return self.b(self.n(self.a(x)))


def _block(dtype=torch.float32, weight=True):
    torch.manual_seed(0)
    m = Block(weight=weight, dtype=dtype).eval()
    if weight:
        nn.init.normal_(m.n.weight)
    return m, torch.randn(2, 5, 16, dtype=dtype)


# ====================================================================== NPU
@pytest.mark.parametrize("inductor", [True, False], ids=["inductor", "eager_graph"])
@pytest.mark.parametrize("dtype,weight", [(torch.float32, True), (torch.bfloat16, True), (torch.float32, False)])
def test_npu_rms_norm_calls_variance_then_rsqrt_mul(npu_calls, dtype, weight, inductor):
    m, x = _block(dtype, weight)
    out, rep = compile_and_run(m, x, options={"lowering": "npu", "inductor": inductor})
    assert rep.matches() == {"rms_norm": 1} and rep.graphs[0].lowering == "npu"
    f32 = torch.float32
    assert npu_calls == [
        ("fused_variance", [((1, 10, 16), f32)], {}),
        ("fused_rsqrt_mul", [((1, 10, 16), f32), ((1, 10, 1), f32), ((16,), f32)], {"eps": pytest.approx(1e-6)}),
    ]
    with torch.no_grad():
        assert_close(out, m(x))


def test_npu_auto_detects_the_device(npu_calls, monkeypatch):
    """lowering="auto" on a graph whose tensors say npu (detection overridden: no NPU here)."""
    monkeypatch.setattr(backend, "detect_from_tensors", lambda values: "npu")
    monkeypatch.setattr(pass_manager, "detect_device", lambda graph: "npu")
    m, x = _block()
    out, rep = compile_and_run(m, x, options={"lowering": "auto", "inductor": False})
    assert rep.graphs[0].lowering == "npu" and rep.matches() == {"rms_norm": 1}
    assert [c[0] for c in npu_calls] == ["fused_variance", "fused_rsqrt_mul"]
    assert_close(out, m(x))


@pytest.mark.parametrize("absent,named", [("sgl_kernel_npu", "sgl_kernel_npu"), ("torch_npu", "torch_npu")])
def test_npu_missing_package_warns_once_and_falls_back(monkeypatch, caplog, absent, named):
    modules = npu_modules([])
    modules[absent] = None  # `import absent` raises ImportError
    install(monkeypatch, modules, "difffuse.lowering.npu")
    m, x = _block()
    with caplog.at_level(logging.WARNING, logger="difffuse"):
        for _ in range(2):
            out, rep = compile_and_run(m, x, options={"lowering": "npu"})
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    assert named in warnings[0] and "falling back to inductor" in warnings[0]
    assert rep.matches() == {} and rep.graphs[0].lowering == "inductor"
    assert "npu lowering unavailable: fell back to inductor" in rep.graphs[0].notes
    assert_close(out, m(x))


# ---------------------------------------------------------------------- sites by hand
def record(family, **kw):
    """The typed site record `supports` sees for one op call with these arguments."""
    return SITE_TYPES[family](**{k: TensorSpec.of(v) if isinstance(v, torch.Tensor) else v for k, v in kw.items()})


B, L, D = 2, 6, 8
SCALE_SHIFT_CASES = {
    # name: (b shape, c shape or None, k, reason substring or None)
    "adaln_vector": ((1, 1, D), (1, 1, D), 1.0, None),
    "scalar_scale_vector_shift": ((1,), (D,), 1.0, None),
    "per_token_shift_k1": ((1, 1, D), (B, L, D), 1.0, None),
    "gated_residual_k0_full": ((1, 1, D), (B, L, D), 0.0, None),
    "no_shift_k1": ((D,), None, 1.0, None),
    "k0_small_shift": ((1, 1, D), (1, 1, D), 0.0, "ignores scale_constant"),
    "k0_no_shift": ((1, 1, D), None, 0.0, "ignores scale_constant"),
    "per_batch_scale": ((B, 1, D), (B, 1, D), 1.0, "per-batch"),
    "per_token_scale": ((B, L, D), (B, L, D), 1.0, "per-batch"),
    "scalar_scale_full_shift": ((1,), (B, L, D), 1.0, "scalar scale with a full-size shift"),
    "per_batch_shift": ((1, 1, D), (B, 1, D), 1.0, "shift of shape"),
}


@pytest.mark.parametrize("name", sorted(SCALE_SHIFT_CASES))
def test_npu_scale_shift_exact_or_refused(npu_calls, name):
    """scale_shift through the NPU IMPLS callable on hand-made inputs (the scale_shift pattern
    is another module): where `supports` says yes, one fused_scale_shift call with an fp32
    scale and scale_constant=k equals the reference op; where it says no, the reason names
    the kernel's limit (what the compiled graph does with it: the next test)."""
    from difffuse.lowering import npu

    bshape, cshape, k, why = SCALE_SHIFT_CASES[name]
    a = torch.randn(B, L, D, dtype=torch.bfloat16)
    b = torch.randn(bshape)
    c = torch.randn(cshape) if cshape else None
    reason = npu.supports(record("scale_shift", a=a, b=b, c=c, k=k, out_dtype=torch.bfloat16))
    if why is not None:
        assert reason is not None and why in reason, reason
        return
    assert reason is None
    out = npu.IMPLS["scale_shift"](a, b, c, k, torch.bfloat16)
    assert_close(out, ops.scale_shift_ref(a, b, c, k, torch.bfloat16))
    (fn, args, consts), = npu_calls
    assert fn == "fused_scale_shift" and consts == {"scale_constant": k}
    assert args[0] == ((B, L, D), torch.bfloat16) and args[1][1] == torch.float32


class Modulate(nn.Module):
    """shift + proj(h) * (1 + scale), scale and shift graph inputs of any shape."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(D, D)

    def forward(self, h, scale, shift):
        return shift + self.proj(h) * (1 + scale)


@pytest.mark.parametrize("name", ["per_batch_scale", "per_batch_shift", "scalar_scale_full_shift"])
def test_npu_refused_scale_shift_is_a_reported_miss(npu_calls, name):
    """A modulation fused_scale_shift cannot compute, compiled with the NPU lowering: the
    site is a miss whose reason is the lowering's, no vendor kernel is called, and the
    output is eager's."""
    bshape, cshape, k, why = SCALE_SHIFT_CASES[name]
    m = Modulate().eval()
    h, scale, shift = torch.randn(B, L, D), torch.randn(bshape), torch.randn(cshape)
    out, rep = compile_and_run(m, h, scale, shift, options={"lowering": "npu", "inductor": False})
    assert rep.matches() == {} and npu_calls == []
    (miss,) = rep.misses
    assert miss.family == "scale_shift" and "npu lowering does not take it" in miss.reason and why in miss.reason
    with torch.no_grad():
        assert_close(out, m(h, scale, shift))


@pytest.mark.parametrize("form", ["ln_modulated", "residual_gate_affine_ln_modulated", "residual_rms",
                                  "ln_no_modulation", "ln_per_batch_scale"])
def test_npu_norm_scale_shift(npu_calls, form):
    """norm_scale_shift on NPU: the norm in aten (LN) or the rms kernels, the modulation by
    fused_scale_shift where exact; r rounded to residual_dtype before the norm."""
    from difffuse.lowering import npu

    torch.manual_seed(0)
    bf, f32 = torch.bfloat16, torch.float32
    x, res, gate = torch.randn(1, L, D, dtype=bf), torch.randn(1, L, D, dtype=bf), torch.randn(1, 1, D)
    w, bias, scale, shift = torch.randn(D), torch.randn(D), torch.randn(1, 1, D), torch.randn(1, 1, D)
    args = dict(x=x, residual=None, gate=None, weight=None, bias=None, scale=scale, shift=shift, eps=1e-6,
                k=1.0, is_rms=False, residual_dtype=f32, out_dtype=bf)
    expect = ["fused_scale_shift"]
    if form == "residual_gate_affine_ln_modulated":
        args.update(residual=res, gate=gate, weight=w, bias=bias, residual_dtype=bf)
    elif form == "residual_rms":
        args.update(residual=res, weight=w, scale=None, shift=None, is_rms=True, residual_dtype=bf)
        expect = ["fused_variance", "fused_rsqrt_mul"]
    elif form == "ln_no_modulation":
        args.update(scale=None, shift=None)
    elif form == "ln_per_batch_scale":
        args.update(x=torch.randn(2, L, D, dtype=bf), scale=torch.randn(2, 1, D), shift=torch.randn(2, 1, D))
    reason = npu.supports(record("norm_scale_shift", **args))
    if form in ("ln_no_modulation", "ln_per_batch_scale"):
        assert reason is not None
        return
    assert reason is None
    out, r = npu.IMPLS["norm_scale_shift"](**args)
    ref_out, ref_r = ops.norm_scale_shift_ref(**args)
    assert r.dtype == ref_r.dtype and torch.equal(r, ref_r)
    assert_close(out, ref_out)
    assert [c[0] for c in npu_calls] == expect
    if expect == ["fused_scale_shift"]:
        assert npu_calls[0][1][0] == ((1, L, D), f32)  # the fp32 normalised tensor


ROPE = {  # name: (x shape, num_heads, across_heads, interleaved, full_tables, table shape, reason substring)
    "wan_across_interleave": ((1, L, 4 * D), 4, True, True, False, (1, L, 1, D), None),
    "flux_per_head_half": ((2, L, 4, D), 4, False, False, False, (L, 1, D), None),
    "stack_full_tables_per_head": ((2, L, 4, D), 4, False, True, True, (L, 1, D), None),
    "stack_full_tables_across": ((1, L, 4 * D), 4, True, True, True, (1, L, 1, D), None),
    "per_head_half_per_batch_table": ((2, L, 4, D), 4, False, False, False, (2, L, 1, D), None),
    "interleave_per_batch_table": ((2, L, 4, D), 4, False, True, False, (2, L, 1, D), "npu_rotary_mul takes"),
    "interleave_too_many_heads": ((2, L, 500, D), 500, False, True, True, (1, L, 1, D), "B*N < 1000"),
    "table_over_heads": ((1, L, 4, D), 4, False, False, False, (1, 1, 4, D), "npu_rotary_mul takes"),
    "not_4d": ((L, 4, D), 4, False, False, False, (L, 1, D), "4-d"),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", sorted(ROPE))
def test_npu_qk_norm_rope(npu_calls, name, dtype):
    """qk_norm_rope on NPU: rms kernels then npu_rotary_mul (mode from the layout), equal to
    the reference op for random tables (not pair-duplicated; values in [-1, 1] as the API
    states), half or full (the stack form: r1 = cos, r2 = sin as given), and a strided weight;
    layouts outside npu_rotary_mul's limits are refused with the reason."""
    from difffuse.lowering import npu

    shape, heads, across, inter, full, tshape, why = ROPE[name]
    x, w = torch.randn(shape, dtype=dtype), torch.randn(shape[-1], 2)[:, 1]
    cos, sin = (torch.rand(tshape, dtype=dtype) * 2 - 1 for _ in range(2))
    args = dict(x=x, weight=w, cos=cos, sin=sin, eps=1e-6, num_heads=heads, across_heads=across,
                interleaved=inter, out_dtype=dtype, full_tables=full)
    reason = npu.supports(record("qk_norm_rope", **args))
    if why:
        assert reason is not None and why in reason, reason
        return
    assert reason is None
    out = npu.IMPLS["qk_norm_rope"](**args)
    assert_close(out, ops.qk_norm_rope_ref(**args))
    assert [c[0] for c in npu_calls] == ["fused_variance", "fused_rsqrt_mul", "npu_rotary_mul"]
    assert npu_calls[2][2] == {"rotary_mode": "interleave" if inter else "half"}
    assert all(dt == torch.float32 for _, dt in npu_calls[2][1])
    if inter and full:  # the other reading of the same tables is not what was computed
        other = ops.qk_norm_rope_ref(**{**args, "full_tables": False})
        assert (out.float() - other.float()).abs().max() > 0.1


@pytest.mark.parametrize("name", ["wan-t2v-tiny", "wan-i2v-tiny", "wan-ti2v-tiny"])
def test_npu_tiny_wan_matches_eager(monkeypatch, name):
    """The tiny Wan T2V / I2V / TI2V transformers on the NPU lowering (stand-ins), graph run
    eagerly: q/k norm+rope and the plain norms go through the vendor calls, every site the
    NPU cannot take is reported with its reason, and the output equals eager. diffusers is
    imported before the stand-ins go in, so it does not take them for a real torch_npu."""
    pytest.importorskip("diffusers")
    from difffuse.testing.tiny_models import MODELS

    model, kwargs = MODELS[name](num_layers=1, dtype=torch.float32)
    with torch.no_grad():
        ref = model(**kwargs)[0]
    calls: list = []
    install(monkeypatch, npu_modules(calls), "difffuse.lowering.npu")
    out, rep = compile_and_run(model, options={"lowering": "npu", "inductor": False}, **kwargs)
    # the vendor-routed families as on the reference lowering (difffuse.testing.expected)
    matches, want = rep.matches(), expected(name, 1)
    assert all(matches.get(f) == want[f] for f in ("qk_norm_rope", "rms_norm")), str(rep)
    # no Linear+GELU epilogue on the NPU; other refusals name the vendor limit
    assert all(("no linear_gelu kernel" in m.reason) or ("npu lowering does not take it" in m.reason)
               for m in rep.misses), str(rep)
    assert calls and {c[0] for c in calls} <= {"fused_variance", "fused_rsqrt_mul", "fused_scale_shift",
                                                "npu_rotary_mul"}
    torch.testing.assert_close(out[0], ref, rtol=1e-4, atol=1e-4)


# ====================================================================== ROCm
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_rocm_rms_norm_calls_rmsnorm2d_fwd(aiter_calls, dtype):
    m, x = _block(dtype)
    out, rep = compile_and_run(m, x, options={"lowering": "rocm"})
    assert rep.matches() == {"rms_norm": 1} and rep.graphs[0].lowering == "rocm"
    assert aiter_calls == [("rmsnorm2d_fwd", [((10, 16), dtype), ((16,), dtype)], {"epsilon": pytest.approx(1e-6)})]
    with torch.no_grad():
        assert_close(out, m(x))


def test_rocm_refuses_mixed_dtype_weight_and_reports_it(aiter_calls):
    """A bf16 input normalised in fp32 and kept fp32 (an fp32 output from a bf16 input):
    aiter writes the input's dtype, so the site stays with Inductor and the report says why."""

    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(16))

        def forward(self, h):
            return h.float() * torch.rsqrt(h.float().pow(2).mean(-1, keepdim=True) + 1e-6) * self.w

    m, x = Mixed().eval(), torch.randn(2, 5, 16, dtype=torch.bfloat16)
    out, rep = compile_and_run(m, x, options={"lowering": "rocm"})
    assert rep.matches() == {} and aiter_calls == []
    assert len(rep.misses) == 1 and "rocm lowering does not take it: output dtype" in rep.misses[0].reason
    with torch.no_grad():
        assert out.dtype == torch.float32
        assert_close(out, m(x))


def test_rocm_residual_rms_norm_calls_with_add(aiter_calls):
    """The residual RMSNorm form of norm_scale_shift (its pattern is another module's: called
    through the IMPLS callable): rmsnorm2d_fwd_with_add, trailing args by keyword only."""
    from difffuse.lowering import rocm

    torch.manual_seed(0)
    bf = torch.bfloat16
    args = dict(x=torch.randn(2, L, D, dtype=bf), residual=torch.randn(2, L, D, dtype=bf), gate=None,
                weight=torch.randn(D, dtype=bf), bias=None, scale=None, shift=None, eps=1e-5, k=1.0, is_rms=True,
                residual_dtype=bf, out_dtype=bf)
    assert rocm.supports(record("norm_scale_shift", **args)) is None
    out, r = rocm.IMPLS["norm_scale_shift"](**args)
    ref_out, ref_r = ops.norm_scale_shift_ref(**args)
    assert torch.equal(r, ref_r)
    assert_close(out, ref_out)
    (fn, sig, consts), = aiter_calls
    assert fn == "rmsnorm2d_fwd_with_add" and consts == {"epsilon": 1e-5}
    assert sig == [((2 * L, D), bf)] * 4 + [((D,), bf)]
    for change, why in [({"is_rms": False}, "LayerNorm"), ({"scale": torch.randn(1, 1, D)}, "scale"),
                        ({"residual_dtype": torch.float32}, "mixed dtypes"), ({"residual": None}, "no residual")]:
        assert why in rocm.supports(record("norm_scale_shift", **{**args, **change}))
    a = torch.randn(2, L, D)
    others = [record("scale_shift", a=a, b=torch.randn(D), c=None, k=1.0, out_dtype=bf),
              record("qk_norm_rope", x=a.unflatten(-1, (2, -1)), weight=None, cos=torch.randn(L, 1, D // 2),
                     sin=torch.randn(L, 1, D // 2), eps=1e-6, num_heads=2, across_heads=False, interleaved=True,
                     out_dtype=bf)]
    assert [rocm.supports(r) for r in others] == ["no aiter kernel for scale_shift", "no aiter kernel for qk_norm_rope"]


@pytest.mark.parametrize("installed", ["absent", "pypi_aiter"])
def test_rocm_missing_aiter_warns_once_and_falls_back(monkeypatch, caplog, installed):
    """No aiter, or PyPI's unrelated `aiter` (async iterators): one WARNING, plain Inductor."""
    install(monkeypatch, {"aiter": None if installed == "absent" else types.ModuleType("aiter")},
            "difffuse.lowering.rocm")
    m, x = _block()
    with caplog.at_level(logging.WARNING, logger="difffuse"):
        for _ in range(2):
            out, rep = compile_and_run(m, x, options={"lowering": "rocm"})
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "aiter" in warnings[0] and "falling back to inductor" in warnings[0]
    assert rep.graphs[0].lowering == "inductor" and rep.matches() == {}
    assert_close(out, m(x))


# ====================================================================== MUSA, detection
def test_musa_detected_means_plain_inductor(monkeypatch):
    monkeypatch.setattr(backend, "detect_from_tensors", lambda values: "musa")
    monkeypatch.setattr(pass_manager, "detect_device", lambda graph: "musa")
    m, x = _block()
    out, rep = compile_and_run(m, x, options={"lowering": "auto"})
    assert rep.matches() == {} and rep.graphs[0].lowering == "musa"
    assert "musa: no rewrite, plain Inductor" in rep.graphs[0].notes
    assert_close(out, m(x))


def test_device_detection(monkeypatch):
    monkeypatch.setattr(torch.version, "hip", None)
    assert device.device_of_tensor_type("cuda") == "cuda"
    assert [device.device_of_tensor_type(t) for t in ("npu", "musa", "cpu", "xpu")] == [
        "npu", "musa", "inductor", "inductor"]
    monkeypatch.setattr(torch.version, "hip", "6.2")
    assert device.device_of_tensor_type("cuda") == "rocm"
    meta = [torch.empty(2, device="meta"), torch.empty(2)]
    assert device.detect_from_tensors(meta) == "inductor"
