"""The two qk-norm+rope kernels side by side (bf16, Wan shapes, tables fp32): the Triton
kernel and the JIT CUDA C++ kernel, each called directly (µs, L2 flushed) and checked
against the reference op.

    python -m benchmarks.qk_candidates [--csv PATH]
"""
from __future__ import annotations

import argparse

import torch
from torch._library.triton import set_wrap_triton_enabled

from benchmarks import harness
from difffuse.lowering import cuda_jit, ops
from difffuse.lowering import triton_kernels as tk

L = 32760


def main():
    ap = argparse.ArgumentParser()
    harness.add_csv_arg(ap)
    a = ap.parse_args()
    bw = harness.copy_bandwidth()
    print(harness.header())
    why = cuda_jit.available()
    print(f"JIT kernel: {'available' if why is None else why}")
    rows = []
    for heads, hd, inter in [(12, 128, True), (24, 128, True), (40, 128, True), (12, 128, False), (24, 64, True)]:
        x = torch.randn(1, L, heads * hd, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(heads * hd, device="cuda", dtype=torch.bfloat16)
        ang = torch.rand(1, L, 1, hd // 2, device="cuda") * 6.28
        cos, sin = ang.cos().repeat_interleave(2, -1), ang.sin().repeat_interleave(2, -1)
        args = (x, w, cos, sin, 1e-6, heads, True, inter, torch.bfloat16)
        ref = ops.qk_norm_rope_ref(*args)
        floor = (2 * x.numel() * 2 + 2 * L * hd * 4) / bw * 1e6
        row = {"shape": f"{heads}x{hd} {'interleaved' if inter else 'neox'}", "floor µs": f"{floor:.1f}"}
        cands = {"triton": tk.qk_norm_rope}
        if why is None:
            cands["jit"] = cuda_jit.qk_norm_rope
        with set_wrap_triton_enabled(False):
            for name, fn in cands.items():
                err = (fn(*args).float() - ref.float()).abs().max().item()
                us = harness.bench_ms(lambda: fn(*args)) * 1e3
                row[f"{name} µs"] = f"{us:.1f}"
                row[f"{name} max|err|"] = f"{err:.3g}"
        rows.append(row)
        print(row, flush=True)
    print()
    print(harness.table(rows, list(rows[0]), csv=a.csv))


if __name__ == "__main__":
    main()
