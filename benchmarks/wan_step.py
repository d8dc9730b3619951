"""One Wan denoising step (random weights, bf16 with diffusers' fp32 keep-modules):
eager vs Inductor regional vs Inductor regional with attention routed by hand (the fair
peer) vs difffuse without and with attention routing, modes alternated (A B C A B C ...;
the modes and the protocol: `benchmarks/harness.py`).

Regional compile is what `compile_repeated_blocks` does (each block compiled); here the
compiled blocks of both backends share one model's weights, so a 14B model fits once.
Prints median step time per mode, compile time (first call), relative error vs eager,
difffuse's matches, attention and memory-bound kernel totals from the profiler (one
profiled step per mode and round, median over rounds), and the SM clock/power read
during each round.

    python -m benchmarks.wan_step --model 1.3b|14b|ti2v-5b [--layers N] [--rounds 3] [--steps 5] [--csv PATH]
"""
from __future__ import annotations

import argparse

import torch

from benchmarks import harness


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", choices=list(harness.WAN_MODELS), default="1.3b")
    ap.add_argument("--layers", type=int, default=None, help="fewer blocks than the real model")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warps", default=None, help="json file from tune_triton.py: Triton num_warps table")
    ap.add_argument("--no-peer", action="store_true", help="skip the hand-routed Inductor mode")
    harness.add_csv_arg(ap)
    a = ap.parse_args()
    harness.load_warps(a.warps)
    torch.manual_seed(0)
    model, kwargs, tokens = harness.build_wan(a.model, a.layers)
    eager_blocks = model.blocks
    modes = {m.name: m for m in harness.modes(peer=not a.no_peer)}
    blocks = {name: harness.compiled(eager_blocks, m) for name, m in modes.items()}
    print(harness.header())
    print(f"Wan {a.model}, {len(eager_blocks)} blocks, {tokens} tokens, bf16, regional compile")

    def swap(mode):
        model.blocks = blocks[mode]

    res = harness.alternate(model, kwargs, modes, swap, a.rounds, a.steps)
    rows = [{**row, "clocks (MHz, W)": res[row["mode"]]["clocks"][-1]} for row in harness.step_rows(res)]
    print()
    print(harness.table(rows, list(rows[0]), csv=a.csv))
    harness.print_top(res, 10)
    for mode in (m for m in blocks if modes[m].backend == "difffuse"):
        misses = sorted({r[:100] for r in res[mode]["reasons"]})
        print(f"\n{mode} matches (per compiled block graph): {res[mode].get('matches')}, misses {misses}")


if __name__ == "__main__":
    main()
