"""Where compiled Wan blocks lose attention time against eager (#10 item 3).

Two parts:
1. Which attention op, input strides and cuDNN kernels each mode runs in one Wan step
   (profiler with shapes; eager vs Inductor vs difffuse, regional compile).
2. cuDNN SDPA alone at Wan's self-attention shape with q/k/v (and the output) in each
   memory layout, to see which layout the kernel reads fastest.

    python -m benchmarks.attention_layout --model 1.3b --layers 2 [--rounds 5] [--csv PATH]
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks import harness
from benchmarks.harness import ATTN_WORDS


def trace_step(model, kwargs) -> list[dict]:
    """Chrome-trace events of one step, shapes and strides recorded."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as prof:
        model(**kwargs)
        torch.cuda.synchronize()
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "t.json")
        prof.export_chrome_trace(path)
        return json.loads(Path(path).read_text())["traceEvents"]


def summarize(events: list[dict]) -> tuple[collections.Counter, dict]:
    """(attention ops with their input dims/strides, attention kernel name -> [count, us])."""
    ops, kernels = collections.Counter(), {}
    for e in events:
        name, cat = e.get("name", ""), e.get("cat", "")
        if cat == "cpu_op" and "scaled_dot_product" in name and "aten::" in name:
            a = e.get("args", {})
            ops[(name, str(a.get("Input Dims")), str(a.get("Input Strides")))] += 1
        elif cat == "kernel" and any(w in name.lower() for w in ATTN_WORDS):
            k = kernels.setdefault(name[:160], [0, 0.0])
            k[0] += 1
            k[1] += e.get("dur", 0.0)
    return ops, kernels


def layouts(B, L, H, D, Lk, dtype=torch.bfloat16):
    """name -> (q, k, v) viewed [B, H, L, D] over different memory orders."""
    def blhd(n):  # eager: [B, L, H, D] memory viewed as [B, H, L, D]
        return torch.randn(B, n, H, D, device="cuda", dtype=dtype).transpose(1, 2)

    def bhld(n):  # [B, H, L, D] contiguous
        return torch.randn(B, H, n, D, device="cuda", dtype=dtype)

    return {
        "q,k,v [B,L,H,D]": (blhd(L), blhd(Lk), blhd(Lk)),
        "q,k,v [B,H,L,D]": (bhld(L), bhld(Lk), bhld(Lk)),
        "q [B,H,L,D]; k,v [B,L,H,D]": (bhld(L), blhd(Lk), blhd(Lk)),
        "q,k [B,H,L,D]; v [B,L,H,D]": (bhld(L), bhld(Lk), blhd(Lk)),
        "q,k [B,L,H,D]; v [B,H,L,D]": (blhd(L), blhd(Lk), bhld(Lk)),
    }


def sdpa_table(tokens: int, heads: int, text: int = 512) -> list[dict]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    rows = []
    for what, lk in (("self", tokens), ("cross", text)):
        for name, (q, k, v) in layouts(1, tokens, heads, 128, lk).items():
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                out = F.scaled_dot_product_attention(q, k, v)
                ms = harness.bench_ms(lambda: F.scaled_dot_product_attention(q, k, v), rep=200)  # noqa: B023
            rows.append({"attention": what, "layout": name, "ms": f"{ms:.3f}",
                         "out strides": str(tuple(out.stride()))})
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", choices=list(harness.WAN_MODELS), default="1.3b")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5, help="alternated profiling rounds")
    harness.add_csv_arg(ap)
    a = ap.parse_args()
    torch.manual_seed(0)
    print(harness.header())
    model, kwargs, tokens = harness.build_wan(a.model, a.layers)
    heads = model.config.num_attention_heads
    eager_blocks = model.blocks
    blocks = {"eager": eager_blocks, "inductor": harness.regional(eager_blocks, "inductor"),
              "difffuse": harness.regional(eager_blocks, "difffuse")}
    per_round = {m: [] for m in blocks}
    with torch.no_grad():
        for mode, bl in blocks.items():
            model.blocks = bl
            for _ in range(3):
                model(**kwargs)
        for r in range(a.rounds):  # modes alternated: the card is power-limited, clocks drift
            order = list(blocks) if r % 2 == 0 else list(reversed(blocks))
            for mode in order:
                model.blocks = blocks[mode]
                ops, kernels = summarize(trace_step(model, kwargs))
                per_round[mode].append((sum(us for _, us in kernels.values()), harness.clocks()))
                if r == 0:
                    print(f"\n== {mode}: attention ops (name, input dims, input strides) x count")
                    for (n, dims, strides), c in ops.items():
                        print(f"  {c} x {n}\n      dims {dims}\n      strides {strides}")
                    print(f"== {mode}: attention kernels (count, total us)")
                    for n, (c, us) in sorted(kernels.items(), key=lambda kv: -kv[1][1]):
                        print(f"  {c:3d} {us:10.1f}  {n}")
    print("\n== attention kernel total per step (us), rounds alternated (odd rounds reversed order)")
    for mode, vals in per_round.items():
        print(f"  {mode:9s} " + "  ".join(f"{us:9.1f} [{clk}]" for us, clk in vals))
    print(f"\n== cuDNN SDPA alone, B=1, L={tokens}, H={heads}, D=128, bf16")
    rows = sdpa_table(tokens, heads)
    print(harness.table(rows, list(rows[0]), csv=a.csv))


if __name__ == "__main__":
    main()
