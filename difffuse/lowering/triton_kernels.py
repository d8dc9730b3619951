"""Triton kernels for the CUDA lowering, one row (token) per program, fp32 math.

Every tensor operand is read through its own strides over the output's leading dims
(at most three, see ``index_plan``), so broadcast modulation (``[B, 1, D]``, ``[1, 1, D]``,
per token, per frame) and non-contiguous inputs need no copy; weights and biases (one value
per column) are read with their last-dim stride, so ``W[:, 0]`` of a ``[D, 2]`` parameter is
read in place too. Outputs are contiguous. An empty output (a zero-size dim, D = 0 too) is
returned as allocated, with no launch.
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
from torch.fx.experimental.symbolic_shapes import statically_known_true
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


# kernel name -> {block elements: num_warps}, measured on an H200 (benchmarks/tune_triton.py,
# 2026-12-03; norm_scale_shift at 2048 with 2 warps ran 2x slower there than with 4);
# sizes not listed use the rule in `warps`.
WARPS: dict[str, dict[int, int]] = {
    "rms_norm": {2048: 4, 4096: 4, 8192: 4},
    "scale_shift": {2048: 4, 4096: 8, 8192: 8},
    "norm_scale_shift": {2048: 4, 4096: 4, 8192: 8},
    "norm_modulate": {2048: 2, 4096: 4, 8192: 8},  # norm_scale_shift without a residual output
}


def warps(block_elems: int, kernel: str = "") -> int:
    return WARPS.get(kernel, {}).get(block_elems) or min(16, max(4, block_elems // 256))


def index_plan(shape, operands, inner: int = 1):
    """How the kernels index `operands` broadcast to `shape`: leading dims of size 1 are
    dropped and neighbours that every operand walks contiguously are merged (only where
    that is provable without guards), leaving at most three.
    Returns ([N1, N2], [3 leading + `inner` strides per operand], LEAD = dims left)."""
    n = len(shape) - inner
    full = [list(t.expand(shape).stride()) if t is not None else [0] * len(shape) for t in operands]
    dims: list = []  # (size, [stride per operand]), outermost first
    for k in range(n):
        if statically_known_true(shape[k] == 1):
            continue
        st = [f[k] for f in full]
        if dims and all(statically_known_true(ps == s * shape[k]) for ps, s in zip(dims[-1][1], st)):
            dims[-1] = (dims[-1][0] * shape[k], st)
            continue
        dims.append((shape[k], st))
    if len(dims) > 3:
        raise ValueError(f"{len(dims)} leading dims after merging: the kernels index at most 3")
    lead = max(1, len(dims))
    dims = [(1, [0] * len(operands))] * (3 - len(dims)) + dims
    strides = [[d[1][o] for d in dims] + full[o][n:] for o in range(len(operands))]
    return [dims[1][0], dims[2][0]], strides, lead


def vstride(t: Optional[Tensor]):
    """The stride between a per-column vector's (weight, bias) values: its last dim's (0 for
    a single value or a 0-d tensor, which every column reads)."""
    if t is None or t.ndim == 0 or statically_known_true(t.shape[-1] == 1):
        return 0
    return t.stride(-1)


def empty(shape) -> bool:
    """The output has no elements (provably, whatever the symbols): nothing to launch."""
    return any(statically_known_true(s == 0) for s in shape)


def rows(shape, inner: int = 1) -> int:
    n = 1
    for s in shape[: len(shape) - inner]:
        n = n * s
    return n


@triton.jit
def _row(N1, N2, LEAD: tl.constexpr):
    """The program's row and its three leading-dim indices (int64)."""
    row = tl.program_id(0).to(tl.int64)
    if LEAD == 1:
        return row, row * 0, row * 0, row
    i2 = row % N2
    t = row // N2
    return row, t // N1, t % N1, i2


@triton.jit
def _at(P, i0, i1, i2, s0, s1, s2):
    return P + i0 * s0 + i1 * s1 + i2 * s2


# ------------------------------------------------------------------ rms_norm
@triton.jit
def rms_norm_kernel(X, W, Y, N1, N2, sx0, sx1, sx2, sxd, swd, eps, D: tl.constexpr,
                    HAS_W: tl.constexpr, LEAD: tl.constexpr, BLOCK: tl.constexpr):
    """y = x * rsqrt(mean(x², -1) + eps) [* w]."""
    eps = tl.cast(eps, tl.float32)  # Inductor passes Python floats as fp64, which would widen the math
    row, i0, i1, i2 = _row(N1, N2, LEAD)
    cols = tl.arange(0, BLOCK)
    m = cols < D
    x = tl.load(_at(X, i0, i1, i2, sx0, sx1, sx2) + cols * sxd, mask=m, other=0.0).to(tl.float32)
    y = x * tl.rsqrt(tl.sum(x * x, 0) / D + eps)
    if HAS_W:
        y = y * tl.load(W + cols * swd, mask=m, other=0.0).to(tl.float32)
    tl.store(Y + row * D + cols, y.to(Y.dtype.element_ty), mask=m)


@triton_op("difffuse::triton_rms_norm", mutates_args=())
def rms_norm(x: Tensor, weight: Optional[Tensor], eps: float, out_dtype: torch.dtype) -> Tensor:
    shape = torch.broadcast_shapes(x.shape, weight.shape) if weight is not None else x.shape
    d = shape[-1]
    y = torch.empty(shape, dtype=out_dtype, device=x.device)
    if empty(shape):
        return y
    b = block(d)
    sizes, (sx,), lead = index_plan(shape, [x])
    launch(rms_norm_kernel, (rows(shape),), x, weight, y, *sizes, *sx, vstride(weight), eps, D=d,
           HAS_W=weight is not None, LEAD=lead, BLOCK=b, num_warps=warps(b, "rms_norm"))
    return y


# ------------------------------------------------------------------ scale_shift
@triton.jit
def scale_shift_kernel(A, B, C, Y, N1, N2, sa0, sa1, sa2, sad, sb0, sb1, sb2, sbd,
                       sc0, sc1, sc2, scd, k, D: tl.constexpr, HAS_C: tl.constexpr, LEAD: tl.constexpr,
                       BLOCK: tl.constexpr):
    """y = c + a * (k + b)."""
    k = tl.cast(k, tl.float32)
    row, i0, i1, i2 = _row(N1, N2, LEAD)
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
    if empty(shape):
        return y
    d = shape[-1]
    bl = block(d)
    sizes, (sa, sb, sc), lead = index_plan(shape, [a, b, c])
    launch(scale_shift_kernel, (rows(shape),), a, b, c, y, *sizes, *sa, *sb, *sc, k, D=d,
           HAS_C=c is not None, LEAD=lead, BLOCK=bl, num_warps=warps(bl, "scale_shift"))
    return y


# ------------------------------------------------------------------ norm_scale_shift
@triton.jit
def norm_scale_shift_kernel(
        X, RES, G, W, BIAS, SC, SH, OUT, R, N1, N2,
        sx0, sx1, sx2, sxd, sr0, sr1, sr2, srd, sg0, sg1, sg2, sgd,
        ss0, ss1, ss2, ssd, sh0, sh1, sh2, shd, swd, sbd, eps, k, D: tl.constexpr,
        HAS_RES: tl.constexpr, HAS_G: tl.constexpr, HAS_W: tl.constexpr, HAS_BIAS: tl.constexpr,
        HAS_SC: tl.constexpr, HAS_SH: tl.constexpr, IS_RMS: tl.constexpr, STORE_R: tl.constexpr,
        LEAD: tl.constexpr, BLOCK: tl.constexpr):
    """r = res + x * g (rounded to R's dtype); n = LayerNorm/RMSNorm(r) [* w] [+ bias];
    out = n * (k + scale) + shift."""
    eps = tl.cast(eps, tl.float32)
    k = tl.cast(k, tl.float32)
    row, i0, i1, i2 = _row(N1, N2, LEAD)
    cols = tl.arange(0, BLOCK)
    m = cols < D
    x = tl.load(_at(X, i0, i1, i2, sx0, sx1, sx2) + cols * sxd, mask=m, other=0.0).to(tl.float32)
    if HAS_G:
        x = x * tl.load(_at(G, i0, i1, i2, sg0, sg1, sg2) + cols * sgd, mask=m, other=0.0).to(tl.float32)
    if HAS_RES:
        x = x + tl.load(_at(RES, i0, i1, i2, sr0, sr1, sr2) + cols * srd, mask=m, other=0.0).to(tl.float32)
    if STORE_R:  # r as the model rounds it; without R, x is read exactly (an upcast)
        r = x.to(R.dtype.element_ty)
        tl.store(R + row * D + cols, r, mask=m)
        r = r.to(tl.float32)
    else:
        r = x
    if IS_RMS:
        n = r * tl.rsqrt(tl.sum(r * r, 0) / D + eps)
    else:
        diff = tl.where(m, r - tl.sum(r, 0) / D, 0.0)
        n = diff * tl.rsqrt(tl.sum(diff * diff, 0) / D + eps)
    if HAS_W:
        n = n * tl.load(W + cols * swd, mask=m, other=0.0).to(tl.float32)
    if HAS_BIAS:
        n = n + tl.load(BIAS + cols * sbd, mask=m, other=0.0).to(tl.float32)
    if HAS_SC:
        n = n * (tl.load(_at(SC, i0, i1, i2, ss0, ss1, ss2) + cols * ssd, mask=m, other=0.0).to(tl.float32) + k)
    if HAS_SH:
        n = n + tl.load(_at(SH, i0, i1, i2, sh0, sh1, sh2) + cols * shd, mask=m, other=0.0).to(tl.float32)
    tl.store(OUT + row * D + cols, n.to(OUT.dtype.element_ty), mask=m)


def _norm_launch(x, residual, gate, weight, bias, scale, shift, eps, k, is_rms, out, r):
    shape = out.shape
    if empty(shape):
        return
    d = shape[-1]
    bl = block(d)
    sizes, (sx, sr, sg, ss, sh), lead = index_plan(shape, [x, residual, gate, scale, shift])
    launch(norm_scale_shift_kernel, (rows(shape),),
           x, residual, gate, weight, bias, scale, shift, out, r, *sizes, *sx, *sr, *sg, *ss, *sh,
           vstride(weight), vstride(bias), eps, k, D=d,
           HAS_RES=residual is not None, HAS_G=gate is not None, HAS_W=weight is not None,
           HAS_BIAS=bias is not None, HAS_SC=scale is not None, HAS_SH=shift is not None,
           IS_RMS=is_rms, STORE_R=r is not None, LEAD=lead, BLOCK=bl,
           num_warps=warps(bl, "norm_scale_shift" if r is not None else "norm_modulate"))


@triton_op("difffuse::triton_norm_scale_shift", mutates_args=())
def norm_scale_shift(x: Tensor, residual: Optional[Tensor], gate: Optional[Tensor], weight: Optional[Tensor],
                     bias: Optional[Tensor], scale: Optional[Tensor], shift: Optional[Tensor], eps: float,
                     k: float, is_rms: bool, residual_dtype: torch.dtype,
                     out_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    shape = torch.broadcast_shapes(*[t.shape for t in (x, residual, gate) if t is not None])
    out = torch.empty(shape, dtype=out_dtype, device=x.device)
    r = torch.empty(shape, dtype=residual_dtype, device=x.device)
    _norm_launch(x, residual, gate, weight, bias, scale, shift, eps, k, is_rms, out, r)
    return out, r


@triton_op("difffuse::triton_norm_modulate", mutates_args=())
def norm_modulate(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], scale: Optional[Tensor],
                  shift: Optional[Tensor], eps: float, k: float, is_rms: bool, out_dtype: torch.dtype) -> Tensor:
    """norm_scale_shift without a residual: out only (x read exactly, nothing else written)."""
    out = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    _norm_launch(x, None, None, weight, bias, scale, shift, eps, k, is_rms, out, None)
    return out


# ------------------------------------------------------------------ qk_norm_rope
@triton.jit
def _pairs(P, h, HD: tl.constexpr, BHALF: tl.constexpr, sh, sd, m, INTERLEAVED: tl.constexpr,
           FLAT: tl.constexpr):
    """Load a [heads, head_dim] tile as fp32 pair halves (a, b), each [heads, HD/2]:
    (2i, 2i+1) if INTERLEAVED else (i, i + HD/2). FLAT (HD a power of two): one
    contiguous [heads, HD] load split in registers; else a strided [heads, pairs, 2] load."""
    if FLAT:
        d = tl.arange(0, HD)[None, :]
        t = tl.load(P + h * sh + d * sd, mask=m, other=0.0).to(tl.float32)
        if INTERLEAVED:
            t = tl.reshape(t, [t.shape[0], HD // 2, 2])
        else:
            t = tl.permute(tl.reshape(t, [t.shape[0], 2, HD // 2]), (0, 2, 1))
    else:
        i = tl.arange(0, BHALF)[None, :, None]
        j = tl.arange(0, 2)[None, None, :]
        d = 2 * i + j if INTERLEAVED else j * (HD // 2) + i
        t = tl.load(P + h[:, :, None] * sh + d * sd, mask=m[:, :, None] & (i < HD // 2) & (j < 2),
                    other=0.0).to(tl.float32)
    return tl.split(t)


@triton.jit
def _qk_chunk(xa, xb, r, eps, hh, m, W, B, swd, sbd, ca, cb, sa, sb, crow, srow, sch, scd, ssh, ssd, yp,
              Y_TY: tl.constexpr, ACROSS: tl.constexpr, INTERLEAVED: tl.constexpr, FULL: tl.constexpr,
              HAS_W: tl.constexpr, HAS_B: tl.constexpr, IS_RMS: tl.constexpr, HD: tl.constexpr, HC: tl.constexpr,
              BHALF: tl.constexpr, FLAT: tl.constexpr, SHARED_TABLE: tl.constexpr):
    """Heads `hh` of one token, pair halves (xa, xb) loaded: normalise (by `r` across heads,
    else per head), affine (weight and bias read with their strides: one row per head across
    heads, one row shared by the heads per head), rope, store."""
    if not IS_RMS:  # centre; pairs past HD/2 (non-FLAT padding) stay 0
        mu = (tl.sum(xa + xb, 1) / HD)[:, None]
        pv = tl.arange(0, BHALF)[None, :] < HD // 2
        xa = tl.where(pv, xa - mu, 0.0)
        xb = tl.where(pv, xb - mu, 0.0)
    if not ACROSS:
        r = tl.rsqrt(tl.sum(xa * xa + xb * xb, 1) / HD + eps)[:, None]
    na = xa * r
    nb = xb * r
    one = tl.arange(0, 1)[:, None]
    if HAS_W:
        if ACROSS:
            wa, wb = _pairs(W, hh, HD, BHALF, HD * swd, swd, m, INTERLEAVED, FLAT)
        else:
            wa, wb = _pairs(W, one, HD, BHALF, 0, swd, one < 1, INTERLEAVED, FLAT)
        na = na * wa
        nb = nb * wb
    if HAS_B:
        if ACROSS:
            ba, bb = _pairs(B, hh, HD, BHALF, HD * sbd, sbd, m, INTERLEAVED, FLAT)
        else:
            ba, bb = _pairs(B, one, HD, BHALF, 0, sbd, one < 1, INTERLEAVED, FLAT)
        na = na + ba
        nb = nb + bb
    if not SHARED_TABLE:
        ca, cb = _pairs(crow, hh, HD, BHALF, sch, scd, m, INTERLEAVED, FLAT)
        sa, sb = _pairs(srow, hh, HD, BHALF, ssh, ssd, m, INTERLEAVED, FLAT)
    if FULL:  # each output element reads its own entries (neox; interleaved stack form)
        ya = na * ca - nb * sa
        yb = nb * cb + na * sb
    else:  # interleaved, half tables: a pair reads cos[2i] and sin[2i+1]
        ya = na * ca - nb * sb
        yb = na * sb + nb * ca
    y = tl.join(ya, yb)  # [heads, pairs, 2]
    if FLAT:
        if INTERLEAVED:
            y = tl.reshape(y, [HC, HD])
        else:
            y = tl.reshape(tl.permute(y, (0, 2, 1)), [HC, HD])
        tl.store(yp + tl.arange(0, HD)[None, :], y.to(Y_TY), mask=m)
    else:
        i = tl.arange(0, BHALF)[None, :, None]
        j = tl.arange(0, 2)[None, None, :]
        d = 2 * i + j if INTERLEAVED else j * (HD // 2) + i
        tl.store(yp[:, :, None] + d, y.to(Y_TY), mask=m[:, :, None] & (i < HD // 2) & (j < 2))


@triton.jit
def qk_norm_rope_kernel(
        X, W, B, COS, SIN, Y, N1, N2, H,
        sx0, sx1, sx2, sxh, sxd, sc0, sc1, sc2, sch, scd, ss0, ss1, ss2, ssh, ssd, swd, sbd, eps, EPS_T,
        ACROSS: tl.constexpr, INTERLEAVED: tl.constexpr, FULL: tl.constexpr, HAS_W: tl.constexpr,
        HAS_B: tl.constexpr, IS_RMS: tl.constexpr, LEAD: tl.constexpr, HD: tl.constexpr, HC: tl.constexpr,
        BHALF: tl.constexpr, FLAT: tl.constexpr, SHARED_TABLE: tl.constexpr, ONE_CHUNK: tl.constexpr,
        TOKENS: tl.constexpr):
    """One token, HC heads at a time: n = rms_norm(x) over all heads (ACROSS) or per head,
    or n = layer_norm(x) = (x - mean) * rsqrt(var + eps) per head (not IS_RMS); [* w] [+ b];
    y = rope(n) on pairs (a, b) = (2i, 2i+1) (interleaved) or (i, i + HD/2) (neox):
    FULL (neox, or interleaved with full tables): ya = na*cos[a] - nb*sin[a], yb = nb*cos[b] + na*sin[b];
    interleaved, half tables:                     ya = na*cos[a] - nb*sin[b], yb = na*sin[b] + nb*cos[a].
    ACROSS over several chunks: a first pass sums the squares, the second re-reads x from
    cache; ONE_CHUNK (HC >= H): x is read once and kept in registers.
    SHARED_TABLE: cos/sin are the same for every head, read once per token.
    TOKENS > 1 (one head per row, H == 1): the program takes TOKENS consecutive rows of the
    innermost leading dim as its heads (the launcher passes that dim's strides as the head
    strides), so a narrow head is not one tiny row per program.
    EPS_T (not None): eps read from this fp32 scalar in memory instead of the `eps` argument."""
    eps = tl.cast(eps, tl.float32)
    if EPS_T is not None:
        eps = tl.load(EPS_T).to(tl.float32)
    if TOKENS > 1:
        groups = tl.cdiv(N2, TOKENS)
        g = tl.program_id(0).to(tl.int64)
        t = g // groups
        i2 = (g % groups) * TOKENS
        i0 = t // N1
        i1 = t % N1
        row = t * N2 + i2
        hlim = tl.minimum(N2 - i2, TOKENS)
    else:
        row, i0, i1, i2 = _row(N1, N2, LEAD)
        hlim = H
    h = tl.arange(0, HC)[:, None]
    one = tl.arange(0, 1)[:, None]  # a single row, broadcast over the heads
    xrow = _at(X, i0, i1, i2, sx0, sx1, sx2)
    crow = _at(COS, i0, i1, i2, sc0, sc1, sc2)
    srow = _at(SIN, i0, i1, i2, ss0, ss1, ss2)
    yrow = Y + row * H * HD
    ca, cb, sa, sb = 0.0, 0.0, 0.0, 0.0  # set below where used
    if SHARED_TABLE:
        ca, cb = _pairs(crow, one, HD, BHALF, 0, scd, one < 1, INTERLEAVED, FLAT)
        sa, sb = _pairs(srow, one, HD, BHALF, 0, ssd, one < 1, INTERLEAVED, FLAT)
    tl.static_assert(IS_RMS or not ACROSS, "LayerNorm is per head only")
    if ONE_CHUNK:
        m = h < hlim
        xa, xb = _pairs(xrow, h, HD, BHALF, sxh, sxd, m, INTERLEAVED, FLAT)
        r = 1.0
        if ACROSS:
            r = tl.rsqrt(tl.sum(tl.sum(xa * xa + xb * xb, 1), 0) / (H * HD) + eps)
        _qk_chunk(xa, xb, r, eps, h, m, W, B, swd, sbd, ca, cb, sa, sb, crow, srow, sch, scd, ssh, ssd,
                  yrow + h * HD, Y.dtype.element_ty, ACROSS, INTERLEAVED, FULL, HAS_W, HAS_B, IS_RMS, HD, HC,
                  BHALF, FLAT, SHARED_TABLE)
    else:
        r = 1.0
        if ACROSS:
            acc = tl.zeros([HC, BHALF], dtype=tl.float32)
            for c in range(0, H, HC):
                xa, xb = _pairs(xrow, c + h, HD, BHALF, sxh, sxd, c + h < H, INTERLEAVED, FLAT)
                acc += xa * xa + xb * xb
            r = tl.rsqrt(tl.sum(tl.sum(acc, 1), 0) / (H * HD) + eps)
        for c in range(0, H, HC):
            hh = c + h
            m = hh < H
            xa, xb = _pairs(xrow, hh, HD, BHALF, sxh, sxd, m, INTERLEAVED, FLAT)
            _qk_chunk(xa, xb, r, eps, hh, m, W, B, swd, sbd, ca, cb, sa, sb, crow, srow, sch, scd, ssh, ssd,
                      yrow + hh * HD, Y.dtype.element_ty, ACROSS, INTERLEAVED, FULL, HAS_W, HAS_B, IS_RMS, HD,
                      HC, BHALF, FLAT, SHARED_TABLE)


# num_heads -> (heads per program chunk, num_warps) for the qk kernel, measured on an H200
# (benchmarks/tune_triton.py, 2026-12-03; 12 heads: 63 µs against 74 with the rule's (4, 4));
# other head counts use the rule in `heads_per_chunk` and `warps`.
QK_HEADS: dict[int, tuple[int, int]] = {12: (4, 2), 24: (16, 2)}


def heads_per_chunk(num_heads: int) -> int:
    """Heads processed together: QK_HEADS, else the largest of 8, 4, 2 that divides the
    head count (no masked-off rows), else a power of two covering up to 8 heads."""
    if num_heads in QK_HEADS:
        return QK_HEADS[num_heads][0]
    return next((c for c in (8, 4, 2) if num_heads % c == 0), min(8, block(num_heads)))


# elements of one program's tile when rows of a single narrow head are grouped
QK_GROUP_ELEMS = 2048


def tokens_per_program(num_heads: int, across_heads: bool, head_dim: int) -> int:
    """Rows (tokens) per program for a q/k with one head per row: as many as fit
    QK_GROUP_ELEMS (at most 16); 1 when there are several heads per row."""
    if num_heads != 1 or across_heads:
        return 1
    return max(1, min(16, QK_GROUP_ELEMS // block(head_dim)))


@triton_op("difffuse::triton_qk_norm_rope", mutates_args=())
def qk_norm_rope(x: Tensor, weight: Optional[Tensor], cos: Tensor, sin: Tensor, eps: float, num_heads: int,
                 across_heads: bool, interleaved: bool, out_dtype: torch.dtype, bias: Optional[Tensor] = None,
                 is_rms: bool = True, full_tables: bool = False, eps_t: Optional[Tensor] = None) -> Tensor:
    """eps_t: eps as a 0-d tensor (a Python float Dynamo lifted; on the CPU): copied to the
    device as fp32, the dtype the model's `mean + eps` adds it in, and read by the kernel."""
    shape = (*x.shape[:-1], num_heads, x.shape[-1] // num_heads if num_heads else 0) if across_heads \
        else tuple(x.shape)
    y = torch.empty(shape, dtype=out_dtype, device=x.device)
    if empty(shape):
        return y
    xv = x.unflatten(-1, (num_heads, -1)) if across_heads else x
    hd = shape[-1]
    hc, bhalf = heads_per_chunk(num_heads), block(hd // 2)
    sizes, (sx, sc, ss), lead = index_plan(shape, [xv, cos, sin], inner=2)
    shared = statically_known_true(sc[3] == 0) and statically_known_true(ss[3] == 0)
    tokens, grid = tokens_per_program(num_heads, across_heads, hd), rows(shape, 2)
    if tokens > 1:  # rows of the innermost leading dim become the program's heads
        hc, shared = tokens, False
        sx[3], sc[3], ss[3] = sx[2], sc[2], ss[2]
        grid = grid // sizes[1] * ((sizes[1] + tokens - 1) // tokens)
    launch(qk_norm_rope_kernel, (grid,), xv, weight, bias, cos, sin, y, *sizes, num_heads, *sx, *sc, *ss,
           vstride(weight), vstride(bias), eps,
           None if eps_t is None else eps_t.to(device=x.device, dtype=torch.float32).reshape(1),
           ACROSS=across_heads, INTERLEAVED=interleaved,
           FULL=full_tables or not interleaved, HAS_W=weight is not None, HAS_B=bias is not None,
           IS_RMS=is_rms, LEAD=lead, HD=hd, HC=hc,
           BHALF=bhalf, FLAT=hd == 2 * bhalf, SHARED_TABLE=shared, ONE_CHUNK=hc >= num_heads, TOKENS=tokens,
           num_warps=QK_HEADS[num_heads][1] if num_heads in QK_HEADS and tokens == 1
           else warps(hc * bhalf * 2, "qk_norm_rope"))
    return y


# ------------------------------------------------------------------ float8 row quantisation
# The fp8 twins of the rms_norm, scale_shift and norm_scale_shift kernels (issue 29,
# docs/fp8.md §5): the same math in the same order (y is bit-identical to the plain
# kernel's), then y's row is quantised in registers as Inductor compiles torchao's
# quantisation of y read back from memory: amax over the out_dtype-rounded values (NaN
# propagating, as Inductor's `maximum`), s = amax * fp32(1/448) (1.0 for a zero row),
# q = fp8e4m3(min(max(y / s, -448), 448)) with Triton's fp32 `/`. y is written only if
# STORE_Y (something else reads it).
@triton.jit
def _nan_max(a, b):
    return tl.where((a > b) | (a != a), a, b)


@triton.jit
def _fp8_row(yo, m, Q, S, row, D: tl.constexpr, PER_ROW: tl.constexpr):
    """Quantise one row `yo` (already rounded to the op's out dtype) into Q[row], S[row];
    not PER_ROW: only the row's amax into S[row] (the caller reduces them to the tensor's)."""
    yf = yo.to(tl.float32)
    amax = tl.reduce(tl.where(m, tl.abs(yf), 0.0), 0, _nan_max)
    if PER_ROW:
        s = amax * 0.002232142857142857
        s = tl.where(amax == 0.0, 1.0, s)
        q = yf / s
        q = tl.where((q > -448.0) | (q != q), q, -448.0)
        q = tl.where((q < 448.0) | (q != q), q, 448.0)
        cols = tl.arange(0, yo.shape[0])
        tl.store(Q + row * D + cols, q.to(Q.dtype.element_ty), mask=m)
        tl.store(S + row, s)
    else:
        tl.store(S + row, amax)


@triton.jit
def rms_norm_fp8_kernel(X, W, Y, Q, S, N1, N2, sx0, sx1, sx2, sxd, swd, eps, D: tl.constexpr,
                        HAS_W: tl.constexpr, LEAD: tl.constexpr, BLOCK: tl.constexpr, STORE_Y: tl.constexpr,
                        PER_ROW: tl.constexpr):
    """rms_norm_kernel, then its row quantised (_fp8_row)."""
    eps = tl.cast(eps, tl.float32)
    row, i0, i1, i2 = _row(N1, N2, LEAD)
    cols = tl.arange(0, BLOCK)
    m = cols < D
    x = tl.load(_at(X, i0, i1, i2, sx0, sx1, sx2) + cols * sxd, mask=m, other=0.0).to(tl.float32)
    y = x * tl.rsqrt(tl.sum(x * x, 0) / D + eps)
    if HAS_W:
        y = y * tl.load(W + cols * swd, mask=m, other=0.0).to(tl.float32)
    yo = y.to(Y.dtype.element_ty)
    if STORE_Y:
        tl.store(Y + row * D + cols, yo, mask=m)
    _fp8_row(yo, m, Q, S, row, D, PER_ROW)


@triton.jit
def scale_shift_fp8_kernel(A, B, C, Y, Q, S, N1, N2, sa0, sa1, sa2, sad, sb0, sb1, sb2, sbd,
                           sc0, sc1, sc2, scd, k, D: tl.constexpr, HAS_C: tl.constexpr, LEAD: tl.constexpr,
                           BLOCK: tl.constexpr, STORE_Y: tl.constexpr,
        PER_ROW: tl.constexpr):
    """scale_shift_kernel, then its row quantised (_fp8_row)."""
    k = tl.cast(k, tl.float32)
    row, i0, i1, i2 = _row(N1, N2, LEAD)
    cols = tl.arange(0, BLOCK)
    m = cols < D
    a = tl.load(_at(A, i0, i1, i2, sa0, sa1, sa2) + cols * sad, mask=m).to(tl.float32)
    b = tl.load(_at(B, i0, i1, i2, sb0, sb1, sb2) + cols * sbd, mask=m).to(tl.float32)
    y = a * (b + k)
    if HAS_C:
        y = y + tl.load(_at(C, i0, i1, i2, sc0, sc1, sc2) + cols * scd, mask=m).to(tl.float32)
    yo = y.to(Y.dtype.element_ty)
    if STORE_Y:
        tl.store(Y + row * D + cols, yo, mask=m)
    _fp8_row(yo, m, Q, S, row, D, PER_ROW)


@triton.jit
def norm_scale_shift_fp8_kernel(
        X, RES, G, W, BIAS, SC, SH, OUT, R, Q, S, N1, N2,
        sx0, sx1, sx2, sxd, sr0, sr1, sr2, srd, sg0, sg1, sg2, sgd,
        ss0, ss1, ss2, ssd, sh0, sh1, sh2, shd, swd, sbd, eps, k, D: tl.constexpr,
        HAS_RES: tl.constexpr, HAS_G: tl.constexpr, HAS_W: tl.constexpr, HAS_BIAS: tl.constexpr,
        HAS_SC: tl.constexpr, HAS_SH: tl.constexpr, IS_RMS: tl.constexpr, STORE_R: tl.constexpr,
        LEAD: tl.constexpr, BLOCK: tl.constexpr, STORE_Y: tl.constexpr,
        PER_ROW: tl.constexpr):
    """norm_scale_shift_kernel, then its row quantised (_fp8_row)."""
    eps = tl.cast(eps, tl.float32)
    k = tl.cast(k, tl.float32)
    row, i0, i1, i2 = _row(N1, N2, LEAD)
    cols = tl.arange(0, BLOCK)
    m = cols < D
    x = tl.load(_at(X, i0, i1, i2, sx0, sx1, sx2) + cols * sxd, mask=m, other=0.0).to(tl.float32)
    if HAS_G:
        x = x * tl.load(_at(G, i0, i1, i2, sg0, sg1, sg2) + cols * sgd, mask=m, other=0.0).to(tl.float32)
    if HAS_RES:
        x = x + tl.load(_at(RES, i0, i1, i2, sr0, sr1, sr2) + cols * srd, mask=m, other=0.0).to(tl.float32)
    if STORE_R:
        r = x.to(R.dtype.element_ty)
        tl.store(R + row * D + cols, r, mask=m)
        r = r.to(tl.float32)
    else:
        r = x
    if IS_RMS:
        n = r * tl.rsqrt(tl.sum(r * r, 0) / D + eps)
    else:
        diff = tl.where(m, r - tl.sum(r, 0) / D, 0.0)
        n = diff * tl.rsqrt(tl.sum(diff * diff, 0) / D + eps)
    if HAS_W:
        n = n * tl.load(W + cols * swd, mask=m, other=0.0).to(tl.float32)
    if HAS_BIAS:
        n = n + tl.load(BIAS + cols * sbd, mask=m, other=0.0).to(tl.float32)
    if HAS_SC:
        n = n * (tl.load(_at(SC, i0, i1, i2, ss0, ss1, ss2) + cols * ssd, mask=m, other=0.0).to(tl.float32) + k)
    if HAS_SH:
        n = n + tl.load(_at(SH, i0, i1, i2, sh0, sh1, sh2) + cols * shd, mask=m, other=0.0).to(tl.float32)
    yo = n.to(OUT.dtype.element_ty)
    if STORE_Y:
        tl.store(OUT + row * D + cols, yo, mask=m)
    _fp8_row(yo, m, Q, S, row, D, PER_ROW)


def _fp8_outputs(shape, out_dtype, device, store_y: bool, per_row: bool):
    """y (empty unless stored), q (empty unless per row), s: the row scales, or per tensor
    the rows' amax (fp32 [.., 1] either way)."""
    y = torch.empty(shape if store_y else (0,), dtype=out_dtype, device=device)
    q = torch.empty(shape if per_row else (0,), dtype=torch.float8_e4m3fn, device=device)
    s = torch.empty((*shape[:-1], 1), dtype=torch.float32, device=device)
    return y, q, s


@triton_op("difffuse::triton_rms_norm_fp8", mutates_args=())
def rms_norm_fp8(x: Tensor, weight: Optional[Tensor], eps: float, out_dtype: torch.dtype,
                 store_y: bool, per_row: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    shape = torch.broadcast_shapes(x.shape, weight.shape) if weight is not None else x.shape
    y, q, s = _fp8_outputs(shape, out_dtype, x.device, store_y, per_row)
    if empty(shape):
        return y, q, s
    d = shape[-1]
    b = block(d)
    sizes, (sx,), lead = index_plan(shape, [x])
    launch(rms_norm_fp8_kernel, (rows(shape),), x, weight, y, q, s, *sizes, *sx, vstride(weight), eps, D=d,
           HAS_W=weight is not None, LEAD=lead, BLOCK=b, STORE_Y=store_y, PER_ROW=per_row,
           num_warps=warps(b, "rms_norm"))
    return y, q, s


@triton_op("difffuse::triton_scale_shift_fp8", mutates_args=())
def scale_shift_fp8(a: Tensor, b: Tensor, c: Optional[Tensor], k: float, out_dtype: torch.dtype,
                    store_y: bool, per_row: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    shape = torch.broadcast_shapes(a.shape, b.shape, *([c.shape] if c is not None else []))
    y, q, s = _fp8_outputs(shape, out_dtype, a.device, store_y, per_row)
    if empty(shape):
        return y, q, s
    d = shape[-1]
    bl = block(d)
    sizes, (sa, sb, sc), lead = index_plan(shape, [a, b, c])
    launch(scale_shift_fp8_kernel, (rows(shape),), a, b, c, y, q, s, *sizes, *sa, *sb, *sc, k, D=d,
           HAS_C=c is not None, LEAD=lead, BLOCK=bl, STORE_Y=store_y, PER_ROW=per_row,
           num_warps=warps(bl, "scale_shift"))
    return y, q, s


@triton_op("difffuse::triton_norm_scale_shift_fp8", mutates_args=())
def norm_scale_shift_fp8(x: Tensor, residual: Optional[Tensor], gate: Optional[Tensor], weight: Optional[Tensor],
                         bias: Optional[Tensor], scale: Optional[Tensor], shift: Optional[Tensor], eps: float,
                         k: float, is_rms: bool, residual_dtype: torch.dtype, out_dtype: torch.dtype,
                         store_r: bool, store_y: bool, per_row: bool = True) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(y | empty, r | empty (not store_r), q, s) as `_fp8_outputs` says; y's shape is the
    residual's (the CUDA rule takes no modulation that widens it)."""
    shape = torch.broadcast_shapes(*[t.shape for t in (x, residual, gate) if t is not None])
    y, q, s = _fp8_outputs(shape, out_dtype, x.device, store_y, per_row)
    r = torch.empty(shape if store_r else (0,), dtype=residual_dtype, device=x.device)
    if empty(shape):
        return y, r, q, s
    d = shape[-1]
    bl = block(d)
    sizes, (sx, sr, sg, ss, sh), lead = index_plan(shape, [x, residual, gate, scale, shift])
    launch(norm_scale_shift_fp8_kernel, (rows(shape),),
           x, residual, gate, weight, bias, scale, shift, y, r if store_r else None, q, s, *sizes, *sx, *sr, *sg,
           *ss, *sh, vstride(weight), vstride(bias), eps, k, D=d,
           HAS_RES=residual is not None, HAS_G=gate is not None, HAS_W=weight is not None,
           HAS_BIAS=bias is not None, HAS_SC=scale is not None, HAS_SH=shift is not None,
           IS_RMS=is_rms, STORE_R=store_r, LEAD=lead, BLOCK=bl, STORE_Y=store_y, PER_ROW=per_row,
           num_warps=warps(bl, "norm_scale_shift" if store_r else "norm_modulate"))
    return y, r, q, s
