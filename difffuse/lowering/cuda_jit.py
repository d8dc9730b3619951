"""The just-in-time compiled CUDA C++ qk-norm + rope kernel (NVRTC through `cuda.core`).

One thread block per token, 8 warps; each warp takes heads h = warp, warp + 8, ...; each
lane holds HD/64 (a, b) pairs: (2i, 2i+1) interleaved or (i, i + HD/2) neox. The norm is
over all heads (a block reduction, then q is re-read from cache) or per head (a warp
reduction). fp32 math; bf16/fp16/fp32 q/k, weights and tables; head_dim 64/128/256; q/k
with a contiguous last dim; weights and tables read with their strides; RMSNorm without a
bias, and interleaved tables read half (a pair reads cos[2i] and sin[2i+1]) — the stack
form's full tables, LayerNorm q/k and the rest are the Triton kernel's (`supports`).
Compiled at first use for the device's architecture and cached on disk
(``$DIFFFUSE_CACHE_DIR`` or ``~/.cache/difffuse/jit``); users need no nvcc.
`available()` says why it cannot be used (no cuda.core, no GPU, a failed build) and the
CUDA lowering then keeps the Triton kernel, with one log line.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

from .sites import QKNormRopeSite, known, specs

log = logging.getLogger("difffuse")
NWARPS = 8
HEAD_DIMS = (64, 128, 256)
CTYPE = {torch.float32: "float", torch.bfloat16: "__nv_bfloat16", torch.float16: "__half"}

SOURCE = r"""
#include <cuda_bf16.h>
#include <cuda_fp16.h>
__device__ __forceinline__ float ld(const float* p) { return *p; }
__device__ __forceinline__ float ld(const __nv_bfloat16* p) { return __bfloat162float(*p); }
__device__ __forceinline__ float ld(const __half* p) { return __half2float(*p); }
__device__ __forceinline__ void st(float* p, float v) { *p = v; }
__device__ __forceinline__ void st(__nv_bfloat16* p, float v) { *p = __float2bfloat16(v); }
__device__ __forceinline__ void st(__half* p, float v) { *p = __float2half(v); }
__device__ __forceinline__ float warp_sum(float v) {
  for (int o = 16; o; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
constexpr int PPL = HD / 64;  // pairs per lane
__device__ __forceinline__ int ia(int lane, int j) { int p = lane * PPL + j; return INTERLEAVED ? 2 * p : p; }
__device__ __forceinline__ int ib(int lane, int j) { int p = lane * PPL + j; return INTERLEAVED ? 2 * p + 1 : p + HD / 2; }

extern "C" __global__ void __launch_bounds__(NWARPS * 32) qk_norm_rope(
    const T_X* __restrict__ x, const T_W* __restrict__ w, const T_T* __restrict__ cosp,
    const T_T* __restrict__ sinp, T_Y* __restrict__ y, long long N1, long long N2, int H,
    long long sx0, long long sx1, long long sx2, long long sxh,
    long long sc0, long long sc1, long long sc2, long long sch, long long scd,
    long long ss0, long long ss1, long long ss2, long long ssh, long long ssd, long long sw, float eps) {
  const long long row = blockIdx.x;
  const long long i2 = row % N2, t = row / N2, i1 = t % N1, i0 = t / N1;
  const T_X* xr = x + i0 * sx0 + i1 * sx1 + i2 * sx2;
  const T_T* cr = cosp + i0 * sc0 + i1 * sc1 + i2 * sc2;
  const T_T* sr = sinp + i0 * ss0 + i1 * ss1 + i2 * ss2;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  float r_all = 0.f;
#if ACROSS
  __shared__ float red[NWARPS];
  float acc = 0.f;
  for (int h = warp; h < H; h += NWARPS) {
#pragma unroll
    for (int j = 0; j < PPL; ++j) {
      float a = ld(xr + h * sxh + ia(lane, j)), b = ld(xr + h * sxh + ib(lane, j));
      acc += a * a + b * b;
    }
  }
  acc = warp_sum(acc);
  if (lane == 0) red[warp] = acc;
  __syncthreads();
  float tot = 0.f;
#pragma unroll
  for (int k = 0; k < NWARPS; ++k) tot += red[k];
  r_all = rsqrtf(tot / (float)(H * HD) + eps);
#endif
  for (int h = warp; h < H; h += NWARPS) {
    float a[PPL], b[PPL], sq = 0.f;
#pragma unroll
    for (int j = 0; j < PPL; ++j) {
      a[j] = ld(xr + h * sxh + ia(lane, j));
      b[j] = ld(xr + h * sxh + ib(lane, j));
      sq += a[j] * a[j] + b[j] * b[j];
    }
#if ACROSS
    const float r = r_all;
#else
    const float r = rsqrtf(warp_sum(sq) / (float)HD + eps);
#endif
    T_Y* yh = y + (row * H + h) * HD;
#pragma unroll
    for (int j = 0; j < PPL; ++j) {
      const int pa = ia(lane, j), pb = ib(lane, j);
      float na = a[j] * r, nb = b[j] * r;
#if HAS_W
      const T_W* wh = w + (ACROSS ? (long long)h * HD * sw : 0);
      na *= ld(wh + pa * sw);
      nb *= ld(wh + pb * sw);
#endif
      const float ca = ld(cr + h * sch + pa * scd), sb = ld(sr + h * ssh + pb * ssd);
#if INTERLEAVED
      st(yh + pa, na * ca - nb * sb);
      st(yh + pb, na * sb + nb * ca);
#else
      const float sa = ld(sr + h * ssh + pa * ssd), cb = ld(cr + h * sch + pb * scd);
      st(yh + pa, na * ca - nb * sa);
      st(yh + pb, nb * cb + na * sb);
#endif
    }
  }
}
"""


def _include_dirs() -> list[str]:
    """Where cuda_bf16.h / cuda_fp16.h are: cuda-pathfinder's answer, else $CUDA_HOME."""
    try:
        from cuda.pathfinder import find_nvidia_header_directory

        found = find_nvidia_header_directory("cudart")
        if found:
            return [str(found)]
    except ImportError:
        pass
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    return [os.path.join(home, "include")]


def _cache_dir() -> Path:
    return Path(os.environ.get("DIFFFUSE_CACHE_DIR", Path.home() / ".cache" / "difffuse")) / "jit"


@functools.lru_cache(maxsize=None)
def _kernel(arch: str, defines: tuple):
    """The compiled kernel for these macro values: from the disk cache, else NVRTC."""
    from cuda.core import ObjectCode, Program, ProgramOptions

    key = hashlib.sha256(f"{SOURCE}{arch}{defines}".encode()).hexdigest()[:24]
    path = _cache_dir() / f"qk_norm_rope-{key}.cubin"
    if path.exists():
        return ObjectCode.from_cubin(path.read_bytes()).get_kernel("qk_norm_rope")
    opts = ProgramOptions(arch=arch, std="c++17", define_macro=[(k, str(v)) for k, v in defines],
                          include_path=_include_dirs())
    obj = Program(SOURCE, "c++", options=opts).compile("cubin")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_bytes(bytes(obj.code))
    tmp.replace(path)
    return obj.get_kernel("qk_norm_rope")


def _arch(device: torch.device) -> str:
    major, minor = torch.cuda.get_device_capability(device)
    return f"sm_{major}{minor}"


def _lead3(t: Tensor, shape, inner: int) -> list:
    st = list(t.expand(shape).stride())
    lead = st[: len(shape) - inner]
    return [0] * (3 - len(lead)) + lead + st[len(shape) - inner:]


def qk_norm_rope(x: Tensor, weight: Optional[Tensor], cos: Tensor, sin: Tensor, eps: float, num_heads: int,
                 across_heads: bool, interleaved: bool, out_dtype: torch.dtype) -> Tensor:
    """difffuse::qk_norm_rope through the JIT kernel (same contract as the reference op)."""
    from cuda.core import LaunchConfig, launch

    xv = x.unflatten(-1, (num_heads, -1)) if across_heads else x
    shape = xv.shape
    hd = shape[-1]
    y = torch.empty(shape, dtype=out_dtype, device=x.device)
    if any(s == 0 for s in shape):
        return y
    w = weight
    sw = w.stride(-1) if w is not None and w.ndim and w.shape[-1] != 1 else 0
    dt = {t.dtype for t in (cos, sin)}
    tab_t = cos.dtype if len(dt) == 1 else torch.float32
    cos, sin = cos.to(tab_t), sin.to(tab_t)
    defines = (("T_X", CTYPE[x.dtype]), ("T_W", CTYPE[w.dtype if w is not None else torch.float32]),
               ("T_T", CTYPE[tab_t]), ("T_Y", CTYPE[out_dtype]), ("HD", hd),
               ("INTERLEAVED", int(interleaved)), ("ACROSS", int(across_heads)), ("HAS_W", int(w is not None)),
               ("NWARPS", NWARPS))
    kernel = _kernel(_arch(x.device), defines)
    lead = list(shape[:-2])
    n1, n2 = ([1] * (3 - len(lead)) + lead)[1:]
    sx = _lead3(xv, shape, 2)[:4]
    sc, ss = _lead3(cos, shape, 2), _lead3(sin, shape, 2)
    rows = 1
    for s in lead:
        rows *= s
    p = ctypes.c_uint64
    i64 = ctypes.c_int64
    args = [p(xv.data_ptr()), p(w.data_ptr() if w is not None else 0), p(cos.data_ptr()), p(sin.data_ptr()),
            p(y.data_ptr()), i64(n1), i64(n2), ctypes.c_int32(num_heads), *map(i64, sx), *map(i64, sc),
            *map(i64, ss), i64(sw), ctypes.c_float(eps)]
    launch(torch.cuda.current_stream(x.device), LaunchConfig(grid=rows, block=NWARPS * 32), kernel, *args)
    return y


@torch.library.custom_op("difffuse::cuda_jit_qk_norm_rope", mutates_args=())
def jit_op(x: Tensor, weight: Optional[Tensor], cos: Tensor, sin: Tensor, eps: float, num_heads: int,
           across_heads: bool, interleaved: bool, out_dtype: torch.dtype) -> Tensor:
    return qk_norm_rope(x, weight, cos, sin, eps, num_heads, across_heads, interleaved, out_dtype)


@jit_op.register_fake
def _(x, weight, cos, sin, eps, num_heads, across_heads, interleaved, out_dtype):
    shape = (*x.shape[:-1], num_heads, x.shape[-1] // num_heads) if across_heads else tuple(x.shape)
    return x.new_empty(shape, dtype=out_dtype)


def supports(site: QKNormRopeSite) -> Optional[str]:
    """None if the JIT kernel computes this qk_norm_rope call (a typed record); else why
    not (the CUDA lowering then launches the Triton kernel, which `cuda.supports` judged)."""
    x = site.x
    if not site.is_rms or site.bias is not None:
        return "LayerNorm or a bias on q/k: the JIT kernel is RMSNorm [* w] only"
    if site.full_tables:
        return "full rope tables (the stack form): the JIT kernel reads cos[2i] and sin[2i+1] of a pair only"
    if site.eps_tensor:
        return "eps is a 0-d tensor input (a lifted Python float): the JIT kernel takes a constant"
    if any(t.dtype not in CTYPE for t in specs(site)):
        return f"dtypes {sorted({str(t.dtype) for t in specs(site)})}: the JIT kernel takes fp16/bf16/fp32"
    if any(t.device != "cuda" for t in specs(site)):
        return "the JIT kernel needs CUDA tensors"
    if any(t.has_zero_dim() for t in specs(site)):
        return "zero-size operand: left to Inductor"
    shape = site.out_shape
    hd = shape[-1]
    if hd not in HEAD_DIMS:
        return f"head_dim {hd} (the JIT kernel takes {HEAD_DIMS})"
    if not x.last_stride_is_one():
        return "q/k last dim not contiguous"
    if len(shape) - 2 > 3:
        return "more than 3 leading dims"
    width = x.shape[-1]
    w = site.weight
    if w is not None and (w.ndim == 0 or not known(w.shape[-1] == width) or not known(w.numel() == width)):
        return f"weight of shape {tuple(w.shape)} is not one value per column ({width})"
    return None


@functools.lru_cache(maxsize=1)
def available() -> Optional[str]:
    """None if the JIT kernel can be built here; else why not (logged once)."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    try:
        import cuda.core  # noqa: F401

        if not torch.cuda.is_available():
            return "no CUDA device"
        with unset_fake_temporarily():  # asked while the pass traces with fake tensors: build on real ones
            x, t = torch.randn(1, 2, 128, device="cuda"), torch.ones(1, 2, 1, 128, device="cuda")
            qk_norm_rope(x, None, t, t, 1e-6, 1, True, True, torch.float32)
        return None
    except Exception as exc:  # noqa: BLE001  (any build or launch failure: keep Triton)
        why = f"{type(exc).__name__}: {exc}"
        log.warning("difffuse: the JIT CUDA qk-norm+rope kernel is unavailable (%s); using the Triton kernel", why)
        return why
