"""The attention family on the ROCm and NPU lowerings, contract-tested on CPU (design §5, §8).

Stand-in `aiter.flash_attn_func` and `torch_npu.npu_fusion_attention`: the stand-in
modules of difffuse.testing.vendor_stubs with `attention=True`. Each has the upstream
signature (names, defaults; an unknown keyword is a TypeError), does what the upstream
Python wrapper does to its inputs, ENFORCES the upstream checks (dtype, layout, strides,
head dims, shapes; sources in the docstrings of difffuse/lowering/{rocm,npu}.py), computes
the math in fp32 and returns what upstream returns, in its layout (aiter: a sliced `out`
when the head dim was padded; NPU: the softmax max / sum 8 times over, not the lse).
Asserted: the lowering's op equals `ops.attention_ref` (out and lse) with the reference
op's shape, strides and dtype, and its fake agrees (torch.library.opcheck); `supports`
refuses what the kernel cannot do, with the reason; compiled graphs route SDPA (and a read
logsumexp) through the vendor call."""
from __future__ import annotations

import importlib
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode

from conftest import assert_close, compile_and_run
from difffuse.families import NAMES
from difffuse.lowering import ops
from difffuse.lowering.sites import AttentionSite, TensorSpec
from difffuse.testing.distributed import ring_attention_cpu
from difffuse.testing.vendor_stubs import FLOATS, HALF, aiter_modules, install, npu_modules


@pytest.fixture
def rocm_calls(monkeypatch):
    calls: list = []
    install(monkeypatch, aiter_modules(calls, attention=True), "difffuse.lowering.rocm")
    return calls


@pytest.fixture
def npu_calls(monkeypatch):
    calls: list = []
    install(monkeypatch, npu_modules(calls, attention=True), "difffuse.lowering.npu")
    return calls


def lowering(name: str):
    """difffuse.lowering.rocm / .npu, imported afresh against the installed stand-ins."""
    return importlib.import_module(f"difffuse.lowering.{name}")


# ====================================================================== the op against the reference
def blhd(b, lq, lkv, h, d, dv, dtype):
    """diffusers' form: [B, H, L, D] views of [B, L, H, D] memory."""
    return tuple(torch.randn(b, l, h, d_, dtype=dtype).transpose(1, 2) for l, d_ in ((lq, d), (lkv, d), (lkv, dv)))


def bhld(b, lq, lkv, h, d, dv, dtype):
    return (torch.randn(b, h, lq, d, dtype=dtype), torch.randn(b, h, lkv, d, dtype=dtype),
            torch.randn(b, h, lkv, dv, dtype=dtype))


def strided_d(b, lq, lkv, h, d, dv, dtype):
    """Views whose head dim is not stride 1 (aiter's wrapper copies them; NPU: BSND copies)."""
    return tuple(torch.randn(b, h, d_, l, dtype=dtype).transpose(-1, -2) for l, d_ in ((lq, d), (lkv, d), (lkv, dv)))


CASES = {  # name: (make, (B, Lq, Lkv, H, D, Dv), scale, is_causal)
    "blhd_views": (blhd, (2, 10, 10, 3, 64, 64), None, False),
    "cross_attention": (blhd, (1, 9, 5, 2, 32, 32), 0.3, False),
    "causal_square": (blhd, (2, 12, 12, 2, 16, 16), None, True),
    "odd_sizes_padded_head_dim": (bhld, (1, 7, 13, 1, 20, 12), None, False),
    "contiguous_bhld": (bhld, (2, 6, 11, 4, 8, 8), 0.5, False),
    "head_dim_not_stride_1": (strided_d, (1, 5, 6, 2, 16, 16), None, False),
    "causal_odd_head_dim": (blhd, (1, 5, 5, 3, 12, 12), 0.2, True),
}


def _site(q, k, v, scale, is_causal, lse_used=True):
    return AttentionSite(TensorSpec.of(q), TensorSpec.of(k), TensorSpec.of(v), scale, is_causal, lse_used, "test")


def _check_against_reference(mod, calls, name, dtype):
    make, dims, scale, causal = CASES[name]
    torch.manual_seed(0)
    q, k, v = make(*dims, dtype)
    assert mod.supports(_site(q, k, v, scale, causal)) is None
    out, lse = mod.IMPLS["attention"](q, k, v, scale, causal)
    ref_out, ref_lse = ops.attention_ref(q, k, v, scale, causal)
    with FakeTensorMode() as mode:  # the contract: the reference op's fake (strides included)
        fakes = torch.ops.difffuse.attention(*(mode.from_tensor(t) for t in (q, k, v)), scale, causal)
    for got, fake in zip((out, lse), fakes):
        assert (got.shape, got.stride(), got.dtype) == (fake.shape, fake.stride(), fake.dtype)
    assert_close(out, ref_out)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-5, atol=1e-5)
    torch.library.opcheck(mod.IMPLS["attention"], (q, k, v, scale, causal),
                          test_utils=("test_schema", "test_faketensor"))
    b, lq, lkv, h, d, dv = dims
    assert calls[0][1][0][0] == (b, lq, h, d)  # [B, L, H, D] in both vendor calls
    return calls[0][2]


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("name", list(CASES))
def test_rocm_attention_equals_reference(rocm_calls, name, dtype):
    """aiter.flash_attn_func with the site's scale (None: aiter's own D ** -0.5), causal flag
    and return_lse=True; out and lse equal the reference op."""
    consts = _check_against_reference(lowering("rocm"), rocm_calls, name, dtype)
    _, _, scale, causal = CASES[name]
    assert consts == {"dropout_p": 0.0, "softmax_scale": scale, "causal": causal, "return_lse": True}


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("name", [n for n in CASES if n != "odd_sizes_padded_head_dim"])  # that one has Dv < D
def test_npu_attention_equals_reference(npu_calls, name, dtype):
    """npu_fusion_attention on BSND with head_num = H, the scale always passed (the op's
    default is 1), causal = sparse_mode 2 + the 2048² mask; lse from softmax max and sum."""
    consts = _check_against_reference(lowering("npu"), npu_calls, name, dtype)
    _, (_, _, _, h, d, _), scale, causal = CASES[name]
    assert consts["head_num"] == h and consts["input_layout"] == "BSND" and consts["keep_prob"] == 1.0
    assert consts["scale"] == pytest.approx(1 / math.sqrt(d) if scale is None else scale)
    assert consts["inner_precise"] == 0
    mask = ((2048, 2048), torch.bool) if causal else None
    assert (consts["atten_mask"], consts["sparse_mode"]) == ((mask, 2) if causal else (None, 0))


def test_npu_value_head_dim_below_query(npu_calls):
    """Dk >= Dv is within npu_fusion_attention's limits (the one case above with Dv < D)."""
    _check_against_reference(lowering("npu"), npu_calls, "odd_sizes_padded_head_dim", torch.bfloat16)


# ====================================================================== refusals, with the reason
def _spec_site(q_shape, v_shape=None, dtype=torch.bfloat16, lkv=None, is_causal=False):
    b, h, lq, d = q_shape
    k_shape = (b, h, lkv or lq, d)
    v_shape = v_shape or k_shape
    q, k, v = (TensorSpec(s, torch.empty(s).stride(), dtype, "cpu") for s in (q_shape, k_shape, v_shape))
    return AttentionSite(q, k, v, None, is_causal, True, "test")


REFUSED = {  # name: (site, lowering -> reason substring, None = taken)
    "fp32": (_spec_site((1, 2, 8, 64), dtype=torch.float32), {"rocm": "fp16/bf16", "npu": None}),
    "fp64": (_spec_site((1, 2, 8, 64), dtype=torch.float64), {"rocm": "fp16/bf16", "npu": "fp16/bf16/fp32"}),
    "head_dim_264": (_spec_site((1, 2, 8, 264)), {"rocm": "at most 256", "npu": None}),
    "value_head_dim_320": (_spec_site((1, 2, 8, 64), v_shape=(1, 2, 8, 320)), {"rocm": "at most 256",
                                                                                "npu": "Dk >= Dv"}),
    "head_dim_776": (_spec_site((1, 2, 8, 776)), {"rocm": "at most 256", "npu": "1..768"}),
    "heads_257": (_spec_site((1, 257, 8, 64)), {"rocm": None, "npu": "1..256"}),
    "causal_lq_ne_lkv": (_spec_site((1, 2, 8, 64), lkv=5, is_causal=True), {"rocm": "bottom-right", "npu": None}),
    "zero_size": (_spec_site((0, 2, 8, 64)), {"rocm": "zero-size", "npu": "zero-size"}),
}


@pytest.mark.parametrize("name", list(REFUSED))
@pytest.mark.parametrize("which", ["rocm", "npu"])
def test_supports_states_the_kernel_limits(rocm_calls, npu_calls, which, name):
    site, expected = REFUSED[name]
    reason = lowering(which).supports(site)
    if expected[which] is None:
        assert reason is None, reason
    else:
        assert reason is not None and expected[which] in reason, reason


@pytest.mark.parametrize("which", ["rocm", "npu"])
def test_vendor_function_missing_is_a_reason(monkeypatch, which):
    """An aiter / torch_npu without the attention entry point: the site stays, with the reason."""
    calls: list = []
    modules = aiter_modules(calls) if which == "rocm" else npu_modules(calls)
    install(monkeypatch, modules, f"difffuse.lowering.{which}")
    reason = lowering(which).supports(_spec_site((1, 2, 8, 64)))
    assert reason is not None and ("flash_attn_func" if which == "rocm" else "npu_fusion_attention") in reason


# ====================================================================== compiled graphs
class SelfAttention(nn.Module):
    """diffusers' shape of an attention block: [B, L, H, D] projections seen as [B, H, L, D]."""

    def __init__(self, dim=64, heads=4, dtype=torch.bfloat16):
        super().__init__()
        self.heads = heads
        self.qkv, self.out = nn.Linear(dim, 3 * dim, dtype=dtype), nn.Linear(dim, dim, dtype=dtype)

    def forward(self, x):
        q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in self.qkv(x).chunk(3, -1))
        return self.out(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2))


VENDOR_CALL = {"rocm": "flash_attn_func", "npu": "npu_fusion_attention"}


@pytest.mark.parametrize("which", ["rocm", "npu"])
def test_compiled_block_routes_sdpa_to_the_vendor_call(rocm_calls, npu_calls, which):
    """torch.compile(backend="difffuse") with the attention family on: the SDPA call becomes
    the vendor op (opaque to Inductor), and the output equals eager."""
    torch.manual_seed(0)
    m, x = SelfAttention().eval(), torch.randn(2, 24, 64, dtype=torch.bfloat16)
    calls = rocm_calls if which == "rocm" else npu_calls
    out, rep = compile_and_run(m, x, options={"lowering": which, "patterns": list(NAMES)})
    assert rep.matches() == {"attention": 1} and rep.misses == [], str(rep)
    assert [c[0] for c in calls] == [VENDOR_CALL[which]]
    with torch.no_grad():
        assert_close(out, m(x))


@pytest.mark.parametrize("which", ["rocm", "npu"])
def test_compiled_ring_merge_reads_the_vendor_lse(rocm_calls, npu_calls, which):
    """Both shard calls rewritten; the merge by their lse equals attention over all keys."""
    torch.manual_seed(0)
    q, k, v = blhd(1, 12, 16, 2, 32, 32, torch.bfloat16)
    calls = rocm_calls if which == "rocm" else npu_calls
    out, rep = compile_and_run(ring_attention_cpu, q, k, v, options={"lowering": which, "patterns": list(NAMES), "inductor": False})
    assert rep.matches("attention") == 2 and rep.misses == [], str(rep)
    assert [c[0] for c in calls] == [VENDOR_CALL[which]] * 2
    assert_close(out, F.scaled_dot_product_attention(q.float(), k.float(), v.float()), dtype=torch.bfloat16)
