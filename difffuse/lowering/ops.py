"""The `difffuse::*` custom ops: schema, fake (meta) implementation and reference math.

Each op is the contract every device lowering implements with the same signature.
The reference implementation is pure PyTorch, computes in fp32 and returns
``out_dtype``; it is the numerics oracle for the tests and the ``"reference"``
lowering. Fake implementations only compute shapes, so they work with symbolic
shapes. Every op returns contiguous tensors except attention's `out`, which is
[B, H, L, D] over [B, L, H, D] memory (the fake ones say so; Inductor checks the
strides of a custom op's outputs against them).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

LIB = "difffuse"


def _f32(t: Tensor) -> Tensor:
    return t if t.dtype == torch.float64 else t.float()


# ---------------------------------------------------------------- rms_norm
def rms_norm_ref(x: Tensor, weight: Optional[Tensor], eps: float, out_dtype: torch.dtype) -> Tensor:
    """y = x * rsqrt(mean(x**2, -1, keepdim) + eps) [* weight], in fp32, cast to out_dtype."""
    xf = _f32(x)
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if weight is not None:
        y = y * _f32(weight)
    return y.to(out_dtype)


@torch.library.custom_op(f"{LIB}::rms_norm", mutates_args=())
def rms_norm(x: Tensor, weight: Optional[Tensor], eps: float, out_dtype: torch.dtype) -> Tensor:
    return rms_norm_ref(x, weight, eps, out_dtype).contiguous()


@rms_norm.register_fake
def _(x, weight, eps, out_dtype):
    shape = torch.broadcast_shapes(x.shape, weight.shape) if weight is not None else x.shape
    return x.new_empty(shape, dtype=out_dtype)


def norm_ref(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float, is_rms: bool) -> Tensor:
    """fp32 norm over the last dim: RMSNorm x * rsqrt(mean(x²) + eps) if is_rms, else
    LayerNorm (x - mean) * rsqrt(var + eps) (biased var); then [* weight] [+ bias]."""
    xf = _f32(x)
    if is_rms:
        n = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    else:
        var, mean = torch.var_mean(xf, dim=-1, correction=0, keepdim=True)
        n = (xf - mean) * torch.rsqrt(var + eps)
    if weight is not None:
        n = n * _f32(weight)
    if bias is not None:
        n = n + _f32(bias)
    return n


# ---------------------------------------------------------------- scale_shift
def scale_shift_ref(a: Tensor, b: Tensor, c: Optional[Tensor], k: float, out_dtype: torch.dtype) -> Tensor:
    """out = c + a * (k + b) (c optional), broadcasting b and c against a, in fp32."""
    y = _f32(a) * (_f32(b) + k)
    if c is not None:
        y = _f32(c) + y
    return y.to(out_dtype)


@torch.library.custom_op(f"{LIB}::scale_shift", mutates_args=())
def scale_shift(a: Tensor, b: Tensor, c: Optional[Tensor], k: float, out_dtype: torch.dtype) -> Tensor:
    return scale_shift_ref(a, b, c, k, out_dtype).contiguous()


@scale_shift.register_fake
def _(a, b, c, k, out_dtype):
    shapes = [a.shape, b.shape] + ([c.shape] if c is not None else [])
    return a.new_empty(torch.broadcast_shapes(*shapes), dtype=out_dtype)


# ---------------------------------------------------------------- norm_scale_shift
def norm_scale_shift_ref(
    x: Tensor,
    residual: Optional[Tensor],
    gate: Optional[Tensor],
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    scale: Optional[Tensor],
    shift: Optional[Tensor],
    eps: float,
    k: float,
    is_rms: bool,
    residual_dtype: torch.dtype,
    out_dtype: torch.dtype,
) -> tuple[Tensor, Tensor]:
    """r = residual + x * gate (rounded to residual_dtype); n = norm(r) over the last dim
    (LayerNorm, or RMSNorm if is_rms) [* weight] [+ bias];
    out = n * (k + scale) + shift. Returns (out as out_dtype, r)."""
    if residual is None:
        r = x.to(residual_dtype, copy=True)  # an op output may not alias an input
    else:
        xs = _f32(x) if gate is None else _f32(x) * _f32(gate)
        r = (_f32(residual) + xs).to(residual_dtype)
    n = norm_ref(r, weight, bias, eps, is_rms)
    if scale is not None:
        n = n * (_f32(scale) + k)
    if shift is not None:
        n = n + _f32(shift)
    return n.to(out_dtype), r


@torch.library.custom_op(f"{LIB}::norm_scale_shift", mutates_args=())
def norm_scale_shift(
    x: Tensor,
    residual: Optional[Tensor],
    gate: Optional[Tensor],
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    scale: Optional[Tensor],
    shift: Optional[Tensor],
    eps: float,
    k: float,
    is_rms: bool,
    residual_dtype: torch.dtype,
    out_dtype: torch.dtype,
) -> tuple[Tensor, Tensor]:
    out, r = norm_scale_shift_ref(x, residual, gate, weight, bias, scale, shift, eps, k, is_rms,
                                  residual_dtype, out_dtype)
    return out.contiguous(), r.contiguous()


@norm_scale_shift.register_fake
def _(x, residual, gate, weight, bias, scale, shift, eps, k, is_rms, residual_dtype, out_dtype):
    r_shape = x.shape
    for t in (residual, gate):
        if t is not None:
            r_shape = torch.broadcast_shapes(r_shape, t.shape)
    o_shape = r_shape
    for t in (weight, bias, scale, shift):
        if t is not None:
            o_shape = torch.broadcast_shapes(o_shape, t.shape)
    return x.new_empty(o_shape, dtype=out_dtype), x.new_empty(r_shape, dtype=residual_dtype)


# ---------------------------------------------------------------- qk_norm_rope
def rope_ref(x: Tensor, cos: Tensor, sin: Tensor, interleaved: bool, full_tables: bool = False) -> Tensor:
    """Rotary embedding on the last dim of x (fp32 math); cos/sin broadcast against x.
    full_tables (the stack and neox forms): every output element reads its own entry,
    out = x * cos + rotate(x) * sin, rotate pairs (2i, 2i+1) -> (-x[2i+1], x[2i]) if
    interleaved, else halves rotate_half(x) = cat(-x2, x1). Otherwise (interleaved only:
    Wan's strided writes, the complex form) a pair reads cos[2i] and sin[2i+1]:
                                   out[2i] = x[2i]*cos[2i] - x[2i+1]*sin[2i+1]
                                   out[2i+1] = x[2i]*sin[2i+1] + x[2i+1]*cos[2i]"""
    xf, c, s = _f32(x), _f32(cos), _f32(sin)
    if interleaved and not full_tables:
        x1, x2 = xf.unflatten(-1, (-1, 2)).unbind(-1)
        c0, s1 = c[..., 0::2], s[..., 1::2]
        return torch.stack([x1 * c0 - x2 * s1, x1 * s1 + x2 * c0], dim=-1).flatten(-2)
    if interleaved:
        x1, x2 = xf.unflatten(-1, (-1, 2)).unbind(-1)
        rot = torch.stack([-x2, x1], dim=-1).flatten(-2)
    else:
        x1, x2 = xf.chunk(2, dim=-1)
        rot = torch.cat([-x2, x1], dim=-1)
    return xf * c + rot * s


def qk_norm_rope_ref(
    x: Tensor,
    weight: Optional[Tensor],
    cos: Tensor,
    sin: Tensor,
    eps: float,
    num_heads: int,
    across_heads: bool,
    interleaved: bool,
    out_dtype: torch.dtype,
    bias: Optional[Tensor] = None,
    is_rms: bool = True,
    full_tables: bool = False,
    eps_t: Optional[Tensor] = None,
) -> Tensor:
    """y = rope(norm(x) [* weight] [+ bias]), norm RMSNorm (is_rms) or LayerNorm. Across
    heads: x is [..., H*D], normalised over H*D, then viewed [..., H, D]; per head: x is
    [..., H, D], normalised over D. Returns [..., H, D] in out_dtype; cos/sin broadcast
    against [..., H, D]. `eps_t`: eps as a 0-d tensor, used instead of `eps` (a Python float
    Dynamo lifted to a graph input under dynamic shapes: its value is read at run time,
    added as the model adds it, in the reduction's dtype)."""
    n = norm_ref(x, weight, bias, eps if eps_t is None else eps_t, is_rms)
    if across_heads:
        n = n.unflatten(-1, (num_heads, -1))
    return rope_ref(n, cos, sin, interleaved, full_tables).to(out_dtype)


@torch.library.custom_op(f"{LIB}::qk_norm_rope", mutates_args=())
def qk_norm_rope(
    x: Tensor,
    weight: Optional[Tensor],
    cos: Tensor,
    sin: Tensor,
    eps: float,
    num_heads: int,
    across_heads: bool,
    interleaved: bool,
    out_dtype: torch.dtype,
    bias: Optional[Tensor] = None,
    is_rms: bool = True,
    full_tables: bool = False,
    eps_t: Optional[Tensor] = None,
) -> Tensor:
    return qk_norm_rope_ref(x, weight, cos, sin, eps, num_heads, across_heads, interleaved, out_dtype,
                            bias, is_rms, full_tables, eps_t).contiguous()


@qk_norm_rope.register_fake
def _(x, weight, cos, sin, eps, num_heads, across_heads, interleaved, out_dtype, bias=None, is_rms=True,
      full_tables=False, eps_t=None):
    if across_heads:
        shape = (*x.shape[:-1], num_heads, x.shape[-1] // num_heads)
    else:
        shape = tuple(x.shape)
    return x.new_empty(shape, dtype=out_dtype)


# ---------------------------------------------------------------- rope (no norm in front)
@torch.library.custom_op(f"{LIB}::rope", mutates_args=())
def rope(x: Tensor, cos: Tensor, sin: Tensor, interleaved: bool, out_dtype: torch.dtype,
         full_tables: bool = True) -> Tensor:
    """A rotary embedding alone: rope_ref(x, cos, sin) in fp32, returned as out_dtype."""
    return rope_ref(x, cos, sin, interleaved, full_tables).to(out_dtype).contiguous()


@rope.register_fake
def _(x, cos, sin, interleaved, out_dtype, full_tables=True):
    return x.new_empty(x.shape, dtype=out_dtype)


# ---------------------------------------------------------------- linear_gelu
def linear_gelu_ref(x: Tensor, weight: Tensor, bias: Tensor, out_dtype: torch.dtype) -> Tensor:
    """y = gelu_tanh(x @ weight.T + bias) for 2-D x, in fp32, cast to out_dtype.
    (aten._addmm_activation(use_gelu=True) is this on CUDA but erf-GELU on CPU, so the
    reference computes it itself.)"""
    h = torch.addmm(_f32(bias), _f32(x), _f32(weight).t())
    return torch.nn.functional.gelu(h, approximate="tanh").to(out_dtype)


@torch.library.custom_op(f"{LIB}::linear_gelu", mutates_args=())
def linear_gelu(x: Tensor, weight: Tensor, bias: Tensor, out_dtype: torch.dtype) -> Tensor:
    return linear_gelu_ref(x, weight, bias, out_dtype).contiguous()


@linear_gelu.register_fake
def _(x, weight, bias, out_dtype):
    return x.new_empty((x.shape[0], weight.shape[0]), dtype=out_dtype)


# ---------------------------------------------------------------- attention
def attention_ref(q: Tensor, k: Tensor, v: Tensor, scale: Optional[float], is_causal: bool
                  ) -> tuple[Tensor, Tensor]:
    """Exact softmax attention, per batch b and head h (q [B, H, Lq, D], k [B, H, Lkv, D],
    v [B, H, Lkv, Dv]; fp32 math, fp64 kept):
        s[i, j]  = scale * <q[i], k[j]>          scale = 1/sqrt(D) when None
                   (-inf where j > i if is_causal: SDPA's top-left alignment)
        lse[i]   = log(sum_j exp(s[i, j]))        fp32, [B, H, Lq]
        out[i]   = sum_j exp(s[i, j] - lse[i]) * v[j]    in q's dtype
    `out` is returned as [B, H, Lq, Dv] over [B, Lq, H, Dv] memory (the layout flash
    kernels write; diffusers transposes it back to [B, L, H, D]), `lse` contiguous."""
    qf, kf, vf = _f32(q), _f32(k), _f32(v)
    s = torch.matmul(qf, kf.transpose(-1, -2)) * (1.0 / math.sqrt(q.shape[-1]) if scale is None else scale)
    if is_causal:
        keep = torch.ones(s.shape[-2:], dtype=torch.bool, device=s.device).tril()
        s = s.masked_fill(~keep, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    out = torch.matmul(torch.exp(s - lse.unsqueeze(-1)), vf).to(q.dtype)
    return out.transpose(1, 2).contiguous().transpose(1, 2), lse.float().contiguous()


@torch.library.custom_op(f"{LIB}::attention", mutates_args=())
def attention(q: Tensor, k: Tensor, v: Tensor, scale: Optional[float], is_causal: bool) -> tuple[Tensor, Tensor]:
    return attention_ref(q, k, v, scale, is_causal)


@attention.register_fake
def _(q, k, v, scale, is_causal):
    b, h, lq = q.shape[0], q.shape[1], q.shape[2]
    out = q.new_empty((b, lq, h, v.shape[-1])).transpose(1, 2)
    return out, q.new_empty((b, h, lq), dtype=torch.float32)


REFERENCE = {
    "attention": torch.ops.difffuse.attention.default,
    "rms_norm": torch.ops.difffuse.rms_norm.default,
    "scale_shift": torch.ops.difffuse.scale_shift.default,
    "norm_scale_shift": torch.ops.difffuse.norm_scale_shift.default,
    "qk_norm_rope": torch.ops.difffuse.qk_norm_rope.default,
    "rope": torch.ops.difffuse.rope.default,
    "linear_gelu": torch.ops.difffuse.linear_gelu.default,
}


# ======================================================================================
# Tensor-parallel RMSNorm (design §3.1): the two halves of an RMSNorm whose last dim is
# sharded over a TP group, split around the all-reduce of the per-row mean of squares:
#     var = variance(x_shard)                       # mean(x², -1, keepdim), fp32
#     var = all_reduce(var, "avg", group)           # the model's own functional collective
#     y   = rsqrt_mul(x_shard, var, w_shard, eps)   # x * rsqrt(var + eps) * w, -> out_dtype
# Seed: sglang `tensor_parallel_rms_norm` (on NPU these are sgl_kernel_npu's
# `fused_variance` / `fused_rsqrt_mul`). The collective itself is never inside an op.
# ======================================================================================
def variance_ref(x: Tensor) -> Tensor:
    """mean(x**2, dim=-1, keepdim=True), computed and returned in fp32."""
    return x.float().pow(2).mean(-1, keepdim=True)


@torch.library.custom_op(f"{LIB}::variance", mutates_args=())
def variance(x: Tensor) -> Tensor:
    return variance_ref(x).contiguous()


@variance.register_fake
def _(x):
    return x.new_empty((*x.shape[:-1], 1), dtype=torch.float32)


def rsqrt_mul_ref(x: Tensor, variance: Tensor, weight: Optional[Tensor], eps: float,
                  out_dtype: torch.dtype) -> Tensor:
    """y = x * rsqrt(variance + eps) [* weight] in fp32, cast to out_dtype; `variance`
    broadcasts against x (shape [..., 1])."""
    y = _f32(x) * torch.rsqrt(_f32(variance) + eps)
    if weight is not None:
        y = y * _f32(weight)
    return y.to(out_dtype)


@torch.library.custom_op(f"{LIB}::rsqrt_mul", mutates_args=())
def rsqrt_mul(x: Tensor, variance: Tensor, weight: Optional[Tensor], eps: float,
              out_dtype: torch.dtype) -> Tensor:
    return rsqrt_mul_ref(x, variance, weight, eps, out_dtype).contiguous()


@rsqrt_mul.register_fake
def _(x, variance, weight, eps, out_dtype):
    shape = torch.broadcast_shapes(x.shape, weight.shape) if weight is not None else x.shape
    return x.new_empty(shape, dtype=out_dtype)


REFERENCE.update({
    "variance": torch.ops.difffuse.variance.default,
    "rsqrt_mul": torch.ops.difffuse.rsqrt_mul.default,
})


# ======================================================================================
# float8 activation quantisation fused into the op before it (issue 29, docs/fp8.md §5):
# the op computes its output y as the plain op does (rounded to out_dtype), then per row
# (per_row) or over the whole tensor
#     amax = max |y|                       over the out_dtype-rounded values, in fp32
#     s    = amax * fp32(1/448)            fp32; 1.0 where amax == 0 (torchao: 0 -> NaN)
#     q    = float8_e4m3fn(clamp(y / s, -448, 448))   round to nearest even
# and returns (y or an empty tensor when store_y is False, [r,] q like y, s fp32 [.., 1]
# per row or [1, .., 1] per tensor). This is what Inductor compiles torchao 0.18's
# quantisation of a bf16 tensor from memory into on a GPU (the constant divisor becomes a
# multiply by its fp32 reciprocal and the bf16 scale is not rounded), so the fused result
# equals the unfused one.
# ======================================================================================
FP8_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max
FP8_INV_MAX = 1.0 / 448.0


def fp8_quant_ref(y: Tensor, per_row: bool = True) -> tuple[Tensor, Tensor]:
    """(q, s) of y as above: q float8_e4m3fn like y, s fp32 [.., 1] or [1, .., 1]."""
    yf = y.float()
    amax = yf.abs().amax(-1 if per_row else tuple(range(y.ndim)), keepdim=True)
    s = amax * torch.tensor(FP8_INV_MAX, dtype=torch.float32)
    s = torch.where(amax == 0, torch.ones_like(s), s)
    q = (yf / s).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q.contiguous(), s.contiguous()


def fp8_row_quant_ref(y: Tensor) -> tuple[Tensor, Tensor]:
    return fp8_quant_ref(y, True)


def _y_out(y: Tensor, store_y: bool) -> Tensor:
    return y.contiguous() if store_y else y.new_empty((0,))


def _fp8_fake(y: Tensor, store_y: bool, per_row: bool) -> tuple[Tensor, Tensor, Tensor]:
    s_shape = (*y.shape[:-1], 1) if per_row else (1,) * y.ndim
    return ((y if store_y else y.new_empty((0,))), y.new_empty(y.shape, dtype=torch.float8_e4m3fn),
            y.new_empty(s_shape, dtype=torch.float32))


@torch.library.custom_op(f"{LIB}::norm_scale_shift_fp8", mutates_args=())
def norm_scale_shift_fp8(
    x: Tensor, residual: Optional[Tensor], gate: Optional[Tensor], weight: Optional[Tensor], bias: Optional[Tensor],
    scale: Optional[Tensor], shift: Optional[Tensor], eps: float, k: float, is_rms: bool,
    residual_dtype: torch.dtype, out_dtype: torch.dtype, store_y: bool, per_row: bool = True,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """difffuse::norm_scale_shift, its output quantised: (y | empty, r, q, s)."""
    y, r = norm_scale_shift_ref(x, residual, gate, weight, bias, scale, shift, eps, k, is_rms, residual_dtype,
                                out_dtype)
    q, s = fp8_quant_ref(y, per_row)
    return _y_out(y, store_y), r.contiguous(), q, s


@norm_scale_shift_fp8.register_fake
def _(x, residual, gate, weight, bias, scale, shift, eps, k, is_rms, residual_dtype, out_dtype, store_y, per_row=True):
    y, r = torch.ops.difffuse.norm_scale_shift.default(x, residual, gate, weight, bias, scale, shift, eps, k, is_rms,
                                                       residual_dtype, out_dtype)
    y_out, q, s = _fp8_fake(y, store_y, per_row)
    return y_out, r, q, s


@torch.library.custom_op(f"{LIB}::rms_norm_fp8", mutates_args=())
def rms_norm_fp8(x: Tensor, weight: Optional[Tensor], eps: float, out_dtype: torch.dtype,
                 store_y: bool, per_row: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    """difffuse::rms_norm, its output quantised: (y | empty, q, s)."""
    y = rms_norm_ref(x, weight, eps, out_dtype)
    q, s = fp8_quant_ref(y, per_row)
    return _y_out(y, store_y), q, s


@rms_norm_fp8.register_fake
def _(x, weight, eps, out_dtype, store_y, per_row=True):
    return _fp8_fake(torch.ops.difffuse.rms_norm.default(x, weight, eps, out_dtype), store_y, per_row)


@torch.library.custom_op(f"{LIB}::scale_shift_fp8", mutates_args=())
def scale_shift_fp8(a: Tensor, b: Tensor, c: Optional[Tensor], k: float, out_dtype: torch.dtype,
                    store_y: bool, per_row: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    """difffuse::scale_shift, its output quantised: (y | empty, q, s)."""
    y = scale_shift_ref(a, b, c, k, out_dtype)
    q, s = fp8_quant_ref(y, per_row)
    return _y_out(y, store_y), q, s


@scale_shift_fp8.register_fake
def _(a, b, c, k, out_dtype, store_y, per_row=True):
    return _fp8_fake(torch.ops.difffuse.scale_shift.default(a, b, c, k, out_dtype), store_y, per_row)


# the fp8 twin of each op whose output the fp8_quant family quantises
FP8_OPS = {
    "norm_scale_shift": torch.ops.difffuse.norm_scale_shift_fp8.default,
    "rms_norm": torch.ops.difffuse.rms_norm_fp8.default,
    "scale_shift": torch.ops.difffuse.scale_shift_fp8.default,
}


def fp8_quant_reference(family: str, args: dict, store_y: bool, per_row: bool = True) -> tuple:
    """The fp8_quant family's call: `family`'s fp8 twin on the op's own arguments (by
    name); returns (y | empty, r | None, q, s)."""
    out = FP8_OPS[family](**args, store_y=store_y, per_row=per_row)
    return (out[0], out[1], out[2], out[3]) if family == "norm_scale_shift" else (out[0], None, out[1], out[2])


REFERENCE["fp8_quant"] = fp8_quant_reference
