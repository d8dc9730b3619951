"""Stand-in vendor packages for testing the NPU and ROCm lowerings without the hardware.

`npu_modules(calls)` gives `sys.modules` entries for `sgl_kernel_npu` (with
`norm.rmsnorm_split` and `norm.scale_shift`) and `torch_npu`; `aiter_modules(calls)` the
entry for `aiter` (amd-aiter). With `attention=True` they also carry the attention entry
points, `torch_npu.npu_fusion_attention` and `aiter.flash_attn_func`; without, they are
packages that lack them (the lowering then reports attention as unavailable, with the reason).

Each stand-in function has the upstream signature (names, defaults, keyword-only arguments
where upstream's order differs between releases: an unknown keyword is a TypeError),
ENFORCES with `assert` what the real kernel asserts or silently assumes (dtypes, 3-D
contiguous inputs, `scale.numel() in {1, D}`, `scale_constant` ignored with a small shift,
`npu_rotary_mul`'s layout and size limits, aiter's 2-D / dtype / contiguity checks, the CK
and op-plugin attention checks; the upstream sources are cited in difffuse/lowering/npu.py
and rocm.py and in the docstrings here), computes the math in PyTorch on the CPU, returns
what upstream returns in its layout, and appends `(function name, [(shape, dtype) or value
per argument], {constants})` to `calls` so a test can assert exactly which vendor call was
made with what.

Use:

    calls = []
    install(monkeypatch, npu_modules(calls), "difffuse.lowering.npu")  # pytest's monkeypatch
    ...compile with options={"lowering": "npu"}..., then assert on `calls`

`install` puts the entries into `sys.modules` (an entry of None makes `import name` raise
ImportError: the package is absent), drops the lowering module so it imports afresh against
them, and clears the once-per-package warning set. These are contract tests: they check the
calls against the documented kernels, not the kernels themselves.
"""
from __future__ import annotations

import importlib.machinery
import sys
import types

import torch
import torch.nn.functional as F

HALF = (torch.float16, torch.bfloat16)
FLOATS = (*HALF, torch.float32)


def _sig(args):
    return [(tuple(a.shape), a.dtype) if isinstance(a, torch.Tensor) else a for a in args]


def _module(name: str) -> types.ModuleType:
    mod = types.ModuleType(name)
    mod.__spec__ = importlib.machinery.ModuleSpec(name, None)
    return mod


def install(monkeypatch, modules: dict, lowering_module: str) -> None:
    """Install stand-ins (None = the package is absent) with pytest's `monkeypatch` (undone
    after the test) and make `lowering_module` (e.g. "difffuse.lowering.npu") import afresh."""
    import difffuse.lowering as lowering

    for name, mod in modules.items():
        monkeypatch.setitem(sys.modules, name, mod)
    monkeypatch.delitem(sys.modules, lowering_module, raising=False)
    monkeypatch.setattr(lowering, "_warned", set())


# ====================================================================== NPU
def npu_modules(calls: list, attention: bool = False) -> dict:
    """sys.modules entries for sgl_kernel_npu (+ norm.rmsnorm_split, norm.scale_shift) and
    torch_npu (npu_rotary_mul; with `attention`, npu_fusion_attention too)."""

    def fused_variance(x):
        B, L, C = x.shape[0], x.shape[1], x.shape[2]  # upstream reads exactly these
        assert x.dim() == 3, "fused_variance reads x as [B, L, C]"
        assert x.is_contiguous(), "fused_variance indexes x as contiguous rows"
        calls.append(("fused_variance", _sig([x]), {}))
        return x.pow(2).mean(-1, keepdim=True).to(x.dtype)  # no upcast: x's dtype

    def fused_rsqrt_mul(x, variance, weight, eps=1e-6):
        B, L, C = x.shape[0], x.shape[1], x.shape[2]
        assert x.dim() == 3 and x.is_contiguous(), "fused_rsqrt_mul reads x as contiguous [B, L, C]"
        assert variance.numel() == B * L and variance.is_contiguous(), "one variance per row"
        assert weight is not None and weight.numel() == C and weight.is_contiguous(), "weight: C values"
        calls.append(("fused_rsqrt_mul", _sig([x, variance, weight]), {"eps": eps}))
        y = x * torch.rsqrt(variance.reshape(B, L, 1) + eps) * weight.reshape(C)
        return y.to(x.dtype)  # empty_like(x)

    def fused_scale_shift(x, scale, shift, scale_constant=1.0):
        num_tokens, hidden = x.shape[0] * x.shape[1], x.shape[2]
        assert x.dim() == 3 and x.is_contiguous(), "fused_scale_shift indexes x as contiguous [B, L, D]"
        scale, shift = scale.view(-1), shift.view(-1)  # upstream: view, not reshape
        assert scale.numel() in (1, hidden), f"Scale size must be 1 or {hidden}, got {scale.numel()}"
        assert shift.numel() in (1, hidden, num_tokens * hidden), f"bad shift size {shift.numel()}"
        calls.append(("fused_scale_shift", _sig([x, scale, shift]), {"scale_constant": scale_constant}))
        if shift.numel() == num_tokens * hidden:  # kernel 2: reads D scale values
            assert scale.numel() == hidden, "scalar scale with a full shift: the real kernel reads out of bounds"
            y = x * (scale_constant + scale) + shift.view(x.shape).float()
        else:  # kernel 1: scale_constant is ignored, 1.0 is used
            y = x * (1.0 + scale) + shift.float()
        return y.to(x.dtype)

    def npu_rotary_mul(x, r1, r2, rotary_mode="half"):
        assert x.dim() == 4 and r1.dim() == 4 and r2.dim() == 4, "npu_rotary_mul takes 4-d tensors"
        assert x.dtype in FLOATS and r1.dtype in FLOATS and r2.dtype in FLOATS
        B, S, N, D = x.shape  # the BSND layout the lowering passes
        assert D % 2 == 0 and D < 896, "D even and < 896"
        assert r1.shape == r2.shape
        if rotary_mode == "half":
            assert B < 1000 and N < 1000
            assert tuple(r1.shape) in ((1, S, 1, D), (B, S, 1, D), (B, S, N, D)), r1.shape
            x1, x2 = x.chunk(2, -1)
            rot = torch.cat([-x2, x1], -1)
        else:
            assert rotary_mode == "interleave", rotary_mode
            assert B * N < 1000 and tuple(r1.shape) == (1, S, 1, D), (B, N, r1.shape)
            rot = torch.stack([-x[..., 1::2], x[..., 0::2]], -1).flatten(-2)
        calls.append(("npu_rotary_mul", _sig([x, r1, r2]), {"rotary_mode": rotary_mode}))
        return (r1 * x + r2 * rot).to(x.dtype)

    sgl, norm = _module("sgl_kernel_npu"), _module("sgl_kernel_npu.norm")
    rs, ss = _module("sgl_kernel_npu.norm.rmsnorm_split"), _module("sgl_kernel_npu.norm.scale_shift")
    tnpu = _module("torch_npu")
    rs.fused_variance, rs.fused_rsqrt_mul = fused_variance, fused_rsqrt_mul
    ss.fused_scale_shift = fused_scale_shift
    tnpu.npu_rotary_mul = npu_rotary_mul
    if attention:
        tnpu.npu_fusion_attention = fusion_attention_stand_in(calls)
    sgl.norm, norm.rmsnorm_split, norm.scale_shift = norm, rs, ss
    return {"sgl_kernel_npu": sgl, "sgl_kernel_npu.norm": norm, "sgl_kernel_npu.norm.rmsnorm_split": rs,
            "sgl_kernel_npu.norm.scale_shift": ss, "torch_npu": tnpu}


# ====================================================================== ROCm
def aiter_modules(calls: list, attention: bool = False) -> dict:
    """sys.modules entry for aiter (amd-aiter): rmsnorm2d_fwd, rmsnorm2d_fwd_with_add; with
    `attention`, flash_attn_func too."""

    def _check(x, weight):
        assert x.dim() == 2, "rmsnorm2d: 2-d input"
        assert x.dtype in FLOATS, f"fp16/bf16/fp32 only, got {x.dtype}"
        assert weight.dtype == x.dtype, "weight dtype must match input"
        assert x.is_contiguous() and weight.is_contiguous(), "contiguous only"
        assert weight.shape[-1] == x.shape[-1], "weight length != hidden"

    def _rms(x, weight, eps):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.float()).to(x.dtype)

    def rmsnorm2d_fwd(input, weight, epsilon, use_model_sensitive_rmsnorm=0):
        _check(input, weight)
        calls.append(("rmsnorm2d_fwd", _sig([input, weight]), {"epsilon": epsilon}))
        return _rms(input, weight, epsilon)

    # trailing arguments keyword-only: their order differs between releases
    def rmsnorm2d_fwd_with_add(out, input, residual_in, residual_out, weight, epsilon, *, gemma_norm=False,
                               use_model_sensitive_rmsnorm=0):
        _check(input, weight)
        for t in (out, residual_in, residual_out):
            assert t.dtype == input.dtype and t.is_contiguous() and t.shape == input.shape, "bad out/residual"
        calls.append(("rmsnorm2d_fwd_with_add", _sig([out, input, residual_in, residual_out, weight]),
                      {"epsilon": epsilon}))
        residual_out.copy_((input.float() + residual_in.float()).to(input.dtype))
        out.copy_(_rms(residual_out, weight, epsilon))
        return None

    aiter = _module("aiter")
    aiter.rmsnorm2d_fwd, aiter.rmsnorm2d_fwd_with_add = rmsnorm2d_fwd, rmsnorm2d_fwd_with_add
    if attention:
        aiter.flash_attn_func = flash_attn_stand_in(calls)
    return {"aiter": aiter}


# ====================================================================== attention
def _scores(q, k, v, scale, keep=None):
    """fp32 scale * q k^T over [B, H, L, D] (masked to -inf where keep is False), its row lse
    and softmax @ v: the math both attention stand-ins compute."""
    s = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    if keep is not None:
        s = s.masked_fill(~keep, float("-inf"))
    return s, torch.logsumexp(s, -1), torch.matmul(torch.softmax(s, -1), v.float())


def flash_attn_stand_in(calls: list):
    """aiter.flash_attn_func (ROCm/aiter main e404860 `aiter/ops/mha.py`; CK checks from
    `csrc/py_itfs_ck/mha_fwd_kernels.cu`): the Python wrapper's padding of D and Dv to
    multiples of 8 and copies of inputs with a strided last dim, then the CK entry point's
    checks; returns a sliced `out` when the head dim was padded, and the fp32 lse."""

    def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1, 0),
                        bias=None, alibi_slopes=None, deterministic=True, return_lse=False, return_attn_probs=False,
                        how_v3_bf16_cvt=1, cu_seqlens_q=None, cu_seqlens_kv=None, sink_ptr=None, num_splits=0):
        calls.append(("flash_attn_func", _sig([q, k, v]), {"dropout_p": dropout_p, "softmax_scale": softmax_scale,
                                                           "causal": causal, "return_lse": return_lse}))
        assert dropout_p == 0.0 and bias is None and alibi_slopes is None and tuple(window_size[:2]) == (-1, -1), \
            "the stand-in computes plain attention only"
        # the Python wrapper: default scale from the unpadded D, pad D and Dv to multiples of 8,
        # copy inputs whose last dim is strided
        scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
        dv_og = v.size(3)
        if q.size(3) % 8:
            q, k = (F.pad(t, [0, 8 - q.size(3) % 8]) for t in (q, k))
        if v.size(3) % 8:
            v = F.pad(v, [0, 8 - v.size(3) % 8])
        q, k, v = (t.contiguous() if t.stride(-1) != 1 else t for t in (q, k, v))
        # the CK entry point's checks
        assert q.dtype in HALF, "FlashAttention only support fp16, bf16 and fp8_e4m3 data type"
        assert k.dtype == q.dtype and v.dtype == q.dtype, "query, key and value must have the same dtype"
        assert all(t.stride(-1) == 1 for t in (q, k, v)), "Input tensor must have contiguous last dimension"
        b, lq, h, d = q.shape
        lk, hk, dv = k.size(1), k.size(2), v.size(3)
        assert b > 0, "batch size must be positive"
        assert d <= 256 and dv <= 256, "CK only supports head dimension at most 256"
        assert d % 8 == 0 and dv % 8 == 0, "head sizes must be multiples of 8"
        assert h % hk == 0, "Number of heads in key/value must divide number of heads in query"
        assert tuple(k.shape) == (b, lk, hk, d) and tuple(v.shape) == (b, lk, hk, dv), "bad k/v shape"
        assert h == hk, "the stand-in has no grouped-query attention"
        # bottom-right causal mask: key j is kept for query i when j <= i + lk - lq
        keep = torch.ones(lq, lk, dtype=torch.bool).tril(lk - lq) if causal and lq > 1 else None
        _, lse, out = _scores(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale, keep)
        out_padded = out.transpose(1, 2).to(q.dtype).contiguous()  # new [B, Lq, H, Dv padded]
        result = [out_padded[..., :dv_og]]
        if return_lse:
            result.append(lse.contiguous())  # new fp32 [B, H, Lq]
        if return_attn_probs:
            result.append(torch.empty(0))
        return result[0] if len(result) == 1 else tuple(result)

    return flash_attn_func


def fusion_attention_stand_in(calls: list):
    """torch_npu.npu_fusion_attention (Ascend/op-plugin main 517f2e7: schema, the checks in
    FlashAttentionKernelNpuOpApi.cpp, the API reference's limits, the golden model's outputs):
    BSND inputs, causal as sparse modes 2/3 with the compressed 2048 x 2048 mask; returns the
    softmax max and sum 8 times over (not the lse)."""

    def npu_fusion_attention(query, key, value, head_num, input_layout, pse=None, padding_mask=None,
                             atten_mask=None, scale=1., keep_prob=1., pre_tockens=2147483647,
                             next_tockens=2147483647, inner_precise=0, prefix=None, actual_seq_qlen=None,
                             actual_seq_kvlen=None, sparse_mode=0, gen_mask_parallel=True, sync=False,
                             softmax_layout="", sink=None, dropout_mask=None, seed=0, offset=0):
        calls.append(("npu_fusion_attention", _sig([query, key, value]),
                      {"head_num": head_num, "input_layout": input_layout, "scale": scale, "keep_prob": keep_prob,
                       "inner_precise": inner_precise, "sparse_mode": sparse_mode,
                       "atten_mask": None if atten_mask is None else (tuple(atten_mask.shape), atten_mask.dtype)}))
        # the op's own checks
        assert head_num > 0, "head_num must > 0"
        assert all(t.dim() in (3, 4) for t in (query, key, value)), "3 or 4 dimensional inputs"
        assert 0 < keep_prob <= 1, "The keep_prob value must be in range of (0, 1]"
        assert input_layout.upper() in ("BSH", "SBH", "BNSD", "BSND", "TND"), "bad input_layout"
        assert 0 <= sparse_mode <= 6, "The sparse_mode value must be in range of [0,6]"
        assert softmax_layout == "", "softmax_layout=TND only with input_layout=TND"
        assert keep_prob == 1 and pse is None and sink is None and prefix is None, "stand-in: plain attention"
        assert input_layout == "BSND", "stand-in: the BSND layout the lowering passes"
        # the API reference's limits
        assert query.dtype in FLOATS and key.dtype == query.dtype and value.dtype == query.dtype, "dtypes"
        b, sq, n, d = query.shape
        _, skv, nkv, dv = value.shape
        assert n == head_num, "BSND query's N must be head_num"
        assert key.shape[:3] == value.shape[:3] and key.shape[0] == b, "key/value shapes equal except D"
        assert key.shape[3] == d and d >= dv and 1 <= d <= 768, "Dq == Dk >= Dv, D in 1..768"
        assert 1 <= n <= 256 and n % nkv == 0 and nkv == n, "N in 1..256 (no grouped-query in the stand-in)"
        assert all(t.is_contiguous() for t in (query, key, value)), "stand-in: dense BSND inputs"
        keep = None
        if atten_mask is not None:  # True = masked out
            assert sparse_mode in (2, 3), "stand-in: the causal sparse modes only"
            assert atten_mask.dtype == torch.bool and tuple(atten_mask.shape) == (2048, 2048), \
                "sparse modes 2/3 read the compressed 2048 x 2048 mask"
            assert torch.equal(atten_mask, torch.ones(2048, 2048, dtype=torch.bool).triu(1)), "not the causal mask"
            keep = torch.ones(sq, skv, dtype=torch.bool).tril(0 if sparse_mode == 2 else skv - sq)
        s, _, out = _scores(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), scale, keep)
        m = s.amax(-1, keepdim=True)
        total = torch.exp(s - m).sum(-1, keepdim=True)
        eight = (b, n, sq, 8)
        return (out.transpose(1, 2).to(query.dtype).contiguous(),  # new [B, Sq, N, Dv]
                m.expand(eight).contiguous(), total.expand(eight).contiguous(),
                torch.empty(0, dtype=query.dtype), 0, 0, 0)

    return npu_fusion_attention
