"""Sweep num_warps for each difffuse Triton kernel at Wan shapes (bf16), and for the qk
kernel also the heads per chunk, and print the fastest in the form of
`triton_kernels.WARPS` and `triton_kernels.QK_HEADS`. Kernels are launched directly (no HOP
dispatch), timed with L2 flushed.

    python -m benchmarks.tune_triton [OUT.json [KERNEL]]

(OUT.json: the best WARPS table, for `python -m benchmarks.kernels --warps OUT.json`;
KERNEL: only the cases whose kernel key contains it, e.g. qk_norm_rope)
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch._library.triton import set_wrap_triton_enabled

from benchmarks import harness
from difffuse.lowering import cuda
from difffuse.lowering import triton_kernels as tk

BF16, F32 = torch.bfloat16, torch.float32
L = 32760


def r(*shape, dtype=BF16):
    return torch.randn(*shape, device="cuda", dtype=dtype)


def tables(hd=128):
    return r(1, L, 1, hd, dtype=F32), r(1, L, 1, hd, dtype=F32)


CASES = [  # (kernel key, label, fn, args)
    ("rms_norm", "D=1536", cuda.IMPLS["rms_norm"], lambda: (r(1, L, 1536), r(1536), 1e-6, BF16)),
    ("rms_norm", "D=5120", cuda.IMPLS["rms_norm"], lambda: (r(1, L, 5120), r(5120), 1e-6, BF16)),
    ("rms_norm", "D=3072", cuda.IMPLS["rms_norm"], lambda: (r(1, L, 3072), r(3072), 1e-6, BF16)),
    ("scale_shift", "gated residual D=3072", cuda.IMPLS["scale_shift"],
     lambda: (r(1, L, 3072), r(1, L, 3072, dtype=F32), r(1, L, 3072), 0.0, BF16)),
    ("scale_shift", "gated residual D=5120", cuda.IMPLS["scale_shift"],
     lambda: (r(1, L, 5120), r(1, 1, 5120, dtype=F32), r(1, L, 5120), 0.0, BF16)),
    ("norm_scale_shift", "res LN per-token D=3072", cuda.IMPLS["norm_scale_shift"],
     lambda: (r(1, L, 3072), r(1, L, 3072), None, None, None, r(1, L, 3072, dtype=F32), r(1, L, 3072, dtype=F32),
              1e-6, 1.0, False, BF16, BF16)),
    ("scale_shift", "gated residual D=1536", cuda.IMPLS["scale_shift"],
     lambda: (r(1, L, 1536), r(1, 1, 1536, dtype=F32), r(1, L, 1536), 0.0, BF16)),
    ("norm_modulate", "LN mod D=1536", tk.norm_modulate,
     lambda: (r(1, L, 1536), None, None, r(1, 1, 1536, dtype=F32), r(1, 1, 1536, dtype=F32), 1e-6, 1.0, False, BF16)),
    ("norm_scale_shift", "res+gate affine LN D=1536", cuda.IMPLS["norm_scale_shift"],
     lambda: (r(1, L, 1536), r(1, L, 1536), r(1, 1, 1536, dtype=F32), r(1536, dtype=F32), r(1536, dtype=F32),
              None, None, 1e-6, 1.0, False, BF16, BF16)),
    ("norm_modulate", "LN mod D=5120", tk.norm_modulate,
     lambda: (r(1, L, 5120), None, None, r(1, 1, 5120, dtype=F32), r(1, 1, 5120, dtype=F32), 1e-6, 1.0, False, BF16)),
    ("qk_norm_rope", "12x128", cuda.IMPLS["qk_norm_rope"],
     lambda: (r(1, L, 1536), r(1536), *tables(), 1e-6, 12, True, True, BF16)),
    ("qk_norm_rope", "24x128", cuda.IMPLS["qk_norm_rope"],
     lambda: (r(1, L, 3072), r(3072), *tables(), 1e-6, 24, True, True, BF16)),
    ("qk_norm_rope", "40x128", cuda.IMPLS["qk_norm_rope"],
     lambda: (r(1, L, 5120), r(5120), *tables(), 1e-6, 40, True, True, BF16)),
]
BLOCKS = {"rms_norm": lambda a: tk.block(a[0].shape[-1]), "scale_shift": lambda a: tk.block(a[0].shape[-1]),
          "norm_scale_shift": lambda a: tk.block(a[0].shape[-1]),
          "norm_modulate": lambda a: tk.block(a[0].shape[-1]),
          "qk_norm_rope": lambda a: tk.heads_per_chunk(a[5]) * tk.block(a[0].shape[-1] // a[5] // 2) * 2}


def nbytes(args, out) -> int:
    outs = out if isinstance(out, tuple) else (out,)
    return sum(t.numel() * t.element_size() for t in (*args, *outs) if isinstance(t, torch.Tensor))


def main():
    bw = harness.copy_bandwidth()
    print(harness.header())
    print(f"copy bandwidth {bw / 1e12:.2f} TB/s")
    best: dict = {}  # WARPS: kernel -> {block: warps}
    best_qk: dict = {}  # QK_HEADS: heads -> (µs, heads per chunk, warps)
    rows = []
    with torch.no_grad(), set_wrap_triton_enabled(False):
        only = sys.argv[2] if len(sys.argv) > 2 else ""
        for key, label, fn, make in CASES:
            if only not in key:
                continue
            args = make()
            heads = args[5] if key == "qk_norm_rope" else None
            saved_qk = dict(tk.QK_HEADS)
            # qk: every head chunk from 2 to one chunk covering all heads (tk.QK_HEADS)
            for hc in ([2, 4, 8, 16, 32, 64][: tk.block(heads).bit_length() - 1] if heads else [None]):
                if hc:
                    tk.QK_HEADS[heads] = (hc, 0)
                blk = BLOCKS[key](args)
                row = {"kernel": f"{key} {label}" + (f" hc={hc}" if hc else ""), "block": blk}
                times, saved = {}, tk.WARPS.get(key)
                for w in ((2, 4, 8, 16) if hc else (1, 2, 4, 8, 16, 32)):
                    if hc:  # the qk kernel takes its warps from QK_HEADS
                        tk.QK_HEADS[heads] = (hc, w)
                    else:
                        tk.WARPS[key] = {blk: w}
                    try:
                        times[w] = harness.bench_ms(lambda: fn(*args)) * 1e3
                        row[f"w{w} µs"] = f"{times[w]:.1f}"
                    except Exception as exc:  # noqa: BLE001  (a config Triton cannot build)
                        row[f"w{w} µs"] = type(exc).__name__
                tk.WARPS[key] = saved or {}
                w = min(times, key=times.get)
                floor = nbytes(args, fn(*args)) / bw * 1e6
                row.update({"best": w, "floor µs": f"{floor:.1f}", "% of copy bw": f"{100 * floor / times[w]:.0f}"})
                if hc:
                    best_qk[heads] = min(best_qk.get(heads, (times[w], hc, w)), (times[w], hc, w))
                else:
                    best.setdefault(key, {})[blk] = w
                rows.append(row)
                print(row, flush=True)
            tk.QK_HEADS.clear()
            tk.QK_HEADS.update(saved_qk)
    print()
    print(harness.table(rows, list(rows[0])))
    print(f"\nWARPS = {best}")
    print(f"QK_HEADS = { {h: (hc, w) for h, (_, hc, w) in best_qk.items()} }")
    if len(sys.argv) > 1 and sys.argv[1]:  # a file to write the table to (json), for benchmarks.kernels --warps
        import json

        Path(sys.argv[1]).write_text(json.dumps(best))


if __name__ == "__main__":
    main()
