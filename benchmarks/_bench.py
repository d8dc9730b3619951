"""Shared benchmark plumbing: device/version header, copy bandwidth, timing, GPU clocks."""
from __future__ import annotations

import datetime
import platform
import subprocess
import time

import torch


def header() -> str:
    import triton

    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor()
    return (f"{datetime.date.today()} · {dev} · torch {torch.__version__} · triton {triton.__version__} · "
            f"CUDA {torch.version.cuda}")


def bench_ms(fn, rep: int = 100) -> float:
    """Median time of fn in ms (L2 flushed between calls by triton's do_bench), after
    0.3 s of running fn: the SM clock drops while the GPU idles (a compile, the host)
    and do_bench's own 25 ms warm-up is too short for it to come back (on an H200 the
    same kernel measured 66 and 114 µs, first after a compile, then again)."""
    from triton.testing import do_bench

    end = time.perf_counter() + 0.3
    while time.perf_counter() < end:
        for _ in range(10):
            fn()
        torch.cuda.synchronize()
    return do_bench(fn, warmup=25, rep=rep, return_mode="median")


def copy_bandwidth() -> float:
    """Measured device-to-device copy bandwidth in bytes/s (bytes read + written)."""
    x = torch.empty(1 << 29, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    ms = bench_ms(lambda: y.copy_(x))
    return 2 * x.numel() / (ms * 1e-3)


def clocks() -> str:
    """SM clock and power right now (nvidia-smi), for the timing protocol."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=clocks.sm,power.draw", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10).stdout.strip()
        return out.replace("\n", " | ")
    except Exception as exc:  # noqa: BLE001
        return f"nvidia-smi unavailable ({exc})"


def table(rows: list[dict], cols: list[str]) -> str:
    """A markdown table of rows (dicts) in the given column order."""
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(str(r.get(c, "")) for c in cols) + " |")
    return "\n".join(lines)


def load_warps(path: str | None) -> None:
    """Apply a num_warps table written by tune_triton.py (for runs before it is in the code)."""
    if not path:
        return
    import json
    from pathlib import Path

    from difffuse.lowering import triton_kernels as tk

    for k, tab in json.loads(Path(path).read_text()).items():
        tk.WARPS.setdefault(k, {}).update({int(b): w for b, w in tab.items()})
    print(f"num_warps table: {tk.WARPS}")
