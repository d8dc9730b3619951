"""Why a difffuse Triton kernel runs slower inside the compiled graph than launched
directly (rms_norm D=5120: 217 vs 165 µs on an H200): time both with the profiler and
print the launch metadata Inductor generates for it.

    python -m benchmarks.graph_kernel_probe
"""
from __future__ import annotations

import re

import torch
from torch import nn
from torch._inductor.utils import run_and_get_code
from torch._library.triton import set_wrap_triton_enabled

import difffuse  # noqa: F401
from benchmarks import harness
from benchmarks.harness import gpu_us
from difffuse.lowering import cuda

BF16, F32 = torch.bfloat16, torch.float32
L = 32760


def main():
    print(harness.header())
    for d in (5120, 1536):
        x = torch.randn(1, L, d, device="cuda", dtype=BF16)
        m = nn.RMSNorm(d, eps=1e-6, dtype=BF16, device="cuda")
        with torch.no_grad():
            with set_wrap_triton_enabled(False):
                direct, _ = gpu_us(lambda: cuda.IMPLS["rms_norm"](x, m.weight, 1e-6, BF16))  # noqa: B023
            comp = torch.compile(m, backend="difffuse")
            _, codes = run_and_get_code(comp, x)
            graph, _ = gpu_us(lambda: comp(x))  # noqa: B023
            direct2, _ = gpu_us(lambda: cuda.IMPLS["rms_norm"](x, m.weight, 1e-6, BF16))  # noqa: B023
        print(f"\nrms_norm D={d}: direct launch {direct:.1f} µs ({direct2:.1f} µs wrapped), in graph {graph:.1f} µs")
        for code in codes:
            for line in code.splitlines():
                if re.search(r"triton_meta=|num_warps|\.run\(|grid=|def rms_norm_kernel|@triton", line):
                    print("   ", line.strip()[:400])


if __name__ == "__main__":
    main()
