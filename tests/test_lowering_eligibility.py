"""Each lowering's `supports(site)` on typed site records built with `TensorSpec.of(tensor)`,
no graph anywhere: strided weights, zero-size operands, odd head_dim, dtypes, devices, full
rope tables, computed per-token modulation; and `difffuse/lowering/` imports nothing from
`difffuse/patterns/`. (That the accepted sites compute the reference op is
test_cuda_lowering.py's and test_vendor_lowerings.py's business.)"""
from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest
import torch

import difffuse.lowering as lowering_pkg
from difffuse.lowering import cuda, cuda_jit, reference
from difffuse.lowering.sites import SITE_TYPES, TensorSpec
from difffuse.testing.vendor_stubs import aiter_modules, install, npu_modules

F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
FLOATS = (F32, BF16, F16)


def rnd(*shape, dtype=F32):
    return torch.randn(*shape, dtype=dtype)


def col(n, dtype=F32):
    """W[:, 0] of an [n, 2] parameter: one value per column, stride 2."""
    return rnd(n, 2, dtype=dtype)[:, 0]


def site(family, **kw):
    """The typed record of one op call with these arguments (what a pattern hands a lowering)."""
    return SITE_TYPES[family](**{k: TensorSpec.of(v) if isinstance(v, torch.Tensor) else v for k, v in kw.items()})


def on_cuda(rec):
    """The same record with every operand on a CUDA device (only the device field changes)."""
    moved = {f.name: dataclasses.replace(v, device="cuda") for f in dataclasses.fields(rec)
             if isinstance(v := getattr(rec, f.name), TensorSpec)}
    return dataclasses.replace(rec, **moved)


def rms(x, weight=None, out_dtype=None):
    return site("rms_norm", x=x, weight=weight, eps=1e-6, out_dtype=out_dtype or x.dtype)


def nss(x, residual=None, gate=None, weight=None, bias=None, scale=None, shift=None, is_rms=False, **kw):
    return site("norm_scale_shift", x=x, residual=residual, gate=gate, weight=weight, bias=bias, scale=scale,
                shift=shift, eps=1e-6, k=kw.get("k", 1.0), is_rms=is_rms,
                residual_dtype=kw.get("residual_dtype", x.dtype), out_dtype=kw.get("out_dtype", x.dtype))


def qk(x, heads, across, cos, sin=None, weight=None, interleaved=True, full_tables=False, bias=None, is_rms=True):
    return site("qk_norm_rope", x=x, weight=weight, cos=cos, sin=cos if sin is None else sin, eps=1e-6,
                num_heads=heads, across_heads=across, interleaved=interleaved, out_dtype=x.dtype, bias=bias,
                is_rms=is_rms, full_tables=full_tables)


# ====================================================================== the contract
def test_lowering_imports_nothing_from_patterns():
    """Eligibility is stated from the record alone: no module under difffuse/lowering/
    imports difffuse/patterns/ (or reads graph nodes through it)."""
    offenders = []
    for path in Path(lowering_pkg.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""] + [a.name for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            if any("patterns" in n for n in names):
                offenders.append(f"{path.name}:{node.lineno}")
    assert offenders == []


def test_reference_takes_every_record():
    x = rnd(4, 0)
    assert reference.supports(rms(x)) is None
    assert reference.supports(qk(rnd(2, 3, 5), 1, True, rnd(3, 1, 5))) is None


# ====================================================================== CUDA (Triton kernels)
def tri(rec):
    """The CUDA lowering's answer for the record with its operands on a CUDA device (so the
    rules read the same on a CPU under the interpreter and on a GPU)."""
    return cuda.supports(on_cuda(rec))


@pytest.mark.parametrize("dtype", FLOATS)
def test_cuda_rms_norm(dtype):
    x = rnd(4, 5, 16, dtype=dtype)
    assert tri(rms(x, rnd(16, dtype=dtype))) is None
    assert tri(rms(x, col(16))) is None  # strided weight: the kernel reads its stride
    assert tri(rms(x, rnd(16, 3)[:, 1:2].squeeze(1), out_dtype=F32)) is None
    assert tri(rms(rnd(7, 16, dtype=dtype), rnd(1, 1, 16))) is None  # weight adds a dim of 1
    assert "one value per column" in tri(rms(x, rnd(5, 16)))
    assert "one value per column" in tri(rms(x, rnd(1)))
    assert "8192" in tri(rms(rnd(2, 8200, dtype=dtype)))
    assert "leading dims" in tri(rms(rnd(2, 2, 2, 2, 8, dtype=dtype)))


@pytest.mark.parametrize("x,w", [((4, 0), (0,)), ((0, 16), (16,)), ((2, 0, 16), None)])
def test_cuda_zero_size_is_left_to_inductor(x, w):
    reason = tri(rms(rnd(*x), rnd(*w) if w else None))
    assert reason and "zero-size" in reason


@pytest.mark.parametrize("dtype", [torch.float64, torch.int32, torch.complex64])
def test_cuda_dtypes(dtype):
    assert str(dtype) in tri(rms(rnd(4, 16).to(dtype)))
    assert str(dtype) in tri(rms(rnd(4, 16), rnd(16).to(dtype)))


def test_cuda_devices(monkeypatch):
    rec = rms(rnd(4, 16), col(16))
    monkeypatch.setattr(cuda, "INTERPRET", False)  # off the interpreter, tensors must be on CUDA
    assert "need CUDA tensors" in cuda.supports(rec)
    assert cuda.supports(on_cuda(rec)) is None


def test_cuda_scale_shift_and_computed_per_token():
    a = rnd(2, 9, 40)
    assert tri(site("scale_shift", a=a, b=rnd(2, 1, 40), c=rnd(40, 2)[:, 0], k=1.0, out_dtype=F32)) is None
    assert "leading dims" in tri(site("scale_shift", a=rnd(2, 2, 2, 2, 8), b=rnd(8), c=None, k=1.0,
                                                out_dtype=F32))
    per_token = TensorSpec.of(rnd(2, 9, 40), computed=True)  # e.g. Wan 2.2 TI2V's `table + temb` chunk
    rec = SITE_TYPES["scale_shift"](TensorSpec.of(a), per_token, None, 1.0, F32)
    assert "per-token b is computed" in tri(rec)
    small = TensorSpec.of(rnd(2, 1, 40), computed=True)  # a computed [B, 1, D] modulation is fine
    assert tri(SITE_TYPES["scale_shift"](TensorSpec.of(a), small, None, 1.0, F32)) is None
    given = TensorSpec.of(rnd(2, 9, 40))  # a per-token input the graph does not compute is fine
    assert tri(SITE_TYPES["scale_shift"](TensorSpec.of(a), given, None, 1.0, F32)) is None


def test_cuda_norm_scale_shift():
    x = rnd(2, 9, 40, dtype=BF16)
    assert tri(nss(x, rnd(2, 9, 40, dtype=BF16), rnd(2, 1, 40), col(40), col(40), rnd(2, 1, 40),
                             rnd(2, 1, 40))) is None
    assert "bias of shape" in tri(nss(x, bias=rnd(9, 40)))
    assert "widens" in tri(nss(rnd(2, 3, 8), scale=rnd(4, 2, 1, 8)))
    assert "zero-size" in tri(nss(rnd(2, 0, 8), scale=rnd(2, 1, 8)))


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("across", [True, False])
def test_cuda_qk_norm_rope_full_tables_and_strided_weight(dtype, across):
    x = rnd(2, 7, 24, dtype=dtype) if across else rnd(2, 7, 3, 8, dtype=dtype)
    w = col(24 if across else 8, dtype)
    for tables in (rnd(7, 1, 8), rnd(1, 7, 1, 8, dtype=dtype), rnd(7, 1, 8, 2)[..., 0]):
        for full in (True, False):
            assert tri(qk(x, 3, across, tables, rnd(7, 1, 8), w, full_tables=full)) is None


def test_cuda_qk_norm_rope_declines():
    assert "odd head_dim" in tri(qk(rnd(2, 3, 5), 1, True, rnd(3, 1, 5)))
    assert "odd head_dim" in tri(qk(rnd(2, 3, 2, 7), 2, False, rnd(3, 1, 7), full_tables=True))
    assert "LayerNorm per head only" in tri(qk(rnd(2, 3, 16), 2, True, rnd(3, 1, 8), bias=rnd(16),
                                                         is_rms=False))
    assert "not 3 heads" in tri(qk(rnd(2, 3, 16), 3, True, rnd(3, 1, 8)))
    assert "do not broadcast" in tri(qk(rnd(2, 3, 2, 8), 2, False, rnd(5, 1, 8)))
    assert "do not broadcast" in tri(qk(rnd(2, 3, 2, 8), 2, False, rnd(4, 2, 3, 2, 8)))  # widens
    assert "weight of shape" in tri(qk(rnd(2, 3, 2, 8), 2, False, rnd(3, 1, 8), weight=rnd(16)))
    assert "more dims" in tri(qk(rnd(3, 2, 8), 2, False, rnd(3, 1, 8), weight=rnd(1, 1, 1, 8)))
    assert "zero-size" in tri(qk(rnd(2, 0, 2, 8), 2, False, rnd(0, 1, 8), full_tables=True))
    assert "complex" in tri(qk(rnd(2, 3, 2, 8), 2, False, rnd(3, 1, 8, dtype=torch.complex64)))


def test_cuda_other_families():
    assert "erf-GELU" in cuda.supports(site("linear_gelu", x=rnd(4, 16), weight=rnd(8, 16), bias=rnd(8),
                                            out_dtype=F32))
    lg = on_cuda(site("linear_gelu", x=rnd(4, 16), weight=rnd(8, 16), bias=rnd(8), out_dtype=F32))
    assert cuda.supports(lg) is None
    assert "mixed" in cuda.supports(dataclasses.replace(lg, out_dtype=BF16))
    assert cuda.supports(site("variance", x=rnd(4, 16))) == "no CUDA kernel for variance"


# ====================================================================== the JIT CUDA C++ qk kernel
def jit_site(hd=64, across=True, **kw):
    x = rnd(2, 9, 4 * hd) if across else rnd(2, 9, 4, hd)
    return on_cuda(qk(x, 4, across, rnd(9, 1, hd), weight=kw.pop("weight", col(4 * hd if across else hd)), **kw))


def test_jit_supports():
    assert cuda_jit.supports(jit_site()) is None
    assert cuda_jit.supports(jit_site(256, False, interleaved=False)) is None
    assert "full rope tables" in cuda_jit.supports(jit_site(full_tables=True))
    assert "RMSNorm" in cuda_jit.supports(jit_site(across=False, bias=rnd(64), is_rms=False))
    assert "head_dim 96" in cuda_jit.supports(jit_site(96))
    assert "weight of shape" in cuda_jit.supports(jit_site(weight=rnd(2, 256)))
    strided_x = on_cuda(qk(rnd(2, 9, 512)[..., ::2], 4, True, rnd(9, 1, 64)))
    assert "not contiguous" in cuda_jit.supports(strided_x)
    assert "CUDA tensors" in cuda_jit.supports(qk(rnd(2, 9, 256), 4, True, rnd(9, 1, 64)))
    assert "zero-size" in cuda_jit.supports(on_cuda(qk(rnd(2, 0, 256), 4, True, rnd(0, 1, 64))))
    assert "fp16/bf16/fp32" in cuda_jit.supports(on_cuda(qk(rnd(2, 9, 256).double(), 4, True, rnd(9, 1, 64))))


# ====================================================================== NPU and ROCm (stand-in packages)
@pytest.fixture
def npu(monkeypatch):
    install(monkeypatch, npu_modules([]), "difffuse.lowering.npu")
    from difffuse.lowering import npu as module

    return module


@pytest.fixture
def rocm(monkeypatch):
    install(monkeypatch, aiter_modules([]), "difffuse.lowering.rocm")
    from difffuse.lowering import rocm as module

    return module


@pytest.mark.parametrize("dtype", FLOATS)
def test_npu_qk_norm_rope(npu, dtype):
    x = rnd(2, 6, 4, 8, dtype=dtype)
    for full in (True, False):  # npu_rotary_mul's interleave mode reads r1/r2 per element
        assert npu.supports(qk(x, 4, False, rnd(6, 1, 8, dtype=dtype), weight=col(8), full_tables=full)) is None
    assert npu.supports(qk(rnd(1, 6, 32, dtype=dtype), 4, True, rnd(1, 6, 1, 8), full_tables=True)) is None
    assert "even and < 896" in npu.supports(qk(rnd(1, 6, 2, 7, dtype=dtype), 2, False, rnd(6, 1, 7)))
    assert "RMSNorm kernels only" in npu.supports(qk(x, 4, False, rnd(6, 1, 8), bias=rnd(8), is_rms=False))
    assert "zero-size" in npu.supports(qk(rnd(2, 0, 4, 8, dtype=dtype), 4, False, rnd(0, 1, 8)))
    assert "weight of shape" in npu.supports(qk(x, 4, False, rnd(6, 1, 8), weight=rnd(32)))
    assert "complex" in npu.supports(qk(x, 4, False, rnd(6, 1, 4, dtype=torch.complex64)))
    assert "even and < 896" in npu.supports(qk(rnd(1, 6, 2, 900, dtype=dtype), 2, False, rnd(1, 6, 1, 900),
                                               interleaved=False))


def test_npu_norms_and_modulation(npu):
    x = rnd(2, 6, 8)
    assert npu.supports(rms(x, col(8))) is None  # the vendor wrappers pass contiguous copies
    assert npu.supports(site("variance", x=x)) is None
    assert "float64" in npu.supports(rms(x.double()))
    assert "zero-size" in npu.supports(rms(rnd(2, 6, 0)))
    assert "weight of shape" in npu.supports(rms(rnd(6, 8), rnd(1, 1, 8)))  # would widen the output
    assert "[B, L, D]" in npu.supports(site("scale_shift", a=rnd(2, 3, 4, 8), b=rnd(8), c=None, k=1.0, out_dtype=F32))
    assert "contiguous" in npu.supports(site("scale_shift", a=rnd(2, 8, 6).transpose(1, 2), b=rnd(8), c=None, k=1.0,
                                             out_dtype=F32))
    assert npu.supports(nss(x, scale=rnd(1, 1, 8), shift=rnd(8))) is None
    assert "per-batch" in npu.supports(nss(x, scale=rnd(2, 1, 8), shift=rnd(2, 1, 8)))
    assert "weight of shape" in npu.supports(nss(x, rnd(2, 6, 8), weight=rnd(16), is_rms=True))
    assert npu.supports(site("linear_gelu", x=rnd(4, 16), weight=rnd(8, 16), bias=rnd(8), out_dtype=F32)) == \
        "no NPU kernel for linear_gelu"


def test_rocm(rocm):
    x = rnd(10, 16, dtype=BF16)
    assert rocm.supports(rms(x, col(16, BF16))) is None  # aiter gets a contiguous copy
    assert "weight dtype" in rocm.supports(rms(x, col(16)))
    assert rocm.supports(rms(rnd(10, 16), col(16, BF16))) is None  # a widened weight loses nothing
    assert "wider" in rocm.supports(rms(x, out_dtype=F32))
    assert "zero-size" in rocm.supports(rms(rnd(0, 16, dtype=BF16)))
    assert "weight of shape" in rocm.supports(rms(x, rnd(1, 1, 16, dtype=BF16)))
    r = rnd(10, 16, dtype=BF16)
    assert rocm.supports(nss(x, r, weight=col(16, BF16), is_rms=True)) is None
    assert "broadcasts" in rocm.supports(nss(x, rnd(1, 16, dtype=BF16), is_rms=True))
    assert rocm.supports(site("variance", x=x)) == "no aiter kernel for variance"
