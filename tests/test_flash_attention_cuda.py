"""The CUDA attention kernels on a GPU (marked `cuda`, skipped elsewhere): each installed
kernel against the reference op at real diffusion shapes, lse included, fp16/bf16, causal
square; the compiled graph routes SDPA to the kernel with no copy of q/k/v; a read
logsumexp (ring attention) comes from the kernel in the node's layout."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import difffuse
from difffuse.lowering import attention_kernel
from difffuse.lowering import flash_attention as fa

pytestmark = pytest.mark.cuda


def installed() -> list[str]:
    if not torch.cuda.is_available():
        return []
    major = torch.cuda.get_device_capability()[0]
    return [n for n, k in fa.KERNELS.items() if k.available() is None and major in k.arches]


def kernel_param():
    return pytest.mark.parametrize("kernel", installed() or [pytest.param("none", marks=pytest.mark.skip(
        reason="no FlashAttention kernel installed for this GPU"))])


def blhd(b, l, h, d, dtype):
    return torch.randn(b, l, h, d, device="cuda", dtype=dtype).transpose(1, 2)


def reference_rows(q, k, v, scale, causal, rows):
    """out and lse of exact attention for query rows `rows` (fp32; every key), per head."""
    outs, lses = [], []
    s_ = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    for h in range(q.shape[1]):
        s = (q[:, h, rows].float() @ k[:, h].float().transpose(-1, -2)) * s_
        if causal:
            keep = torch.arange(k.shape[2], device="cuda")[None, :] <= torch.arange(q.shape[2], device="cuda")[rows, None]
            s = s.masked_fill(~keep, float("-inf"))
        lse = torch.logsumexp(s, -1)
        outs.append(torch.exp(s - lse[..., None]) @ v[:, h].float())
        lses.append(lse)
    return torch.stack(outs, 1), torch.stack(lses, 1)


SHAPES = {  # (B, Lq, Lkv, H, D, Dv, causal)
    "wan-1.3b-self": (1, 32760, 32760, 12, 128, 128, False),
    "wan-cross": (1, 32760, 512, 12, 128, 128, False),
    "flux-joint": (1, 4608, 4608, 24, 128, 128, False),
    "odd-causal": (2, 1001, 1001, 3, 64, 64, True),
    "odd-cross": (3, 77, 333, 5, 96, 96, False),
}


@kernel_param()
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_kernel_matches_reference(kernel, dtype, shape):
    b, lq, lkv, h, d, dv, causal = SHAPES[shape]
    q, k, v = blhd(b, lq, h, d, dtype), blhd(b, lkv, h, d, dtype), blhd(b, lkv, h, dv, dtype)
    site = fa.AttentionSite(*(fa.TensorSpec.of(t) for t in (q, k, v)), 0.1, causal, True)
    with attention_kernel(kernel):
        name, reason = fa.choose(site)
    if name is None:
        pytest.skip(reason)  # e.g. a build without fp16 (its probe says so)
    out, lse = torch.ops.difffuse.flash_attention(q, k, v, 0.1, causal, kernel)
    assert out.shape == (b, h, lq, dv) and out.dtype == dtype and out.transpose(1, 2).is_contiguous()
    assert lse.shape == (b, h, lq) and lse.dtype == torch.float32 and lse.is_contiguous()
    rows = torch.randperm(lq, device="cuda")[:512].sort().values
    ref_out, ref_lse = reference_rows(q, k, v, 0.1, causal, rows)
    got = out[:, :, rows].float()
    assert ((got - ref_out).norm() / ref_out.norm()).item() < (8e-3 if dtype == torch.bfloat16 else 1e-3)
    torch.testing.assert_close(lse[:, :, rows], ref_lse, rtol=1e-4, atol=1e-3)
    # as exact as cuDNN's SDPA on the same call (what the node computed before)
    sdpa = F.scaled_dot_product_attention(q, k, v, scale=0.1, is_causal=causal)[:, :, rows].float()
    err_sdpa = ((sdpa - ref_out).norm() / ref_out.norm()).item()
    assert ((got - ref_out).norm() / ref_out.norm()).item() <= 1.5 * err_sdpa + 1e-6


@kernel_param()
def test_compiled_sdpa_routes_without_copies(kernel):
    from torch._inductor.utils import run_and_get_code

    fn = lambda q, k, v: F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)  # noqa: E731
    args = (blhd(1, 4096, 12, 128, torch.bfloat16), blhd(1, 512, 12, 128, torch.bfloat16),
            blhd(1, 512, 12, 128, torch.bfloat16))
    torch._dynamo.reset()
    difffuse.reset_report()
    compiled = torch.compile(fn, backend="difffuse", options={"attention_kernel": kernel})
    with torch.no_grad():
        out, (code,) = run_and_get_code(compiled, *args)
    rep = difffuse.report()
    assert rep.matches() == {"attention": 1}, str(rep)
    assert "difffuse.flash_attention" in code and f"'{kernel}'" in code
    # nothing else runs: no copy of q/k/v in, no relayout of the output
    assert "triton" not in code.split("def call(")[1] and "clone" not in code and "copy_" not in code, code
    ref = fn(*args)
    assert ((out.float() - ref.float()).norm() / ref.float().norm()).item() < 8e-3


@kernel_param()
def test_read_logsumexp_is_the_kernels(kernel):
    """The cuDNN spelling with compute_log_sumexp, its lse read (ring attention's merge):
    the op's lse lands in the node's [B, H, L, 1] layout."""
    def fn(q, k, v):
        out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True)[:2]
        return out * torch.sigmoid(lse)

    args = (blhd(2, 1000, 4, 128, torch.bfloat16), blhd(2, 1000, 4, 128, torch.bfloat16),
            blhd(2, 1000, 4, 128, torch.bfloat16))
    torch._dynamo.reset()
    difffuse.reset_report()
    compiled = torch.compile(fn, backend="difffuse", options={"attention_kernel": kernel})
    with torch.no_grad():
        got, ref = compiled(*args), fn(*args)
    assert difffuse.report().matches() == {"attention": 1}, str(difffuse.report())
    torch.testing.assert_close(got.float(), ref.float(), rtol=2e-2, atol=2e-2)


@kernel_param()
def test_dynamic_shapes_no_recompile(kernel):
    fn = lambda q, k, v: F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)  # noqa: E731
    torch._dynamo.reset()
    difffuse.reset_report()
    compiled = torch.compile(fn, backend="difffuse", options={"attention_kernel": kernel}, dynamic=True)
    with torch.no_grad():
        for b, lq, lkv in [(2, 1000, 77), (3, 1700, 512), (4, 600, 1200)]:
            args = (blhd(b, lq, 8, 128, torch.bfloat16), blhd(b, lkv, 8, 128, torch.bfloat16),
                    blhd(b, lkv, 8, 128, torch.bfloat16))
            got, ref = compiled(*args), fn(*args)
            assert ((got.float() - ref.float()).norm() / ref.float().norm()).item() < 8e-3
    rep = difffuse.report()
    assert len(rep.graphs) == 1 and rep.matches() == {"attention": 1}, str(rep)
