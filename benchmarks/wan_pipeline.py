"""Whole WanPipeline (T2V) at Wan 2.1 1.3B shapes with random weights, 480p x 81 frames:
eager vs Inductor regional vs difffuse regional. Text embeddings are random
`prompt_embeds` (no text encoder); the VAE is diffusers' default AutoencoderKLWan config.
Modes share one transformer's weights (compiled blocks swapped in, as in wan_step) and
alternate over rounds. Prints pipeline seconds (denoising + VAE decode) and per-step ms.

    python -m benchmarks.wan_pipeline [--steps 4] [--rounds 2] [--height 480 --width 832 --frames 81] [--csv PATH]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import difffuse
from benchmarks import harness


def pipeline(transformer):
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline

    vae = AutoencoderKLWan().to("cuda").eval()  # fp32, as diffusers' Wan examples load it
    sched = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    return WanPipeline(tokenizer=None, text_encoder=None, vae=vae, scheduler=sched, transformer=transformer)


def run(pipe, a) -> tuple[float, list[float]]:
    """(denoising seconds, per-step ms) for one call (latents out: the VAE is timed apart)."""
    stamps = []

    def on_step(p, i, t, kw):
        torch.cuda.synchronize()
        stamps.append(time.perf_counter())
        return kw

    g = torch.Generator("cuda").manual_seed(0)
    pe = torch.randn(1, 512, 4096, device="cuda", dtype=torch.bfloat16, generator=g)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    with torch.no_grad():
        pipe(prompt_embeds=pe, negative_prompt_embeds=pe * 0.5, height=a.height, width=a.width,
             num_frames=a.frames, num_inference_steps=a.steps, guidance_scale=5.0, output_type="latent",
             generator=g, callback_on_step_end=on_step)
    torch.cuda.synchronize()
    total = time.perf_counter() - t0
    steps = [(b - a_) * 1e3 for a_, b in zip([t0] + stamps[:-1], stamps)][1:]  # drop the first (prep)
    return total, steps


def decode_seconds(pipe, a) -> float:
    """One VAE decode of this size's latents (what output_type="np" adds to every mode)."""
    lat = torch.randn(1, 16, (a.frames - 1) // 4 + 1, a.height // 8, a.width // 8, device="cuda")
    with torch.no_grad():
        pipe.vae.decode(lat)  # warm-up
        torch.cuda.synchronize()
        t = time.perf_counter()
        pipe.vae.decode(lat)
        torch.cuda.synchronize()
    return time.perf_counter() - t


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--height", type=int, default=480)
    ap.add_argument("--width", type=int, default=832)
    ap.add_argument("--frames", type=int, default=81)
    ap.add_argument("--warps", default=None)
    harness.add_csv_arg(ap)
    a = ap.parse_args()
    harness.load_warps(a.warps)
    torch.manual_seed(0)
    transformer, _, _ = harness.build_wan("1.3b", None)
    pipe = pipeline(transformer)
    pipe.set_progress_bar_config(disable=True)
    blocks = {"eager": transformer.blocks, "inductor": harness.regional(transformer.blocks, "inductor"),
              "difffuse": harness.regional(transformer.blocks, "difffuse")}
    print(harness.header())
    print(f"WanPipeline T2V, 1.3B shapes, {a.height}x{a.width}x{a.frames}, {a.steps} steps, CFG 5.0, bf16 "
          f"transformer, fp32 VAE")
    res = {m: {"total": [], "steps": []} for m in blocks}
    first = {}
    for r in range(a.rounds + 1):  # round 0 compiles
        for mode, bl in blocks.items():
            transformer.blocks = bl
            difffuse.reset_report()
            total, steps = run(pipe, a)
            if r == 0:
                first[mode] = total
                if mode == "difffuse":
                    res[mode]["matches"] = difffuse.report().matches()
                continue
            res[mode]["total"].append(total)
            res[mode]["steps"].extend(steps)
        if r:
            print(f"round {r}: " + ", ".join(f"{m} {res[m]['total'][-1]:.2f} s" for m in blocks) +
                  f"; clocks {harness.clocks()}", flush=True)
    dec = decode_seconds(pipe, a)
    for m in blocks:
        res[m]["total"] = [t + dec for t in res[m]["total"]]
    base = statistics.median(res["inductor"]["total"])
    rows = [{"mode": m, "pipeline s (median, denoise + decode)": f"{statistics.median(res[m]['total']):.2f}",
             "per step ms (median, 2 transformer calls)": f"{statistics.median(res[m]['steps']):.0f}",
             "vs inductor": f"{base / statistics.median(res[m]['total']):.3f}x",
             "first call s (incl. compile)": f"{first[m]:.1f}"} for m in blocks]
    print()
    print(harness.table(rows, list(rows[0]), csv=a.csv))
    print(f"\nVAE decode {dec:.2f} s in every mode (the VAE is not compiled)")
    print(f"difffuse matches per block graph: {res['difffuse'].get('matches')}")


if __name__ == "__main__":
    main()
