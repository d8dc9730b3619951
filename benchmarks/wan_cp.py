"""Wan 2.1 1.3B-shaped transformer (random weights, 480p x 81) under diffusers' context
parallelism (Ulysses or ring, cuDNN attention) on N GPUs: Inductor regional vs difffuse
regional, alternated, plus the single-GPU reference (rank 0, before parallelism) for the
output and the match table.

    torchrun --nproc-per-node 2 benchmarks/wan_cp.py --cp ulysses|ring [--rounds 3 --steps 3]

(one parallel config per process: diffusers' enable_parallelism cannot be undone)
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))
import _bench  # noqa: E402
from wan_step import build, regional, rel_err, step_ms  # noqa: E402

import difffuse  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cp", choices=["ulysses", "ring"], default="ulysses")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=3)
    a = ap.parse_args()
    dist.init_process_group("nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    torch.manual_seed(0)  # the same weights and inputs on every rank
    model, kwargs, tokens = build("1.3b", None)
    model.set_attention_backend("_native_cudnn")
    say = print if rank == 0 else (lambda *x, **k: None)
    say(_bench.header())
    say(f"Wan 1.3B shapes, {tokens} tokens, bf16, cuDNN attention, regional compile, {world} GPUs")

    # one GPU (every rank computes it; rank 0 reports): eager reference, then both backends
    rows, single = [], {}
    with torch.no_grad():
        ref = model(**kwargs)[0]
        blocks = {"inductor": regional(model.blocks, "inductor"), "difffuse": regional(model.blocks, "difffuse")}
        eager_blocks = model.blocks
        for mode, bl in blocks.items():
            model.blocks = bl
            difffuse.reset_report()
            out = model(**kwargs)[0]
            if mode == "difffuse":
                single["matches"] = difffuse.report().matches()
            single[mode] = [step_ms(model, kwargs, a.steps) for _ in range(2)]
            rows.append({"config": "1 GPU", "mode": mode, "step ms": f"{statistics.median(single[mode]):.1f}",
                         "rel err vs 1-GPU eager": f"{rel_err(out, ref):.2e}", "matches": ""})
        model.blocks = eager_blocks
    say(f"1 GPU difffuse matches per block: {single['matches']}")

    from diffusers import ContextParallelConfig

    for cp in [a.cp]:  # parallelism cannot be undone on a model: one config per process
        cfg = ContextParallelConfig(ulysses_degree=world) if cp == "ulysses" else ContextParallelConfig(ring_degree=world)
        torch._dynamo.reset()
        model.enable_parallelism(config=cfg)
        blocks = {"inductor": regional(eager_blocks, "inductor"), "difffuse": regional(eager_blocks, "difffuse")}
        res = {m: [] for m in blocks}
        outs, matches = {}, None
        with torch.no_grad():
            for mode, bl in blocks.items():
                model.blocks = bl
                difffuse.reset_report()
                outs[mode] = model(**kwargs)[0]
                if mode == "difffuse":
                    matches = difffuse.report().matches()
            for _ in range(a.rounds):
                for mode, bl in blocks.items():
                    model.blocks = bl
                    dist.barrier()
                    res[mode].append(step_ms(model, kwargs, a.steps))
        for mode in blocks:
            rows.append({"config": f"{cp}-{world}", "mode": mode, "step ms": f"{statistics.median(res[mode]):.1f}",
                         "rel err vs 1-GPU eager": f"{rel_err(outs[mode], ref):.2e}",
                         "matches": "same as 1 GPU" if mode == "difffuse" and matches == single["matches"]
                         else (str(matches) if mode == "difffuse" else "")})
        say(f"{cp}: " + ", ".join(f"{m} {statistics.median(res[m]):.1f} ms" for m in blocks) +
            f"; difffuse matches {matches}; clocks {_bench.clocks()}", flush=True)
    say()
    say(_bench.table(rows, list(rows[0])))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
