"""What every benchmark script shares: the run header, timing, GPU clocks, the compile modes
(and the fair attention peer), the Wan model at real shapes, step timing and profiling,
and table output (markdown, optionally CSV).

Timing
  - `bench_ms(fn)`: median ms of one call (triton's do_bench, L2 flushed), after 0.3 s of
    running fn so the SM clock is back up; `gpu_us(fn)`: the profiler's kernel time per call.
  - `step_ms(model, kwargs, steps)`: median wall time of a model call (synchronized).
  - `kernel_totals` / `profile_into`: attention and other non-GEMM kernel ms of one step.
  - `copy_bandwidth()`, `clocks()`, `header()`.

Modes (the step benchmarks alternate them: A B C A B C ...)
  - eager; inductor (regional);
  - inductor+<kernel>: Inductor regional with attention routed by hand to the kernel
    difffuse picks, the way a user of diffusers' attention backends gets it: a backend
    function registered in diffusers' registry (`_AttentionBackendRegistry`, under an enum
    slot this process does not otherwise use) that calls the kernel through an op Dynamo
    does not trace into (difffuse's own `difffuse::flash_attention` op, so the kernel call
    is the same one); masked / dropout / GQA calls fall back to SDPA as diffusers'
    backends do;
  - difffuse-attn: difffuse with every family but attention (the fusions alone);
  - difffuse: the default (fusions + attention routing).
  `modes()` lists them, `compiled(blocks, mode)` compiles a block list the way
  compile_repeated_blocks does, `entered(mode)` runs with the mode's attention routing,
  `alternate(...)` runs the whole protocol (first call = compile, rounds of timed steps,
  one profiled step per mode and round).

Models: `WAN_MODELS` / `build_wan(name, layers)`: a Wan transformer at a real model's
widths and token count, random weights, bf16 on the GPU.

Output: `table(rows, cols, csv=PATH)` returns the markdown table and, given a path, also
writes the rows there as CSV; `add_csv_arg(parser)` adds the scripts' `--csv PATH`.

Run the scripts from the repository root as modules: `python -m benchmarks.wan_step ...`.
"""
from __future__ import annotations

import argparse
import contextlib
import csv as _csv
import dataclasses
import datetime
import functools
import platform
import statistics
import subprocess
import time
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

import difffuse
from difffuse.families import DEFAULTS


# ====================================================================== header, timing, clocks
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


def gpu_us(fn, calls: int = 20) -> tuple[float, str]:
    """(sum of the GPU kernels' durations per call, the kernels with their counts per
    call), from the profiler without launch gaps: what the kernels cost when the host
    keeps ahead, as in a model step."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    evs = [e for e in prof.key_averages() if e.device_type.name == "CUDA"]
    names = ", ".join(f"{e.key[:40]} x{e.count // calls}" for e in evs)
    return sum(e.device_time_total for e in evs) / calls, names


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


def load_warps(path: str | None) -> None:
    """Apply a num_warps table written by tune_triton.py (for runs before it is in the code)."""
    if not path:
        return
    import json

    from difffuse.lowering import triton_kernels as tk

    for k, tab in json.loads(Path(path).read_text()).items():
        tk.WARPS.setdefault(k, {}).update({int(b): w for b, w in tab.items()})
    print(f"num_warps table: {tk.WARPS}")


def rel_err(out, ref) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


# ====================================================================== output
def add_csv_arg(ap: argparse.ArgumentParser, more: str = "") -> None:
    """The scripts' `--csv PATH` (`more`: what else the script writes next to PATH)."""
    ap.add_argument("--csv", default=None, metavar="PATH",
                    help="also write the result table to PATH as CSV" + (f"; {more}" if more else ""))


def csv_path(path: str | None, part: str | None = None) -> str | None:
    """PATH itself, or for a script's further table `part`, PATH's stem + .part + suffix."""
    if not path or not part:
        return path
    p = Path(path)
    return str(p.with_name(f"{p.stem}.{part}{p.suffix or '.csv'}"))


def table(rows: list[dict], cols: list[str], csv: str | None = None) -> str:
    """A markdown table of rows (dicts) in the given column order; with `csv`, the same
    rows are also written to that file as CSV."""
    if csv:
        with open(csv, "w", newline="") as f:
            w = _csv.writer(f)
            w.writerow(cols)
            w.writerows([[r.get(c, "") for c in cols] for r in rows])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(str(r.get(c, "")) for c in cols) + " |")
    return "\n".join(lines)


# ====================================================================== modes
@dataclasses.dataclass(frozen=True)
class Mode:
    name: str
    backend: Optional[str] = None  # None: eager
    options: Optional[dict] = None
    hand_routed: Optional[str] = None  # the kernel diffusers' backend registry routes to


def routed_kernel() -> Optional[str]:
    """The kernel difffuse picks for a bf16 [*, *, *, 128] call on this GPU (None: none)."""
    from difffuse.lowering import flash_attention as fa
    from difffuse.lowering.sites import AttentionSite, TensorSpec

    q = torch.empty(1, 4096, 12, 128, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
    return fa.choose(AttentionSite(*(TensorSpec.of(q),) * 3, None, False, False))[0]


def modes(peer: bool = True) -> list[Mode]:
    out = [Mode("eager"), Mode("inductor", "inductor")]
    kernel = routed_kernel()
    if peer and kernel:
        out.append(Mode(f"inductor+{kernel}", "inductor", hand_routed=kernel))
    out.append(Mode("difffuse-attn", "difffuse", {"patterns": [p for p in DEFAULTS if p != "attention"]}))
    out.append(Mode("difffuse", "difffuse"))
    return out


def compiled(blocks: nn.ModuleList, mode: Mode) -> nn.ModuleList:
    """What compile_repeated_blocks does, as a separate ModuleList sharing the weights."""
    if mode.backend is None:
        return blocks
    if mode.hand_routed:
        # Inductor under another backend object: Dynamo keeps a separate compiled entry
        # (its backend guard), so the routed trace is not served the plain-Inductor one
        # (Dynamo puts no guard on diffusers' active attention backend)
        from torch._inductor.compile_fx import compile_fx

        return nn.ModuleList(torch.compile(b, backend=compile_fx) for b in blocks)
    return nn.ModuleList(torch.compile(b, backend=mode.backend, options=mode.options) for b in blocks)


def regional(blocks: nn.ModuleList, backend: str) -> nn.ModuleList:
    """`blocks` compiled block by block with `backend` ("inductor" or "difffuse")."""
    return compiled(blocks, Mode(backend, backend))


@functools.lru_cache(None)  # one function per kernel: Dynamo guards on its identity
def _backend_fn(kernel: str):
    def attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                  enable_gqa=False, return_lse=False, _parallel_config=None):
        # diffusers' backends take and return [B, L, H, D]
        q, k, v = (t.transpose(1, 2) for t in (query, key, value))
        if attn_mask is not None or dropout_p or enable_gqa or q.dtype not in (torch.float16, torch.bfloat16):
            out = F.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal, scale=scale,
                                                 enable_gqa=enable_gqa)
            return out.transpose(1, 2)
        out, lse = torch.ops.difffuse.flash_attention(q, k, v, scale, is_causal, kernel)
        return (out.transpose(1, 2), lse.transpose(1, 2)) if return_lse else out.transpose(1, 2)
    return attention


@contextlib.contextmanager
def entered(mode: Mode):
    """Run the block with the mode's attention routing (diffusers' registry is global)."""
    if mode.hand_routed is None:
        yield
        return
    import inspect

    from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry as reg

    slot = AttentionBackendName._FLASH_3
    saved = (reg._backends.get(slot), reg._constraints.get(slot), reg._supported_arg_names.get(slot),
             reg._active_backend)
    fn = _backend_fn(mode.hand_routed)
    reg._backends[slot], reg._constraints[slot] = fn, []
    reg._supported_arg_names[slot] = set(inspect.signature(fn).parameters)
    reg.set_active_backend(slot)
    try:
        yield
    finally:
        reg._backends[slot], reg._constraints[slot], reg._supported_arg_names[slot] = saved[:3]
        reg.set_active_backend(saved[3])


# ====================================================================== step timing, profiling
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


def alternate(model, kwargs, specs: dict[str, Mode], swap: Callable[[str], None], rounds: int,
              steps: int) -> dict:
    """The step protocol over `specs` (name -> Mode), `swap(name)` putting that mode's
    compiled blocks into `model`: the first call of each mode (its compile; "out",
    "compile s", and for difffuse modes the report's "matches", miss "reasons" and graph
    "notes"), then `rounds` rounds of `steps` timed calls per mode, modes alternated
    ("times", "clocks"; a line printed per round), each round followed by one profiled
    step per mode ("attn", "other", "top": profile_into). Returns name -> that dict."""
    res = {m: {"times": []} for m in specs}
    with torch.no_grad():
        for mode in specs:  # first call = compile
            swap(mode)
            difffuse.reset_report()
            torch.cuda.synchronize()
            t = time.perf_counter()
            with entered(specs[mode]):
                res[mode]["out"] = model(**kwargs)[0]
            torch.cuda.synchronize()
            res[mode]["compile s"] = time.perf_counter() - t
            if specs[mode].backend == "difffuse":
                rep = difffuse.report()
                res[mode]["matches"] = rep.matches()
                res[mode]["reasons"] = [m.reason for m in rep.misses]
                res[mode]["notes"] = [n for g in rep.graphs for n in g.notes]
        for r in range(rounds):
            for mode in specs:
                swap(mode)
                with entered(specs[mode]):
                    res[mode]["times"].append(step_ms(model, kwargs, steps))
                res[mode].setdefault("clocks", []).append(clocks())
            print(f"round {r}: " + ", ".join(f"{m} {res[m]['times'][-1]:.1f} ms" for m in specs), flush=True)
            for mode in specs:
                swap(mode)
                with entered(specs[mode]):
                    profile_into(res[mode], model, kwargs)
    return res


def step_rows(res: dict) -> list[dict]:
    """One row per mode of `alternate`'s result: median step ms, speed-up vs Inductor and
    vs the hand-routed peer, first call s, rel err vs eager, attention and other non-GEMM
    kernel ms per step."""
    ref, base = res["eager"]["out"], statistics.median(res["inductor"]["times"])
    peer = next((m for m in res if m.startswith("inductor+")), None)
    peer_ms = statistics.median(res[peer]["times"]) if peer else None
    rows = []
    for mode in res:
        med = statistics.median(res[mode]["times"])
        rows.append({"mode": mode, "step ms (median)": f"{med:.1f}", "vs inductor": f"{base / med:.3f}x",
                     "vs peer": f"{peer_ms / med:.3f}x" if peer else "-",
                     "first call s": f"{res[mode]['compile s']:.1f}",
                     "rel err vs eager": f"{rel_err(res[mode]['out'], ref):.2e}",
                     "attention ms": f"{res[mode]['attn']:.1f}", "other non-GEMM ms": f"{res[mode]['other']:.1f}"})
    return rows


def print_top(res: dict, n: int) -> None:
    """The n largest memory-bound kernels of Inductor and difffuse (from the last profile)."""
    for mode in ("inductor", "difffuse"):
        print(f"\ntop memory-bound kernels, {mode} (ms per step):")
        for t, name in res[mode]["top"][:n]:
            print(f"  {t:8.2f}  {name}")


# ====================================================================== Wan at real shapes
WAN_COMMON = dict(patch_size=(1, 2, 2), attention_head_dim=128, text_dim=4096, freq_dim=256, cross_attn_norm=True,
                  qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)
WAN_MODELS = {  # config, latent [C, F, H, W], per-token timestep
    "1.3b": (dict(num_attention_heads=12, ffn_dim=8960, num_layers=30, in_channels=16, out_channels=16),
             (16, 21, 60, 104), False),
    "14b": (dict(num_attention_heads=40, ffn_dim=13824, num_layers=40, in_channels=16, out_channels=16),
            (16, 21, 60, 104), False),
    "ti2v-5b": (dict(num_attention_heads=24, ffn_dim=14336, num_layers=30, in_channels=48, out_channels=48),
                (48, 31, 44, 80), True),
}


def build_wan(name: str, layers: int | None):
    """(WanTransformer3DModel with `name`'s config (fewer blocks if `layers`), random bf16
    weights on the GPU with diffusers' fp32 keep-modules, its call kwargs at 480p x 81
    frames (TI2V-5B: 704p x 121), the token count)."""
    from diffusers import WanTransformer3DModel

    from difffuse.testing.tiny_models import to_dtype

    cfg, latent, per_token = WAN_MODELS[name]
    cfg = dict(WAN_COMMON, **cfg)
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
