"""Wan 2.1 1.3B-shaped transformer (random weights, 480p x 81) under diffusers' context
parallelism (Ulysses or ring, diffusers' `_native_cudnn` attention backend) on N GPUs:
Inductor regional vs difffuse regional without and with attention routing, alternated,
plus the single-GPU runs (every rank, before parallelism) for the output, the match table
and the scaling ratio. Each rank reports what became of its attention calls: rewritten
(with the kernel, from the report's `kernels:` note) or left, with the reason; ring
attention's calls read the logsumexp (the cuDNN node with compute_log_sumexp), which the
rewrite takes from the kernel.

    torchrun --nproc-per-node 2 -m benchmarks.wan_cp --cp ulysses|ring [--rounds 3 --steps 3] [--csv PATH]

(one parallel config per process: diffusers' enable_parallelism cannot be undone)
"""
from __future__ import annotations

import argparse
import os
import statistics

import torch
import torch.distributed as dist

import difffuse
from benchmarks import harness
from benchmarks.harness import Mode, compiled, rel_err, step_ms
from difffuse.families import DEFAULTS

MODES = {"inductor": Mode("inductor", "inductor"),
         "difffuse-attn": Mode("difffuse-attn", "difffuse", {"patterns": [p for p in DEFAULTS if p != "attention"]}),
         "difffuse": Mode("difffuse", "difffuse")}


def attention_fate() -> dict:
    """This rank's report: attention matches, its misses by reason, the kernels note."""
    rep = difffuse.report()
    misses: dict = {}
    for m in rep.misses:
        misses[f"{m.family}: {m.reason[:100]}"] = misses.get(f"{m.family}: {m.reason[:100]}", 0) + 1
    notes = sorted({n for g in rep.graphs for n in g.notes if n.startswith("kernels:")})
    return {"matches": rep.matches(), "misses": misses, "kernels": notes}


def say_per_rank(say, title: str, fate: dict) -> None:
    """Gather every rank's `fate` to rank 0 and print it there."""
    fates = [None] * dist.get_world_size()
    dist.all_gather_object(fates, fate)
    for r, f in enumerate(fates):
        say(f"{title}, rank {r}: matches {f['matches']}; kernels {f['kernels']}; misses {f['misses']}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cp", choices=["ulysses", "ring"], default="ulysses")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=3)
    harness.add_csv_arg(ap)
    a = ap.parse_args()
    dist.init_process_group("nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    torch.manual_seed(0)  # the same weights and inputs on every rank
    model, kwargs, tokens = harness.build_wan("1.3b", None)
    model.set_attention_backend("_native_cudnn")
    say = print if rank == 0 else (lambda *x, **k: None)
    say(harness.header())
    say(f"Wan 1.3B shapes, {tokens} tokens, bf16, cuDNN attention, regional compile, {world} GPUs")

    # one GPU (every rank computes it; rank 0 reports): eager reference, then both backends
    rows, single = [], {}
    with torch.no_grad():
        ref = model(**kwargs)[0]
        blocks = {m: compiled(model.blocks, spec) for m, spec in MODES.items()}
        eager_blocks = model.blocks
        for mode, bl in blocks.items():
            model.blocks = bl
            difffuse.reset_report()
            out = model(**kwargs)[0]
            if mode == "difffuse":
                single["matches"] = difffuse.report().matches()
                say_per_rank(say, "1 GPU difffuse", attention_fate())
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
        blocks = {m: compiled(eager_blocks, spec) for m, spec in MODES.items()}
        res = {m: [] for m in blocks}
        outs, matches = {}, None
        with torch.no_grad():
            for mode, bl in blocks.items():
                model.blocks = bl
                difffuse.reset_report()
                outs[mode] = model(**kwargs)[0]
                if mode == "difffuse":
                    matches = difffuse.report().matches()
                    say_per_rank(say, f"{cp}-{world} difffuse", attention_fate())
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
            f"; difffuse matches {matches}; clocks {harness.clocks()}", flush=True)
        base = statistics.median(res["inductor"])
        one = statistics.median(single["difffuse"])
        say(f"{cp}-{world}: difffuse vs Inductor at the same setting "
            f"{base / statistics.median(res['difffuse']):.3f}x; vs difffuse on 1 GPU "
            f"{one / statistics.median(res['difffuse']):.3f}x")
    say()
    say(harness.table(rows, list(rows[0]), csv=a.csv if rank == 0 else None))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
