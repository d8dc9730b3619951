"""Attention per call at diffusion shapes: every installed exact kernel vs the one difffuse
routes to, on the `[B, H, L, D]` views of `[B, L, H, D]` memory that diffusers hands SDPA.

Columns: SDPA's cuDNN and flash (FA2) backends, FA3 and FA4 through difffuse's op
(`difffuse::flash_attention`, the call the compiled graph makes), and difffuse: the compiled
`F.scaled_dot_product_attention` with the default backend options (the kernel it chose is
named). Times are medians (triton do_bench, L2 flushed), kernels alternated per shape; the
percentage is of the GPU's dense bf16 tensor peak (4·B·H·Lq·Lkv·D flop per call). Also
the relative error vs an fp32 reference on a slice of query rows, and FA4's first-call
cost in a fresh process, cold and with its on-disk compile cache.

    python -m benchmarks.attention [--fa3-module NAME] [--cold-start] [--kv-sweep] [--shapes NAME,...] [--csv PATH]

(with --csv: the per-call table in PATH, the error table and the key-count sweep next to it,
PATH's stem + `.rel_err` / `.kv_sweep`)
"""
from __future__ import annotations

import argparse
import importlib
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

from benchmarks import harness

SHAPES = {  # name: (B, Lq, Lkv, H, D)
    "Wan 1.3B self": (1, 32760, 32760, 12, 128),
    "Wan 14B self": (1, 32760, 32760, 40, 128),
    "Wan 5B self": (1, 27280, 27280, 24, 128),
    "Wan cross": (1, 32760, 512, 12, 128),
    "Flux joint": (1, 4608, 4608, 24, 128),
    "CogVideoX (D=64)": (1, 17776, 17776, 48, 64),
}
ROUNDS = 3
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "B200": 2250e12}


def peak() -> float:
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_BF16.items() if k in name), float("nan"))


def sdpa(backend):
    from torch.nn.attention import sdpa_kernel

    def fn(q, k, v):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v)
    return fn


def kernels() -> dict:
    from torch.nn.attention import SDPBackend

    from difffuse.lowering import flash_attention as fa

    out = {"cuDNN (SDPA)": sdpa(SDPBackend.CUDNN_ATTENTION), "FA2 (SDPA flash)": sdpa(SDPBackend.FLASH_ATTENTION)}
    major = torch.cuda.get_device_capability()[0]
    for name, k in fa.KERNELS.items():
        why = k.available() or (None if major in k.arches else f"not on SM{major}x")
        if why:
            print(f"{name}: {why}")
            continue
        out[name.upper()] = (lambda n: lambda q, k_, v: torch.ops.difffuse.flash_attention(q, k_, v, None, False, n)[0])(name)
    return out


def rel_err(out, q, k, v, rows=256) -> float:
    idx = torch.arange(0, q.shape[2], max(1, q.shape[2] // rows), device="cuda")[:rows]
    s = (q[:, :, idx].float() @ k.float().transpose(-1, -2)) / math.sqrt(q.shape[-1])
    ref = torch.softmax(s, -1) @ v.float()
    return ((out[:, :, idx].float() - ref).norm() / ref.norm()).item()


def per_call(fa3_module: str | None, csv: str | None = None) -> None:
    import difffuse
    from difffuse.lowering import flash_attention as fa

    fns = kernels()
    rows, errs = [], []
    for name, (b, lq, lkv, h, d) in SHAPES.items():
        q = torch.randn(b, lq, h, d, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
        k, v = (torch.randn(b, lkv, h, d, device="cuda", dtype=torch.bfloat16).transpose(1, 2) for _ in range(2))
        torch._dynamo.reset()
        difffuse.reset_report()
        comp = torch.compile(lambda q, k, v: F.scaled_dot_product_attention(q, k, v), backend="difffuse")
        with torch.no_grad():
            comp(q, k, v)
        site = fa.AttentionSite(*(fa.TensorSpec.of(t) for t in (q, k, v)), None, False, False)
        chosen = fa.choose(site)[0] or "SDPA (left)"
        row = {"shape (B, Lq, Lkv, H, D)": f"{name} {(b, lq, lkv, h, d)}"}
        runs = {**fns, f"difffuse ({chosen})": comp}
        times = {kname: [] for kname in runs}
        with torch.no_grad():
            for kname, fn in runs.items():
                errs.append((name, kname, rel_err(fn(q, k, v), q, k, v)))
            for _ in range(ROUNDS):  # kernels alternated, median over rounds
                for kname, fn in runs.items():
                    times[kname].append(harness.bench_ms(lambda: fn(q, k, v), rep=300 if lq > 20000 else 150))
        times = {kname: statistics.median(ts) for kname, ts in times.items()}
        best = min(t for n, t in times.items() if not n.startswith("difffuse"))
        flop = 4 * b * h * lq * lkv * d
        for kname, t in times.items():
            row[kname] = f"{t:.3f} ({100 * flop / (t * 1e-3) / peak():.0f}%)"
        ours = next(t for n, t in times.items() if n.startswith("difffuse"))
        row["difffuse vs fastest"] = f"{best / ours:.3f}x"
        rows.append(row)
        print(row, flush=True)
    cols = list(dict.fromkeys(c for r in rows for c in r))
    print("\nms per call (% of dense bf16 peak)" + (f"; FA3 = module {fa3_module}" if fa3_module else ""))
    print(harness.table(rows, cols, csv=csv))
    print("\nrelative error vs fp32 (256 query rows)")
    print(harness.table([{"shape": s, "kernel": k, "rel err": f"{e:.2e}"} for s, k, e in errs],
                        ["shape", "kernel", "rel err"], csv=harness.csv_path(csv, "rel_err")))


COLD = """
import time, torch, os
t = time.perf_counter()
import flash_attn.cute
q = torch.randn(1, 4096, 12, 128, device="cuda", dtype=torch.bfloat16)
t1 = time.perf_counter()
flash_attn.cute.flash_attn_func(q, q, q, return_lse=True); torch.cuda.synchronize()
t2 = time.perf_counter()
flash_attn.cute.flash_attn_func(q, q, q, return_lse=True); torch.cuda.synchronize()
t3 = time.perf_counter()
print(f"import {t1 - t:.2f} s, first call {t2 - t1:.2f} s, second call {1e3 * (t3 - t2):.1f} ms")
"""


def cold_start() -> None:
    """FA4's first call in a fresh process: with an empty cache dir, then again (disk cache)."""
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED="1", FLASH_ATTENTION_CUTE_DSL_CACHE_DIR=cache)
        for label in ("cold (empty cache)", "second process (disk cache)"):
            out = subprocess.run([sys.executable, "-c", COLD], env=env, capture_output=True, text=True)
            print(f"FA4 {label}: {out.stdout.strip() or out.stderr.strip()[-300:]}")


def kv_sweep(csv: str | None = None) -> None:
    """Where FA4 overtakes cuDNN as the key count grows (Wan 1.3B's 32760 queries, 12 heads)."""
    fns = kernels()
    rows = []
    for lkv in (512, 1024, 1536, 2048, 3072, 4096, 8192):
        q = torch.randn(1, 32760, 12, 128, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
        k, v = (torch.randn(1, lkv, 12, 128, device="cuda", dtype=torch.bfloat16).transpose(1, 2) for _ in range(2))
        ts = {n: [] for n in fns}
        with torch.no_grad():
            for _ in range(ROUNDS):
                for n, fn in fns.items():
                    ts[n].append(harness.bench_ms(lambda: fn(q, k, v), rep=100))
        rows.append({"Lkv": lkv, **{n: f"{statistics.median(t):.3f}" for n, t in ts.items()}})
    print("\nms per call, (1, 32760, Lkv, 12, 128) bf16")
    print(harness.table(rows, list(rows[0]), csv=harness.csv_path(csv, "kv_sweep")))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--fa3-module", default=None,
                    help="a module with FA3's flash_attn_func to use as flash_attn_interface (a local build)")
    ap.add_argument("--cold-start", action="store_true")
    ap.add_argument("--kv-sweep", action="store_true")
    ap.add_argument("--shapes", default=None, help="comma-separated subset of the shape names")
    harness.add_csv_arg(ap, "the error table and the key-count sweep to PATH's stem + .rel_err / .kv_sweep")
    a = ap.parse_args()
    if a.fa3_module:
        sys.modules["flash_attn_interface"] = importlib.import_module(a.fa3_module)
    if a.shapes:
        keep = a.shapes.split(",")
        for s in list(SHAPES):
            if s not in keep:
                del SHAPES[s]
    print(harness.header())
    t = time.perf_counter()
    per_call(a.fa3_module, a.csv)
    print(f"\n(per-call tables took {time.perf_counter() - t:.0f} s)")
    if a.kv_sweep:
        kv_sweep(a.csv)
    if a.cold_start:
        cold_start()


if __name__ == "__main__":
    main()
