"""The attention family: SDPA aten nodes -> difffuse::attention, on CPU.

Per tiny model, the attention calls rewritten and left (with their reason) as a function
of num_layers; the op's reference against F.scaled_dot_product_attention and its
logsumexp against a float64 one; near-misses that must stay (mask, causal with Lq != Lkv,
dropout, grouped-query heads, a logsumexp the op does not give); the CUDA spellings of
the SDPA node (flash, cuDNN, efficient), whose aten ops have no CPU kernel, run here only
because the reference lowering rewrites them; the ring-attention merge that reads lse;
dynamic shapes without a recompile; zero-size calls."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import difffuse
from conftest import compile_and_run as _compile_and_run

from difffuse.families import NAMES

ALL = list(NAMES)  # every family (attention is one of the defaults)


def compile_and_run(module, *args, options=None, **kwargs):
    return _compile_and_run(module, *args, options={"patterns": ALL, **(options or {})}, **kwargs)
from difffuse.lowering import ops
from difffuse.testing.expected import attention_calls

aten = torch.ops.aten
LAYERS = 2
MASKED = "an attention mask"


def _builders():
    from difffuse.testing.tiny_dits import DITS
    from difffuse.testing.tiny_models import MODELS

    out = {**MODELS, **DITS}

    def qwen_nomask(**kw):
        model, kwargs = DITS["qwen-image-tiny"](**kw)
        kwargs["encoder_hidden_states_mask"] = None
        return model, kwargs

    out["qwen-image-nomask-tiny"] = qwen_nomask
    return out


MODEL_NAMES = ["wan-t2v-tiny", "wan-i2v-tiny", "wan-ti2v-tiny", "flux-tiny", "qwen-image-tiny",
               "qwen-image-nomask-tiny", "hunyuan-video-tiny", "ltx-video-tiny", "cogvideox-tiny"]


@pytest.fixture(scope="module", params=MODEL_NAMES)
def model_case(request):
    pytest.importorskip("diffusers")
    name = request.param
    model, kwargs = _builders()[name](num_layers=LAYERS)
    with torch.no_grad():
        ref = model(**kwargs)[0]
    out, rep = compile_and_run(model, **kwargs)
    return name, ref, out[0], rep


def test_model_attention_counts(model_case):
    name, _, _, rep = model_case
    rewritten, left = attention_calls(name, LAYERS)
    assert rep.matches("attention") == rewritten, str(rep)
    misses = [m for m in rep.misses if m.family == "attention"]
    assert len(misses) == left and all(MASKED in m.reason for m in misses), [m.reason for m in misses]
    assert all(m.module.endswith(("attn", "attn1", "attn2")) for m in misses), [m.module for m in misses]


def test_model_close_to_eager(model_case):
    _, ref, out, _ = model_case
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------ the op
SHAPES = [  # (B, H, Lq, Lkv, D, Dv)
    (2, 3, 16, 16, 8, 8), (1, 2, 5, 7, 5, 3), (3, 1, 1, 9, 16, 16), (1, 4, 33, 17, 12, 12)]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("causal,scale", [(False, None), (False, 0.3), (True, None)])
def test_reference_op_is_sdpa_with_float64_lse(shape, causal, scale):
    b, h, lq, lkv, d, dv = shape
    if causal:
        lkv = lq
    q, k, v = torch.randn(b, h, lq, d), torch.randn(b, h, lkv, d), torch.randn(b, h, lkv, dv)
    out, lse = torch.ops.difffuse.attention(q, k, v, scale, causal)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale),
                               rtol=1e-5, atol=1e-5)
    s = (q.double() @ k.double().transpose(-1, -2)) * (d ** -0.5 if scale is None else scale)
    if causal:
        s = s.masked_fill(~torch.ones(lq, lkv, dtype=torch.bool).tril(), float("-inf"))
    assert lse.dtype == torch.float32 and lse.shape == (b, h, lq)
    torch.testing.assert_close(lse.double(), torch.logsumexp(s, -1), rtol=1e-6, atol=1e-5)
    assert out.stride() == out.transpose(1, 2).contiguous().transpose(1, 2).stride()  # [B, L, H, D] memory


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reference_op_half_precision(dtype):
    q, k, v = (torch.randn(1, 2, 9, 16, dtype=dtype) for _ in range(3))
    out, lse = torch.ops.difffuse.attention(q, k, v, None, False)
    assert out.dtype == dtype and lse.dtype == torch.float32
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
    torch.testing.assert_close(out.float(), ref, rtol=1e-2, atol=1e-2)


def test_op_fake_and_real_agree():
    """Schema, fake impl (strides included) and the real impl, checked by torch.library."""
    q, k, v = torch.randn(2, 3, 7, 5), torch.randn(2, 3, 4, 5), torch.randn(2, 3, 4, 6)
    torch.library.opcheck(torch.ops.difffuse.attention.default, (q, k, v, 0.5, False),
                          test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(torch.ops.difffuse.attention.default, (q, k, k, None, True),
                          test_utils=("test_schema", "test_faketensor"))


# ------------------------------------------------------------------ graphs: rewritten
def bhld(*shape):
    return torch.randn(*shape)


def blhd_views(b=2, lq=10, lkv=10, h=3, d=8):
    """diffusers' form: [B, H, L, D] views of [B, L, H, D] memory."""
    return (torch.randn(b, lq, h, d).transpose(1, 2), torch.randn(b, lkv, h, d).transpose(1, 2),
            torch.randn(b, lkv, h, d).transpose(1, 2))


CASES = {
    # name: (fn, args) — each must be rewritten (1 match) and equal F.sdpa
    "contiguous_bhld": (lambda q, k, v: F.scaled_dot_product_attention(q, k, v) * 2,
                        (bhld(2, 3, 10, 8), bhld(2, 3, 6, 8), bhld(2, 3, 6, 8))),
    "blhd_views_flattened": (lambda q, k, v: F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2),
                             blhd_views()),
    "causal_square": (lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True), blhd_views()),
    "scale_passed_on": (lambda q, k, v: F.scaled_dot_product_attention(q, k, v, scale=0.3), blhd_views(lkv=4)),
    "hand_written_softmax": (lambda q, k, v: torch.softmax(q @ k.transpose(-1, -2) * 0.25, -1) @ v,
                             (bhld(2, 3, 10, 8), bhld(2, 3, 6, 8), bhld(2, 3, 6, 8))),
    "odd_sizes": (lambda q, k, v: F.scaled_dot_product_attention(q, k, v),
                  (bhld(1, 1, 3, 5), bhld(1, 1, 7, 5), bhld(1, 1, 7, 5))),
}
EAGER = {  # what each case computes, in eager SDPA
    "hand_written_softmax": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, scale=0.25),
}


@pytest.mark.parametrize("name", list(CASES))
def test_rewritten_and_equal(name):
    fn, args = CASES[name]
    out, rep = compile_and_run(fn, *args)
    assert rep.matches() == {"attention": 1} and rep.misses == [], str(rep)
    torch.testing.assert_close(out, EAGER.get(name, fn)(*args), rtol=1e-5, atol=1e-5)
    assert out.stride() == fn(*args).stride()  # the node's layout, which later views rely on


def _sdpa_and_lse(q, k, v):
    out = F.scaled_dot_product_attention(q, k, v)
    s = (q.double() @ k.double().transpose(-1, -2)) * q.shape[-1] ** -0.5
    return out, torch.logsumexp(s, -1).float()


@pytest.mark.parametrize("spelling", ["cpu", "flash", "cudnn"])
def test_lse_read_in_node_layout(spelling):
    """A read logsumexp is the op's, in the node's shape and layout (CPU: [B, H, Lq] over
    [B, Lq, H] memory; cuDNN: [B, H, Lq, 1]). The CUDA ops have no CPU kernel: this runs
    only because they were rewritten."""
    call = {"cpu": lambda q, k, v: aten._scaled_dot_product_flash_attention_for_cpu(q, k, v),
            "flash": lambda q, k, v: aten._scaled_dot_product_flash_attention(q, k, v)[:2],
            "cudnn": lambda q, k, v: aten._scaled_dot_product_cudnn_attention(q, k, v, None, True)[:2]}[spelling]

    def fn(q, k, v):
        out, lse = call(q, k, v)
        return out + 1, lse * 2

    args = blhd_views(lq=9, lkv=5)
    (out, lse), rep = compile_and_run(fn, *args)
    assert rep.matches() == {"attention": 1} and rep.misses == [], str(rep)
    ref_out, ref_lse = _sdpa_and_lse(*args)
    torch.testing.assert_close(out, ref_out + 1, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse.reshape(ref_lse.shape), ref_lse * 2, rtol=1e-5, atol=1e-5)
    if spelling == "cpu":
        assert lse.stride() == fn(*args)[1].stride()


def test_efficient_attention_output_only():
    fn = lambda q, k, v: aten._scaled_dot_product_efficient_attention(q, k, v, None, False)[0]  # noqa: E731
    args = blhd_views()
    out, rep = compile_and_run(fn, *args)
    assert rep.matches() == {"attention": 1}, str(rep)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(*args), rtol=1e-5, atol=1e-5)


def test_ring_attention_merge_reads_lse():
    """diffusers' ring attention merges per-shard partial results by their logsumexp:
    out = prev - sigmoid(lse - prev_lse) * (prev - out), lse = prev_lse - logsigmoid(prev_lse - lse).
    Both shard calls are rewritten and the merge equals attention over all keys."""
    from difffuse.testing.distributed import ring_attention_cpu

    args = blhd_views(lq=12, lkv=16)
    out, rep = compile_and_run(ring_attention_cpu, *args)
    assert rep.matches("attention") == 2 and rep.misses == [], str(rep)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(*args), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ graphs: left, with the reason
def _dropout(q, k, v):
    return aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.5)[0]


NEAR_MISSES = {
    "mask": (lambda q, k, v: F.scaled_dot_product_attention(
        q, k, v, attn_mask=torch.ones(10, 10, dtype=torch.bool).tril()), blhd_views(), MASKED),
    "causal_lq_ne_lkv": (lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True),
                         blhd_views(lq=10, lkv=6), "top-left"),
    "enable_gqa": (lambda q, k, v: F.scaled_dot_product_attention(q, k[:, :1], v[:, :1], enable_gqa=True),
                   blhd_views(), "grouped-query"),
    "efficient_padded_lse": (lambda q, k, v: aten._scaled_dot_product_efficient_attention(q, k, v, None, True)[1],
                             blhd_views(), "logsumexp of shape"),
    "cudnn_lse_not_computed": (lambda q, k, v: aten._scaled_dot_product_cudnn_attention(q, k, v, None, False)[1],
                               blhd_views(), "was not asked to compute"),
}


@pytest.mark.parametrize("name", list(NEAR_MISSES))
def test_near_miss_left_with_reason(name):
    fn, args, words = NEAR_MISSES[name]
    torch._dynamo.reset()
    difffuse.reset_report()
    compiled = torch.compile(fn, backend="difffuse", options={"lowering": "reference", "patterns": ALL})
    with torch.no_grad():
        try:
            out = compiled(*args)
        except (RuntimeError, NotImplementedError):  # a CUDA-only op left in place cannot run on a CPU
            out = None
    rep = difffuse.report()
    assert rep.matches() == {}, str(rep)
    assert [m.family for m in rep.misses] == ["attention"] and words in rep.misses[0].reason, str(rep)
    if out is not None and "cuda" not in name and "efficient" not in name:
        torch.testing.assert_close(out, fn(*args), rtol=1e-5, atol=1e-5)


def test_dropout_left_with_reason():
    """dropout_p > 0 (only reachable by calling the aten op: F.sdpa under no_grad picks the
    math path on a CPU). The CPU kernel then refuses dropout at run time, as in eager."""
    torch._dynamo.reset()
    difffuse.reset_report()
    compiled = torch.compile(_dropout, backend="difffuse", options={"lowering": "reference", "patterns": ALL})
    with torch.no_grad(), pytest.raises(RuntimeError, match="dropout"):
        compiled(*blhd_views())
    rep = difffuse.report()
    assert rep.matches() == {} and "dropout_p=0.5" in rep.misses[0].reason, str(rep)


@pytest.mark.parametrize("shape", [(1, 2, 0, 8), (0, 2, 4, 8)])
def test_zero_size_left_to_inductor(shape):
    """F.sdpa routes empty inputs to its math path on a CPU (no SDPA node); an aten SDPA op
    called on them directly is a site with a zero-size operand: left, with the reason. (The
    CUDA flash spelling is used because, left in place, it cannot run here: the CPU op
    itself dies of SIGFPE on empty inputs, torch 2.13.)"""
    args = (torch.randn(*shape), torch.randn(shape[0], 2, 4, 8), torch.randn(shape[0], 2, 4, 8))
    torch._dynamo.reset()
    difffuse.reset_report()
    compiled = torch.compile(lambda q, k, v: aten._scaled_dot_product_flash_attention(q, k, v)[0],
                             backend="difffuse", options={"lowering": "reference", "patterns": ALL})
    with torch.no_grad(), pytest.raises(NotImplementedError):
        compiled(*args)
    rep = difffuse.report()
    assert rep.matches() == {} and len(rep.misses) == 1 and "zero-size" in rep.misses[0].reason, str(rep)


def test_cuda_lowering_leaves_cpu_attention_with_reason():
    """The CUDA lowering's flash kernels take CUDA tensors only: a CPU call stays, reported."""
    pytest.importorskip("triton")
    out, rep = compile_and_run(lambda q, k, v: F.scaled_dot_product_attention(q, k, v), *blhd_views(),
                               options={"lowering": "cuda"})
    assert rep.matches() == {}, str(rep)
    assert [m.reason for m in rep.misses] == ["cuda lowering does not take it: q on cpu: the flash kernels need CUDA tensors"], \
        str(rep)


# ------------------------------------------------------------------ dynamic shapes
def test_dynamic_shapes_no_recompile():
    fn = lambda q, k, v: F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)  # noqa: E731
    torch._dynamo.reset()
    difffuse.reset_report()
    compiled = torch.compile(fn, backend="difffuse", options={"lowering": "reference", "patterns": ALL}, dynamic=True)
    with torch.no_grad():
        for b, lq, lkv in [(2, 10, 7), (3, 17, 5), (4, 6, 12)]:  # b = 1 would specialize
            args = blhd_views(b=b, lq=lq, lkv=lkv)
            torch.testing.assert_close(compiled(*args), fn(*args), rtol=1e-5, atol=1e-5)
    rep = difffuse.report()
    assert len(rep.graphs) == 1 and rep.matches() == {"attention": 1}, str(rep)


def test_reference_lowering_takes_every_exact_site():
    from difffuse.lowering import reference
    from difffuse.lowering.sites import AttentionSite, TensorSpec

    q = TensorSpec.of(torch.randn(1, 2, 3, 4))
    assert reference.supports(AttentionSite(q, q, q, None, False, True, "x")) is None
    assert reference.IMPLS["attention"] is torch.ops.difffuse.attention.default
    assert ops.REFERENCE["attention"] is torch.ops.difffuse.attention.default


def test_report_names_the_kernels_that_run():
    """Each graph with rewrites notes what runs per family (which attention kernel, Triton
    or the JIT qk kernel on CUDA); here the reference ops."""
    w = torch.randn(8)
    out, rep = compile_and_run(lambda q, k, v: (F.scaled_dot_product_attention(q, k, v),
                                                F.rms_norm(q, (8,), w, 1e-6)), *blhd_views())
    notes = [n for g in rep.graphs for n in g.notes]
    assert "kernels: attention -> difffuse::attention x1, rms_norm -> difffuse::rms_norm x1" in notes, notes
