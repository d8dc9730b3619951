"""One Wan denoising step (random weights, bf16 with diffusers' fp32 keep-modules):
eager vs Inductor regional vs Inductor regional with attention routed by hand (the fair
peer) vs difffuse without and with attention routing, modes alternated (A B C A B C ...;
`_modes.py`).

Regional compile is what `compile_repeated_blocks` does (each block compiled); here the
compiled blocks of both backends share one model's weights, so a 14B model fits once.
Prints median step time per mode, compile time (first call), relative error vs eager,
difffuse's matches, attention and memory-bound kernel totals from the profiler (one
profiled step per mode and round, median over rounds), and the SM clock/power read
during each round.

    python benchmarks/wan_step.py --model 1.3b|14b|ti2v-5b [--layers N] [--rounds 3] [--steps 5]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
import _bench  # noqa: E402
import _modes  # noqa: E402

import difffuse  # noqa: E402

COMMON = dict(patch_size=(1, 2, 2), attention_head_dim=128, text_dim=4096, freq_dim=256, cross_attn_norm=True,
              qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)
MODELS = {  # config, latent [C, F, H, W], per-token timestep
    "1.3b": (dict(num_attention_heads=12, ffn_dim=8960, num_layers=30, in_channels=16, out_channels=16),
             (16, 21, 60, 104), False),
    "14b": (dict(num_attention_heads=40, ffn_dim=13824, num_layers=40, in_channels=16, out_channels=16),
            (16, 21, 60, 104), False),
    "ti2v-5b": (dict(num_attention_heads=24, ffn_dim=14336, num_layers=30, in_channels=48, out_channels=48),
                (48, 31, 44, 80), True),
}


def build(name: str, layers: int | None):
    from diffusers import WanTransformer3DModel

    from difffuse.testing.tiny_models import to_dtype

    cfg, latent, per_token = MODELS[name]
    cfg = dict(COMMON, **cfg)
    if layers:
        cfg["num_layers"] = layers
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # build in bf16 on the GPU: a 14B model in fp32 would not fit
    try:
        with torch.device("cuda"):
            model = WanTransformer3DModel(**cfg)
    finally:
        torch.set_default_dtype(prev)
    to_dtype(model, torch.bfloat16)
    c, f, h, w = latent
    tokens = f * (h // 2) * (w // 2)
    timestep = torch.full((1, tokens) if per_token else (1,), 500, device="cuda")
    kwargs = dict(hidden_states=torch.randn(1, c, f, h, w, device="cuda", dtype=torch.bfloat16),
                  timestep=timestep,
                  encoder_hidden_states=torch.randn(1, 512, 4096, device="cuda", dtype=torch.bfloat16),
                  return_dict=False)
    return model, kwargs, tokens


def regional(blocks: nn.ModuleList, backend: str) -> nn.ModuleList:
    """What compile_repeated_blocks does, as a separate ModuleList sharing the weights."""
    return _modes.compiled(blocks, _modes.Mode(backend, backend))


def step_ms(model, kwargs, steps: int) -> float:
    times = []
    for _ in range(steps):
        torch.cuda.synchronize()
        t = time.perf_counter()
        model(**kwargs)
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


# substrings that name an attention kernel in a profile
ATTN_WORDS = ("cudnn", "flash", "fmha", "attention", "sdpa")


def kernel_totals(model, kwargs, top: list | None = None) -> tuple[float, float]:
    """(attention ms, other non-GEMM kernels ms) in one step, from the profiler; `top`
    receives the non-GEMM, non-attention kernels as (ms, name), largest first."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        model(**kwargs)
        torch.cuda.synchronize()
    attn = other = 0.0
    for e in prof.key_averages():
        if e.device_type.name != "CUDA":
            continue
        n, t = e.key.lower(), e.device_time_total / 1e3
        if any(s in n for s in ATTN_WORDS):
            attn += t
        elif not any(s in n for s in ("gemm", "cutlass", "sm90", "nvjet", "cublas", "memcpy", "memset")):
            other += t
            if top is not None:
                top.append((t, e.key[:90]))
    if top is not None:
        top.sort(reverse=True)
    return attn, other


def profile_into(entry: dict, model, kwargs) -> None:
    """Profile one step into entry: "attn"/"other" become medians over the calls so far.
    Called once per mode in every alternated round: profiling the modes once, in a fixed
    order, showed a 6 % attention "gap" between modes that was clock drift."""
    entry["top"] = []
    attn, other = kernel_totals(model, kwargs, entry["top"])
    entry.setdefault("attns", []).append(attn)
    entry.setdefault("others", []).append(other)
    entry["attn"], entry["other"] = statistics.median(entry["attns"]), statistics.median(entry["others"])


def rel_err(out, ref) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", choices=list(MODELS), default="1.3b")
    ap.add_argument("--layers", type=int, default=None, help="fewer blocks than the real model")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warps", default=None, help="json file from tune_triton.py: Triton num_warps table")
    ap.add_argument("--no-peer", action="store_true", help="skip the hand-routed Inductor mode")
    a = ap.parse_args()
    _bench.load_warps(a.warps)
    torch.manual_seed(0)
    model, kwargs, tokens = build(a.model, a.layers)
    eager_blocks = model.blocks
    modes = {m.name: m for m in _modes.modes(peer=not a.no_peer)}
    blocks = {name: _modes.compiled(eager_blocks, m) for name, m in modes.items()}
    print(_bench.header())
    print(f"Wan {a.model}, {len(eager_blocks)} blocks, {tokens} tokens, bf16, regional compile")
    res = {m: {"times": []} for m in blocks}
    with torch.no_grad():
        for mode, bl in blocks.items():  # first call = compile
            model.blocks = bl
            difffuse.reset_report()
            torch.cuda.synchronize()
            t = time.perf_counter()
            with _modes.entered(modes[mode]):
                res[mode]["out"] = model(**kwargs)[0]
            torch.cuda.synchronize()
            res[mode]["compile s"] = time.perf_counter() - t
            if modes[mode].backend == "difffuse":
                res[mode]["matches"] = difffuse.report().matches()
                res[mode]["misses"] = sorted({m.reason[:100] for m in difffuse.report().misses})
        for r in range(a.rounds):
            for mode, bl in blocks.items():
                model.blocks = bl
                with _modes.entered(modes[mode]):
                    res[mode]["times"].append(step_ms(model, kwargs, a.steps))
                res[mode].setdefault("clocks", []).append(_bench.clocks())
            print(f"round {r}: " + ", ".join(f"{m} {res[m]['times'][-1]:.1f} ms" for m in blocks), flush=True)
            for mode, bl in blocks.items():
                model.blocks = bl
                with _modes.entered(modes[mode]):
                    profile_into(res[mode], model, kwargs)
    ref, base = res["eager"]["out"], statistics.median(res["inductor"]["times"])
    peer = next((m for m in res if m.startswith("inductor+")), None)
    peer_ms = statistics.median(res[peer]["times"]) if peer else None
    rows = []
    for mode in blocks:
        med = statistics.median(res[mode]["times"])
        rows.append({"mode": mode, "step ms (median)": f"{med:.1f}", "vs inductor": f"{base / med:.3f}x",
                     "vs peer": f"{peer_ms / med:.3f}x" if peer else "-",
                     "first call s": f"{res[mode]['compile s']:.1f}",
                     "rel err vs eager": f"{rel_err(res[mode]['out'], ref):.2e}",
                     "attention ms": f"{res[mode]['attn']:.1f}", "other non-GEMM ms": f"{res[mode]['other']:.1f}",
                     "clocks (MHz, W)": res[mode]["clocks"][-1]})
    print()
    print(_bench.table(rows, list(rows[0])))
    for mode in ("inductor", "difffuse"):
        print(f"\ntop memory-bound kernels, {mode} (ms per step):")
        for t, name in res[mode]["top"][:10]:
            print(f"  {t:8.2f}  {name}")
    for mode in (m for m in blocks if modes[m].backend == "difffuse"):
        print(f"\n{mode} matches (per compiled block graph): {res[mode].get('matches')}, "
              f"misses {res[mode].get('misses')}")


if __name__ == "__main__":
    main()
