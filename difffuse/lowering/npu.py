"""The Ascend NPU lowering: sgl_kernel_npu's Triton-Ascend kernels and torch_npu's rotary and
fused-attention ops.

Upstream calls, as read from the sources (checked against sgl-project/sgl-kernel-npu
f425bdf, python/sgl_kernel_npu/sgl_kernel_npu/norm/{rmsnorm_split,scale_shift}.py, last
changed 5b76b29; torch_npu API reference 7.0.0, `torch_npu.npu_rotary_mul`):

- ``rmsnorm_split.fused_variance(x)``: x ``[B, L, C]`` contiguous -> ``mean(x*x, -1)`` as
  ``[B, L, 1]`` in x's dtype (no upcast, so we pass fp32, as sglang does).
- ``rmsnorm_split.fused_rsqrt_mul(x, variance, weight, eps=1e-6)``: x ``[B, L, C]``,
  variance with B*L elements, weight with C elements -> ``x * rsqrt(variance + eps) *
  weight`` in x's dtype (``empty_like(x)``). A weight is required: no weight = ones.
- ``scale_shift.fused_scale_shift(x, scale, shift, scale_constant=1.0)``: x contiguous
  ``[B, L, D]``; asserts ``scale.numel() in {1, D}`` and ``shift.numel() in {1, D, B*L*D}``.
  Full-size shift: ``x * (scale_constant + scale) + shift`` (scale read as D values, so a
  scalar scale reads out of bounds); otherwise ``x * (1 + scale) + shift`` and
  ``scale_constant`` is ignored. Loads x and scale in their dtypes, shift as fp32, stores
  x's dtype: with an fp32 scale the arithmetic is fp32.
- ``torch_npu.npu_rotary_mul(x, r1, r2, rotary_mode)``: 4-D, ``out = r1*x + r2*rotate(x)``
  elementwise over the full D (half: ``rotate(x) = cat(-x2, x1)``; interleave:
  ``rotate(x) = stack(-x[1::2], x[0::2]).flatten(-2)``, so out[2i] = r1[2i]*x[2i] -
  r2[2i]*x[2i+1] and out[2i+1] = r1[2i+1]*x[2i+1] + r2[2i+1]*x[2i]: every element reads
  its own r1/r2 entry, which is the op's ``full_tables`` reading with r1 = cos, r2 = sin;
  the half-table reading is r1 = cos[2i] and r2 = sin[2i+1] repeated per pair);
  fp16/bf16/fp32; D even and < 896; half: B, N < 1000, r1/r2 ``1S1D``/``BS1D``/``BSND`` for
  a BSND x; interleave: B*N < 1000, r1/r2 ``1S1D``. The API reference also states r1/r2
  values in [-1, 1] (true of cos/sin tables; values cannot be checked at compile time).

Attention, as read from Ascend/op-plugin (torch_npu's operator sources; main 517f2e7,
2026-08-21): the schema in `op_plugin/config/op_plugin_functions.yaml`, the checks and output
shapes in `op_plugin/ops/opapi/FlashAttentionKernelNpuOpApi.cpp`, the meta function in
`op_plugin/python/meta/_meta_registrations.py`, the API reference
`docs/zh/custom_APIs/torch_npu/torch_npu-npu_fusion_attention.md` and the golden model in
`test/test_custom_ops/test_npu_flash_attention.py`; limits cross-checked with CANN 8.5.0's
`aclnnFlashAttentionScoreV2` reference:

- ``torch_npu.npu_fusion_attention(query, key, value, head_num, input_layout, pse=None,
  padding_mask=None, atten_mask=None, scale=1., keep_prob=1., pre_tockens=2147483647,
  next_tockens=2147483647, inner_precise=0, prefix=None, actual_seq_qlen=None,
  actual_seq_kvlen=None, sparse_mode=0, gen_mask_parallel=True, sync=False,
  softmax_layout="", sink=None, dropout_mask=None, seed=0, offset=0)`` returns
  ``(attention_out, softmax_max, softmax_sum, softmax_out, seed, offset, numels)``. Note
  ``scale`` defaults to 1, not 1/sqrt(D): we always pass it.
- ``input_layout="BSND"``: q ``[B, Sq, N, D]``, k/v ``[B, Skv, N, D|Dv]``; ``attention_out``
  is a new ``[B, Sq, N, Dv]`` tensor in q's dtype; ``softmax_max`` and ``softmax_sum`` are
  new fp32 ``[B, N, Sq, 8]`` tensors holding, 8 times over, the row max ``m`` of ``scale *
  q k^T`` and ``sum_j exp(s_j - m)``, so ``lse = softmax_max[..., 0] + log(softmax_sum[...,
  0])`` (natural log) exactly as the op defines it; ``softmax_out`` is empty.
- Limits (API reference, aclnn reference): fp16/bf16/fp32 (fp32 since CANN 8.0; diffusers'
  backend admits fp16/bf16 only), q/k/v of one dtype; D 1..768 with ``Dq == Dk >= Dv``;
  key/value shapes equal except D; N 1..256; B 1..2M; S 1..1M. The op checks ``head_num >
  0``, 3-/4-d operands, ``keep_prob`` in (0, 1] and ``sparse_mode`` in [0, 6] (non-varlen).
- Masks: with ``atten_mask=None`` the whole score matrix is computed (``sparse_mode``,
  ``pre_tockens``, ``next_tockens`` then have no effect). Causal: ``sparse_mode=2``
  (leftUpCausal, SDPA's top-left alignment) with the compressed mask the reference's
  example passes, ``triu(ones(2048, 2048, bool), 1)`` (True = masked out).
- ``inner_precise``: 0 (high precision in older releases; reserved now), as diffusers passes.
  The reference lists the op for training and not for graph mode / aclgraph capture.
- diffusers 0.42.1 (`models/attention_dispatch.py`, ``_native_npu_attention``) calls
  ``npu_fusion_attention(q, k, v, q.size(2), atten_mask=, input_layout="BSND", pse=None,
  scale=, pre_tockens=65536, next_tockens=65536, keep_prob=, sync=False,
  inner_precise=0)[0]`` on ``[B, S, N, D]`` tensors and refuses ``return_lse``.

We pass contiguous BSND tensors (the transpose of diffusers' ``[B, H, L, D]`` views is
already contiguous: no copy), take ``attention_out`` as the op's ``[B, Lq, H, Dv]`` memory
and convert the lse as above; ``supports`` states the limits.

Every vendor call is a ``difffuse::npu_*`` custom op (fake impl = shapes) so the pattern
replacement can be traced into the post-grad graph; the casts around it are ordinary aten
ops. Each family computes in fp32 and returns the op's ``out_dtype``, as the reference
ops in ``ops.py`` do; ``supports`` sends every site a kernel cannot do exactly back to
Inductor with the reason. Importing this module raises ImportError when torch_npu or
sgl_kernel_npu is missing, so ``load_lowering`` falls back with one WARNING.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from .sites import (AttentionSite, NormScaleShiftSite, QKNormRopeSite, RMSNormSite, RopeSite, RsqrtMulSite, ScaleShiftSite,
                    TensorSpec, VarianceSite, known, specs)

try:  # both are needed; sgl_kernel_npu itself imports torch_npu and loads its .so
    import sgl_kernel_npu  # noqa: F401
    import sgl_kernel_npu.norm.rmsnorm_split  # noqa: F401
    import sgl_kernel_npu.norm.scale_shift  # noqa: F401
    import torch_npu  # noqa: F401
except ImportError as exc:
    raise ImportError(f"torch_npu + sgl_kernel_npu (sgl-kernel-npu, built from source against CANN) "
                      f"are not importable: {exc}") from exc

FLOATS = (torch.float16, torch.bfloat16, torch.float32)


def _vendor(module: str, name: str):
    """The vendor function, looked up when called (the module is already imported)."""
    import importlib

    return getattr(importlib.import_module(module), name)


def _define(name: str, fn, fake):
    """`difffuse::<name>` as a custom op; defined once per process (re-imports reuse it)."""
    if not hasattr(torch.ops.difffuse, name):
        op = torch.library.custom_op(f"difffuse::{name}", mutates_args=())(fn)
        op.register_fake(fake)
    return getattr(torch.ops.difffuse, name).default


# ------------------------------------------------------------------ vendor-call ops
def _fused_variance(x: Tensor) -> Tensor:
    return _vendor("sgl_kernel_npu.norm.rmsnorm_split", "fused_variance")(x.contiguous())


def _fused_rsqrt_mul(x: Tensor, variance: Tensor, weight: Optional[Tensor], eps: float) -> Tensor:
    w = torch.ones(x.shape[-1], dtype=x.dtype, device=x.device) if weight is None else weight
    fn = _vendor("sgl_kernel_npu.norm.rmsnorm_split", "fused_rsqrt_mul")
    return fn(x.contiguous(), variance.contiguous(), w.reshape(-1).contiguous(), eps)


def _fused_scale_shift(x: Tensor, scale: Tensor, shift: Tensor, scale_constant: float) -> Tensor:
    fn = _vendor("sgl_kernel_npu.norm.scale_shift", "fused_scale_shift")
    return fn(x.contiguous(), scale.contiguous(), shift.contiguous(), scale_constant=scale_constant)


def _rotary_mul(x: Tensor, r1: Tensor, r2: Tensor, rotary_mode: str) -> Tensor:
    return _vendor("torch_npu", "npu_rotary_mul")(x.contiguous(), r1.contiguous(), r2.contiguous(),
                                                   rotary_mode=rotary_mode)


LEFT_UP_CAUSAL = 2  # npu_fusion_attention's sparse_mode for SDPA's (top-left) causal mask
_causal_masks: dict = {}


def _causal_mask(device) -> Tensor:
    """The compressed causal mask sparse_mode 2 reads: 2048 x 2048, True above the diagonal."""
    if device not in _causal_masks:
        _causal_masks[device] = torch.ones(2048, 2048, dtype=torch.bool, device=device).triu(1)
    return _causal_masks[device]


def _dense(t: Tensor) -> Tensor:
    """t with row-major strides, size-1 dims included (what the fake promises); copies only
    when t is not dense."""
    return t.contiguous().view(-1).view(t.shape)


def _fusion_attention(q: Tensor, k: Tensor, v: Tensor, scale: Optional[float], is_causal: bool
                      ) -> tuple[Tensor, Tensor]:
    """npu_fusion_attention on contiguous BSND copies of the [B, H, L, D] operands (views of
    [B, L, H, D] memory need none); out as [B, H, Lq, Dv] over its [B, Lq, H, Dv] memory, lse =
    softmax_max + log(softmax_sum) as a contiguous fp32 [B, H, Lq]."""
    heads, d = q.shape[1], q.shape[-1]
    q4, k4, v4 = (t.transpose(1, 2).contiguous() for t in (q, k, v))
    mask = {"atten_mask": _causal_mask(q.device), "sparse_mode": LEFT_UP_CAUSAL} if is_causal else {}
    out, softmax_max, softmax_sum = _vendor("torch_npu", "npu_fusion_attention")(
        q4, k4, v4, head_num=heads, input_layout="BSND", scale=1.0 / math.sqrt(d) if scale is None else scale,
        keep_prob=1.0, inner_precise=0, **mask)[:3]
    lse = softmax_max[..., 0] + torch.log(softmax_sum[..., 0])
    return _dense(out).transpose(1, 2), _dense(lse)


def _attention_like(q, k, v, scale, is_causal):
    b, h, lq = q.shape[0], q.shape[1], q.shape[2]
    return q.new_empty((b, lq, h, v.shape[-1])).transpose(1, 2), q.new_empty((b, h, lq), dtype=torch.float32)


fused_variance = _define("npu_fused_variance", _fused_variance,
                         lambda x: x.new_empty((*x.shape[:-1], 1)))
fused_rsqrt_mul = _define("npu_fused_rsqrt_mul", _fused_rsqrt_mul,
                          lambda x, variance, weight, eps: torch.empty_like(x, memory_format=torch.contiguous_format))
fused_scale_shift = _define("npu_fused_scale_shift", _fused_scale_shift,
                            lambda x, scale, shift, scale_constant: torch.empty_like(
                                x, memory_format=torch.contiguous_format))
rotary_mul = _define("npu_rotary_mul", _rotary_mul,
                     lambda x, r1, r2, rotary_mode: torch.empty_like(x, memory_format=torch.contiguous_format))
fusion_attention = _define("npu_fusion_attention", _fusion_attention, _attention_like)


# ------------------------------------------------------------------ family implementations
def _rms_fp32(x: Tensor, weight: Optional[Tensor], eps: float) -> Tensor:
    """x * rsqrt(mean(x², -1) + eps) * w in fp32, through fused_variance + fused_rsqrt_mul on
    x viewed as [1, tokens, C] (the kernels take [B, L, C])."""
    xf = x.float().reshape(1, -1, x.shape[-1])
    var = fused_variance(xf)
    y = fused_rsqrt_mul(xf, var, None if weight is None else weight.float(), eps)
    return y.reshape(x.shape)


def rms_norm(x: Tensor, weight: Optional[Tensor], eps: float, out_dtype: torch.dtype) -> Tensor:
    """difffuse::rms_norm = fused_variance(x fp32) -> fused_rsqrt_mul(x, var, w fp32, eps), cast."""
    return _rms_fp32(x, weight, eps).to(out_dtype)


def _modulate(n: Tensor, scale: Tensor, shift: Optional[Tensor], k: float) -> Tensor:
    """n * (k + scale) + shift through fused_scale_shift; `supports` has checked exactness.
    scale goes in as fp32 so the kernel's `k + scale` and the products are fp32."""
    if shift is None:  # k == 1 here: the small-shift kernel adds a zero scalar
        shift = n.new_zeros(1, dtype=torch.float32)
    return fused_scale_shift(n, scale.float(), shift, float(k))


def scale_shift(a: Tensor, b: Tensor, c: Optional[Tensor], k: float, out_dtype: torch.dtype) -> Tensor:
    """difffuse::scale_shift: c + a * (k + b) = fused_scale_shift(a, b, c, scale_constant=k).
    a goes in as is when its dtype is fp32 or the output's (the kernel stores a's dtype from
    fp32 arithmetic), else upcast to fp32 first."""
    x = a if a.dtype in (out_dtype, torch.float32) else a.float()
    return _modulate(x, b, c, k).to(out_dtype)


def norm_scale_shift(x, residual, gate, weight, bias, scale, shift, eps: float, k: float, is_rms: bool,
                     residual_dtype: torch.dtype, out_dtype: torch.dtype):
    """difffuse::norm_scale_shift: residual (+ gate) in aten, rounded to residual_dtype; the
    norm (RMS: fused_variance + fused_rsqrt_mul; LayerNorm: aten) in fp32; modulation by
    fused_scale_shift."""
    if residual is None:
        r = x.to(residual_dtype)
    else:
        xs = x.float() if gate is None else x.float() * gate.float()
        r = (residual.float() + xs).to(residual_dtype)
    if is_rms:
        n = _rms_fp32(r, weight, eps)
    else:
        var, mean = torch.var_mean(r.float(), dim=-1, correction=0, keepdim=True)
        n = (r.float() - mean) * torch.rsqrt(var + eps)
        if weight is not None:
            n = n * weight.float()
    if bias is not None:
        n = n + bias.float()
    if scale is not None:
        n = _modulate(n, scale, shift, k)
    return n.to(out_dtype), r


def _table4(t: Tensor) -> Tensor:
    """A cos/sin table as the 4-D [.., S, .., D] tensor npu_rotary_mul reads (fp32)."""
    return t.float().reshape((1,) * (4 - t.ndim) + tuple(t.shape))


def qk_norm_rope(x, weight, cos, sin, eps: float, num_heads: int, across_heads: bool, interleaved: bool,
                 out_dtype: torch.dtype, bias: Optional[Tensor] = None, is_rms: bool = True,
                 full_tables: bool = False, eps_t: Optional[Tensor] = None) -> Tensor:
    """difffuse::qk_norm_rope = the rms_norm kernels, then npu_rotary_mul on [B, S, N, D].
    interleave with half tables: r1[2i] = r1[2i+1] = cos[2i], r2[2i] = r2[2i+1] = sin[2i+1]
    (the reference's pair rotation); interleave with full tables (the stack form) and half
    mode (neox): r1 = cos, r2 = sin. RMSNorm only (``supports`` declines LayerNorm)."""
    if not is_rms or bias is not None or eps_t is not None:
        raise ValueError("difffuse npu qk_norm_rope: RMSNorm q/k with a constant eps only (supports() declines others)")
    n = _rms_fp32(x, weight, eps)
    if across_heads:
        n = n.unflatten(-1, (num_heads, -1))
    c, s = _table4(cos), _table4(sin)
    if interleaved and not full_tables:
        r1, r2 = c[..., 0::2].repeat_interleave(2, -1), s[..., 1::2].repeat_interleave(2, -1)
    else:
        r1, r2 = c, s
    return rotary_mul(n, r1, r2, "interleave" if interleaved else "half").to(out_dtype)


def rope(x: Tensor, cos: Tensor, sin: Tensor, interleaved: bool, out_dtype: torch.dtype,
         full_tables: bool = True) -> Tensor:
    """difffuse::rope = npu_rotary_mul on x in fp32 (the tables as in qk_norm_rope; a rope
    the model computed in complex128 arrives with fp32 tables, the fp64 rule of patterns/rope.py)."""
    c, s = _table4(cos), _table4(sin)
    if interleaved and not full_tables:
        c, s = c[..., 0::2].repeat_interleave(2, -1), s[..., 1::2].repeat_interleave(2, -1)
    return rotary_mul(x.float(), c, s, "interleave" if interleaved else "half").to(out_dtype)


def variance(x: Tensor) -> Tensor:
    """difffuse::variance = fused_variance(x fp32) (tensor-parallel RMSNorm, first half)."""
    return fused_variance(x.float().reshape(1, -1, x.shape[-1])).reshape(*x.shape[:-1], 1)


def rsqrt_mul(x: Tensor, var: Tensor, weight: Optional[Tensor], eps: float, out_dtype: torch.dtype) -> Tensor:
    """difffuse::rsqrt_mul = fused_rsqrt_mul(x fp32, var, w fp32, eps), cast (second half)."""
    xf = x.float().reshape(1, -1, x.shape[-1])
    y = fused_rsqrt_mul(xf, var.float().reshape(1, -1, 1), None if weight is None else weight.float(), eps)
    return y.reshape(x.shape).to(out_dtype)


IMPLS = {
    "rms_norm": rms_norm,
    "scale_shift": scale_shift,
    "norm_scale_shift": norm_scale_shift,
    "qk_norm_rope": qk_norm_rope,
    "rope": rope,
    "variance": variance,
    "rsqrt_mul": rsqrt_mul,
    "attention": fusion_attention,
}


# ------------------------------------------------------------------ eligibility
# Stated once per kernel, from the typed site record alone (lowering/sites.py). The vendor
# calls receive contiguous copies (`_vendor` wrappers), so operand strides never matter.
def _float_ok(site) -> Optional[str]:
    for t in specs(site):
        if t.dtype not in FLOATS:
            return f"dtype {t.dtype} (the NPU kernels take fp16/bf16/fp32)"
        if t.has_zero_dim():
            return f"zero-size operand {tuple(t.shape)}: left to Inductor"
    return None


def _is_vector(t: TensorSpec, d) -> bool:
    return t.ndim >= 1 and known(t.shape[-1] == d) and known(t.numel() == d)


def modulation_reason(x_shape, scale: Optional[TensorSpec], shift: Optional[TensorSpec], k: float) -> Optional[str]:
    """Whether fused_scale_shift computes x * (k + scale) + shift exactly for an x of
    x_shape (contiguous, as our ops pass it): None, or why not."""
    if len(x_shape) != 3:
        return f"fused_scale_shift takes a [B, L, D] x, got {len(x_shape)}-d"
    if scale is None:
        return "shift without scale"
    b, l, d = x_shape
    if known(scale.numel() == 1):
        scale_kind = "scalar"
    elif _is_vector(scale, d):
        scale_kind = "vector"
    else:
        return (f"scale of shape {tuple(scale.shape)} is per-batch/per-frame/per-token; fused_scale_shift "
                f"reads one scale of 1 or D={d} values for every row")
    if shift is None or known(shift.numel() == 1) or _is_vector(shift, d):
        full = False
    elif known(shift.numel() == b * l * d) and _broadcasts_to(shift.shape, x_shape):
        if not shift.is_contiguous():
            return "full-size shift is not contiguous"
        full = True
    else:
        return f"shift of shape {tuple(shift.shape)} is not 1, D={d} or B*L*D elements laid out like x"
    if full and scale_kind == "scalar":
        return "scalar scale with a full-size shift (the kernel would read D scale values)"
    if not full and float(k) != 1.0:
        return f"k={k} with a shift smaller than x: the kernel ignores scale_constant and uses 1"
    return None


def _broadcasts_to(shape, target) -> bool:
    try:
        out = torch.broadcast_shapes(tuple(shape), tuple(target))
    except RuntimeError:
        return False
    return len(out) == len(target) and all(known(a == b) for a, b in zip(out, target))


def _rope_reason(out_shape, cos: TensorSpec, sin: TensorSpec, interleaved: bool) -> Optional[str]:
    if cos.is_complex() or sin.is_complex():
        return "complex cos/sin table"
    if len(out_shape) != 4:
        return f"npu_rotary_mul takes 4-d q/k, got {len(out_shape)}-d"
    b, s, n, d = out_shape
    if d % 2 or d >= 896:
        return f"head_dim {d}: npu_rotary_mul needs it even and < 896"
    if tuple(cos.shape) != tuple(sin.shape) or cos.ndim > 4:
        return f"cos {tuple(cos.shape)} / sin {tuple(sin.shape)} are not one table shape"
    t = (1,) * (4 - cos.ndim) + tuple(cos.shape)
    allowed = [(1, s, 1, d)] + ([] if interleaved else [(b, s, 1, d), (b, s, n, d)])
    if t not in allowed:
        return f"cos/sin shaped {t} for q/k {tuple(out_shape)}: npu_rotary_mul takes {allowed}"
    if interleaved and b * n >= 1000:
        return f"interleave mode needs B*N < 1000, got {b}*{n}"
    if not interleaved and (b >= 1000 or n >= 1000):
        return f"half mode needs B, N < 1000, got B={b}, N={n}"
    return None


def _weight_reason(x: TensorSpec, weight: Optional[TensorSpec]) -> Optional[str]:
    """fused_rsqrt_mul reads C weight values for a [.., C] x (and the result keeps x's shape)."""
    if weight is None:
        return None
    if x.ndim == 0 or not _is_vector(weight, x.shape[-1]) or weight.ndim > x.ndim:
        return f"weight of shape {tuple(weight.shape)} is not one value per column of x {tuple(x.shape)}"
    return None


def _rms(site) -> Optional[str]:
    return _float_ok(site) or _weight_reason(site.x, getattr(site, "weight", None))


def _scale_shift(site: ScaleShiftSite) -> Optional[str]:
    reason = _float_ok(site)
    if reason is None and not site.a.is_contiguous():
        reason = "x is not contiguous"
    return reason or modulation_reason(tuple(site.a.shape), site.b, site.c, site.k)


def _norm_scale_shift(site: NormScaleShiftSite) -> Optional[str]:
    reason = _float_ok(site)
    if reason:
        return reason
    try:
        r_shape = torch.broadcast_shapes(*[t.shape for t in (site.x, site.residual, site.gate) if t is not None])
    except RuntimeError:
        return "x, residual and gate do not broadcast"
    if site.is_rms:
        reason = _weight_reason(TensorSpec(tuple(r_shape), (), site.x.dtype, site.x.device), site.weight)
        if reason:
            return reason
    if site.scale is None and site.shift is None:
        return None if site.is_rms else "LayerNorm without modulation: no NPU kernel to add"
    return modulation_reason(tuple(r_shape), site.scale, site.shift, site.k)


def _rope(site: RopeSite) -> Optional[str]:
    return _float_ok(site) or _rope_reason(tuple(site.x.shape), site.cos, site.sin, site.interleaved)


def _qk_norm_rope(site: QKNormRopeSite) -> Optional[str]:
    if not site.is_rms or site.bias is not None:
        return "LayerNorm q/k: the NPU lowering has RMSNorm kernels only"
    if site.eps_tensor:
        return ("eps is a 0-d tensor input (a Python float Dynamo lifted under dynamic shapes): "
                "npu_rms_norm takes eps as a constant")
    if site.cos.is_complex() or site.sin.is_complex():
        return "complex cos/sin table"
    reason = _float_ok(site) or _weight_reason(site.x, site.weight)
    if reason:
        return reason
    if site.across_heads and not known(site.x.shape[-1] % site.num_heads == 0):
        return f"width {site.x.shape[-1]} is not {site.num_heads} heads of one size"
    return _rope_reason(tuple(site.out_shape), site.cos, site.sin, site.interleaved)


MAX_HEAD_DIM, MAX_HEADS, MAX_BATCH, MAX_SEQ = 768, 256, 2 * 1024 * 1024, 1024 * 1024


def _attention(site: AttentionSite) -> Optional[str]:
    import torch_npu

    if not hasattr(torch_npu, "npu_fusion_attention"):
        return "the installed torch_npu has no npu_fusion_attention"
    q, k, v = site.q, site.k, site.v
    reason = _float_ok(site)
    if reason:
        return reason
    if len({q.dtype, k.dtype, v.dtype}) != 1:
        return f"q/k/v dtypes {q.dtype}/{k.dtype}/{v.dtype}: npu_fusion_attention takes one of fp16/bf16/fp32"
    b, heads, d, dv = q.shape[0], q.shape[1], q.shape[-1], v.shape[-1]
    if not known(d <= MAX_HEAD_DIM):
        return f"head_dim {d}: npu_fusion_attention takes 1..{MAX_HEAD_DIM}"
    if not known(dv <= d):
        return f"value head_dim {dv} > query/key head_dim {d}: npu_fusion_attention needs Dk >= Dv"
    if not known(heads <= MAX_HEADS):
        return f"{heads} heads: npu_fusion_attention takes 1..{MAX_HEADS}"
    # B and S may be symbols (dynamic shapes): refused only where known to be over the limit
    if known(b > MAX_BATCH) or known(q.shape[2] > MAX_SEQ) or known(k.shape[2] > MAX_SEQ):
        return f"batch {b} / sequence {q.shape[2]}, {k.shape[2]}: npu_fusion_attention takes B <= 2M, S <= 1M"
    return None  # causal: sparse_mode 2 is SDPA's top-left alignment; the lse is converted exactly


_RULES = {
    AttentionSite: _attention,
    RMSNormSite: _rms,
    VarianceSite: _rms,
    RsqrtMulSite: _rms,
    ScaleShiftSite: _scale_shift,
    NormScaleShiftSite: _norm_scale_shift,
    QKNormRopeSite: _qk_norm_rope,
    RopeSite: _rope,
}


def supports(site) -> Optional[str]:
    """None if the NPU kernels compute this site (a typed record) exactly; else the reason
    (site -> Inductor)."""
    rule = _RULES.get(type(site))
    return rule(site) if rule else f"no NPU kernel for {site.FAMILY}"
