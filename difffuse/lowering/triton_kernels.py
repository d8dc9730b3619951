"""Triton kernels for the CUDA lowering, one row (token) per program, fp32 math.

Every tensor operand is read through its own strides over the output's leading dims
(at most three, see ``lead3``), so broadcast modulation (``[B, 1, D]``, ``[1, 1, D]``,
per token, per frame) and non-contiguous inputs need no copy. Outputs are contiguous.
Each launcher is a ``torch.library.triton_op``: called eagerly it launches the kernel;
traced under functionalization (``cuda.trace_replacement``) it becomes Inductor's
user-defined-Triton-kernel node, which the generated code launches directly.
With ``TRITON_INTERPRET=1`` the same kernels run on CPU tensors (the CI tests).
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake
from torch.library import triton_op, wrap_triton

MAX_D = 8192
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def launch(kernel, grid, *args, **meta) -> None:
    """Launch through `wrap_triton` (traceable). Interpreted kernels run Python on the
    data, so under fake tensors (the op's shape-only run) they are not launched."""
    if INTERPRET and any(is_fake(a) for a in args):
        return
    wrap_triton(kernel)[grid](*args, **meta)


def block(n: int) -> int:
    return triton.next_power_of_2(int(n))


def warps(block_elems: int) -> int:
    return min(16, max(4, block_elems // 256))


def lead3(t: Optional[Tensor], shape, inner: int = 1) -> list:
    """Strides of t broadcast to `shape`: three leading-dim strides (front-padded with 0)
    then the strides of the last `inner` dims. A missing operand gives zeros."""
    if t is None:
        return [0] * (3 + inner)
    st = list(t.expand(shape).stride())
    lead = st[: len(shape) - inner]
    return [0] * (3 - len(lead)) + lead + st[len(shape) - inner:]


def sizes3(shape, inner: int = 1) -> list:
    """The leading dims of `shape` as three sizes (front-padded with 1)."""
    lead = list(shape[: len(shape) - inner])
    return [1] * (3 - len(lead)) + lead


def rows(shape, inner: int = 1) -> int:
    n = 1
    for s in shape[: len(shape) - inner]:
        n = n * s
    return n


@triton.jit
def _row(N1, N2):
    """The program's row as three leading-dim indices (int64)."""
    row = tl.program_id(0).to(tl.int64)
    i2 = row % N2
    t = row // N2
    return row, t // N1, t % N1, i2


@triton.jit
def _at(P, i0, i1, i2, s0, s1, s2):
    return P + i0 * s0 + i1 * s1 + i2 * s2


# ------------------------------------------------------------------ rms_norm
@triton.jit
def rms_norm_kernel(X, W, Y, N1, N2, sx0, sx1, sx2, sxd, D, eps,
                    HAS_W: tl.constexpr, BLOCK: tl.constexpr):
    """y = x * rsqrt(mean(x², -1) + eps) [* w]."""
    row, i0, i1, i2 = _row(N1, N2)
    cols = tl.arange(0, BLOCK)
    m = cols < D
    x = tl.load(_at(X, i0, i1, i2, sx0, sx1, sx2) + cols * sxd, mask=m, other=0.0).to(tl.float32)
    y = x * tl.rsqrt(tl.sum(x * x, 0) / D + eps)
    if HAS_W:
        y = y * tl.load(W + cols, mask=m, other=0.0).to(tl.float32)
    tl.store(Y + row * D + cols, y.to(Y.dtype.element_ty), mask=m)


@triton_op("difffuse::triton_rms_norm", mutates_args=())
def rms_norm(x: Tensor, weight: Optional[Tensor], eps: float, out_dtype: torch.dtype) -> Tensor:
    d = x.shape[-1]
    y = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    w = weight.reshape(-1) if weight is not None else None
    b = block(d)
    launch(rms_norm_kernel, (rows(x.shape),),
        x, w, y, *sizes3(x.shape)[1:], *lead3(x, x.shape), d, eps,
        HAS_W=w is not None, BLOCK=b, num_warps=warps(b))
    return y


# ------------------------------------------------------------------ scale_shift
@triton.jit
def scale_shift_kernel(A, B, C, Y, N1, N2, sa0, sa1, sa2, sad, sb0, sb1, sb2, sbd,
                       sc0, sc1, sc2, scd, D, k, HAS_C: tl.constexpr, BLOCK: tl.constexpr):
    """y = c + a * (k + b)."""
    row, i0, i1, i2 = _row(N1, N2)
    cols = tl.arange(0, BLOCK)
    m = cols < D
    a = tl.load(_at(A, i0, i1, i2, sa0, sa1, sa2) + cols * sad, mask=m).to(tl.float32)
    b = tl.load(_at(B, i0, i1, i2, sb0, sb1, sb2) + cols * sbd, mask=m).to(tl.float32)
    y = a * (b + k)
    if HAS_C:
        y = y + tl.load(_at(C, i0, i1, i2, sc0, sc1, sc2) + cols * scd, mask=m).to(tl.float32)
    tl.store(Y + row * D + cols, y.to(Y.dtype.element_ty), mask=m)


@triton_op("difffuse::triton_scale_shift", mutates_args=())
def scale_shift(a: Tensor, b: Tensor, c: Optional[Tensor], k: float, out_dtype: torch.dtype) -> Tensor:
    shape = torch.broadcast_shapes(a.shape, b.shape, *([c.shape] if c is not None else []))
    y = torch.empty(shape, dtype=out_dtype, device=a.device)
    d = shape[-1]
    bl = block(d)
    launch(scale_shift_kernel, (rows(shape),),
        a, b, c, y, *sizes3(shape)[1:], *lead3(a, shape), *lead3(b, shape), *lead3(c, shape), d, k,
        HAS_C=c is not None, BLOCK=bl, num_warps=warps(bl))
    return y


# ------------------------------------------------------------------ norm_scale_shift
@triton.jit
def norm_scale_shift_kernel(
        X, RES, G, W, BIAS, SC, SH, OUT, R, N1, N2,
        sx0, sx1, sx2, sxd, sr0, sr1, sr2, srd, sg0, sg1, sg2, sgd,
        ss0, ss1, ss2, ssd, sh0, sh1, sh2, shd, D, eps, k,
        HAS_RES: tl.constexpr, HAS_G: tl.constexpr, HAS_W: tl.constexpr, HAS_BIAS: tl.constexpr,
        HAS_SC: tl.constexpr, HAS_SH: tl.constexpr, IS_RMS: tl.constexpr, BLOCK: tl.constexpr):
    """r = res + x * g (rounded to R's dtype); n = LayerNorm/RMSNorm(r) [* w] [+ bias];
    out = n * (k + scale) + shift."""
    row, i0, i1, i2 = _row(N1, N2)
    cols = tl.arange(0, BLOCK)
    m = cols < D
    x = tl.load(_at(X, i0, i1, i2, sx0, sx1, sx2) + cols * sxd, mask=m, other=0.0).to(tl.float32)
    if HAS_G:
        x = x * tl.load(_at(G, i0, i1, i2, sg0, sg1, sg2) + cols * sgd, mask=m, other=0.0).to(tl.float32)
    if HAS_RES:
        x = x + tl.load(_at(RES, i0, i1, i2, sr0, sr1, sr2) + cols * srd, mask=m, other=0.0).to(tl.float32)
    r = x.to(R.dtype.element_ty)
    tl.store(R + row * D + cols, r, mask=m)
    r = r.to(tl.float32)
    if IS_RMS:
        n = r * tl.rsqrt(tl.sum(r * r, 0) / D + eps)
    else:
        diff = tl.where(m, r - tl.sum(r, 0) / D, 0.0)
        n = diff * tl.rsqrt(tl.sum(diff * diff, 0) / D + eps)
    if HAS_W:
        n = n * tl.load(W + cols, mask=m, other=0.0).to(tl.float32)
    if HAS_BIAS:
        n = n + tl.load(BIAS + cols, mask=m, other=0.0).to(tl.float32)
    if HAS_SC:
        n = n * (tl.load(_at(SC, i0, i1, i2, ss0, ss1, ss2) + cols * ssd, mask=m, other=0.0).to(tl.float32) + k)
    if HAS_SH:
        n = n + tl.load(_at(SH, i0, i1, i2, sh0, sh1, sh2) + cols * shd, mask=m, other=0.0).to(tl.float32)
    tl.store(OUT + row * D + cols, n.to(OUT.dtype.element_ty), mask=m)


@triton_op("difffuse::triton_norm_scale_shift", mutates_args=())
def norm_scale_shift(x: Tensor, residual: Optional[Tensor], gate: Optional[Tensor], weight: Optional[Tensor],
                     bias: Optional[Tensor], scale: Optional[Tensor], shift: Optional[Tensor], eps: float,
                     k: float, is_rms: bool, residual_dtype: torch.dtype,
                     out_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    shape = torch.broadcast_shapes(*[t.shape for t in (x, residual, gate) if t is not None])
    out = torch.empty(shape, dtype=out_dtype, device=x.device)
    r = torch.empty(shape, dtype=residual_dtype, device=x.device)
    d = shape[-1]
    bl = block(d)
    w = weight.reshape(-1) if weight is not None else None
    bi = bias.reshape(-1) if bias is not None else None
    launch(norm_scale_shift_kernel, (rows(shape),),
        x, residual, gate, w, bi, scale, shift, out, r, *sizes3(shape)[1:],
        *lead3(x, shape), *lead3(residual, shape), *lead3(gate, shape), *lead3(scale, shape),
        *lead3(shift, shape), d, eps, k,
        HAS_RES=residual is not None, HAS_G=gate is not None, HAS_W=w is not None,
        HAS_BIAS=bi is not None, HAS_SC=scale is not None, HAS_SH=shift is not None,
        IS_RMS=is_rms, BLOCK=bl, num_warps=warps(bl))
    return out, r


# ------------------------------------------------------------------ qk_norm_rope
@triton.jit
def qk_norm_rope_kernel(
        X, W, COS, SIN, Y, N1, N2, H, HD,
        sx0, sx1, sx2, sxh, sxd, sc0, sc1, sc2, sch, scd, ss0, ss1, ss2, ssh, ssd, swh, eps,
        ACROSS: tl.constexpr, INTERLEAVED: tl.constexpr, HAS_W: tl.constexpr,
        BH: tl.constexpr, BHALF: tl.constexpr):
    """One token: n = rms_norm(x) over all heads (ACROSS) or per head, [* w];
    y = rope(n): interleaved pairs (2i, 2i+1) or neox halves (i, i + HD/2)."""
    row, i0, i1, i2 = _row(N1, N2)
    h = tl.arange(0, BH)[:, None]
    i = tl.arange(0, BHALF)[None, :]
    half = HD // 2
    m = (h < H) & (i < half)
    if INTERLEAVED:
        ia = 2 * i
        ib = 2 * i + 1
    else:
        ia = i
        ib = i + half
    xp = _at(X, i0, i1, i2, sx0, sx1, sx2) + h * sxh
    xa = tl.load(xp + ia * sxd, mask=m, other=0.0).to(tl.float32)
    xb = tl.load(xp + ib * sxd, mask=m, other=0.0).to(tl.float32)
    sq = xa * xa + xb * xb
    if ACROSS:
        r = tl.rsqrt(tl.sum(tl.sum(sq, 1), 0) / (H * HD) + eps)
    else:
        r = tl.rsqrt(tl.sum(sq, 1) / HD + eps)[:, None]
    na = xa * r
    nb = xb * r
    if HAS_W:
        na = na * tl.load(W + h * swh + ia, mask=m, other=0.0).to(tl.float32)
        nb = nb * tl.load(W + h * swh + ib, mask=m, other=0.0).to(tl.float32)
    cp = _at(COS, i0, i1, i2, sc0, sc1, sc2) + h * sch
    sp = _at(SIN, i0, i1, i2, ss0, ss1, ss2) + h * ssh
    ca = tl.load(cp + ia * scd, mask=m, other=0.0).to(tl.float32)
    sb = tl.load(sp + ib * ssd, mask=m, other=0.0).to(tl.float32)
    if INTERLEAVED:
        ya = na * ca - nb * sb
        yb = na * sb + nb * ca
    else:
        cb = tl.load(cp + ib * scd, mask=m, other=0.0).to(tl.float32)
        sa = tl.load(sp + ia * ssd, mask=m, other=0.0).to(tl.float32)
        ya = na * ca - nb * sa
        yb = nb * cb + na * sb
    yp = Y + row * H * HD + h * HD
    tl.store(yp + ia, ya.to(Y.dtype.element_ty), mask=m)
    tl.store(yp + ib, yb.to(Y.dtype.element_ty), mask=m)


@triton_op("difffuse::triton_qk_norm_rope", mutates_args=())
def qk_norm_rope(x: Tensor, weight: Optional[Tensor], cos: Tensor, sin: Tensor, eps: float, num_heads: int,
                 across_heads: bool, interleaved: bool, out_dtype: torch.dtype) -> Tensor:
    xv = x.unflatten(-1, (num_heads, -1)) if across_heads else x
    shape = xv.shape
    hd = shape[-1]
    y = torch.empty(shape, dtype=out_dtype, device=x.device)
    swh = hd if across_heads else 0
    w = weight.reshape(-1) if weight is not None else None
    bh, bhalf = block(num_heads), block(hd // 2)
    launch(qk_norm_rope_kernel, (rows(shape, 2),),
        xv, w, cos, sin, y, *sizes3(shape, 2)[1:], num_heads, hd,
        *lead3(xv, shape, 2), *lead3(cos, shape, 2), *lead3(sin, shape, 2), swh, eps,
        ACROSS=across_heads, INTERLEAVED=interleaved, HAS_W=w is not None,
        BH=bh, BHALF=bhalf, num_warps=warps(bh * bhalf * 2))
    return y
