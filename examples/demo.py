"""difffuse demo: a small Wan 2.1 transformer (diffusers config, random weights, no
downloads) denoises a latent video three ways, side by side: eager, Inductor
(`backend="inductor"`) and difffuse (`backend="difffuse"`). It prints the fusion report,
the median time of a transformer step per mode, and each compiled mode's max difference
from eager.

    python examples/demo.py [--steps 6] [--layers 2] [--device cpu|cuda] [--lowering ...]

Timing: each mode is called once first (the compile happens there and is reported on its
own), then the modes take turns, one denoising step each, and the median per mode is
printed. The two first calls start from the same state: a throwaway Inductor compile
first pays what any first compile of the process pays (imports, Inductor's own pattern
set-up, the C++ toolchain check), then each mode compiles into an empty Inductor cache of
its own (disk and memory), so neither reuses the other's kernels or graphs. difffuse's number
includes building its patterns (once per process).

Lowering: on a GPU the default is `auto` (the CUDA, ROCm or NPU fused kernels: that is
where difffuse makes a model faster). On CPU difffuse has no fast kernels, and `auto`
would compile exactly what Inductor compiles; the demo uses the `reference` lowering
instead, a correctness path whose fused ops are plain PyTorch, so the report shows what is
rewritten. Expect it to be slower than Inductor on CPU.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
import time

import torch

LOWERING_ROLE = {
    "reference": "pure-PyTorch fused ops: shows the rewrites and checks them against eager; a correctness "
                 "path, expected to be slower than Inductor (the speed comes from the CUDA/ROCm/NPU lowerings "
                 "on a GPU)",
    "auto": "the fused kernels of the device it finds (CUDA, ROCm or NPU); on CPU nothing is rewritten "
            "(plain Inductor)",
    "cuda": "difffuse's Triton kernels and cuBLASLt epilogues",
    "rocm": "the ROCm kernels",
    "npu": "the Ascend NPU kernels",
    "musa": "no rewrite: plain Inductor",
    "inductor": "no rewrite: plain Inductor",
}


def build(device, dtype, layers):
    from diffusers import FlowMatchEulerDiscreteScheduler, WanTransformer3DModel

    from difffuse.testing.tiny_models import to_dtype

    torch.manual_seed(0)
    model = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=32, in_channels=16, out_channels=16,
        text_dim=64, freq_dim=64, ffn_dim=256, num_layers=layers, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=64)
    model = to_dtype(model, dtype).to(device)
    return model, FlowMatchEulerDiscreteScheduler(shift=3.0)


def warm_process(device):
    """One small Inductor compile, so that the first timed compile does not also pay the
    process's one-time costs (torch._inductor's imports, its pattern matcher's set-up, the C++
    or Triton toolchain check) and the second does not look faster for having skipped them."""
    with cold_inductor():
        fn = torch.compile(lambda x: torch.nn.functional.gelu(x * 2.0 + 1.0).sum(-1), backend="inductor")
        fn(torch.randn(4, 8, device=device))


@contextlib.contextmanager
def cold_inductor():
    """Inductor's in-memory caches cleared and a fresh, empty cache directory (FX graph,
    AOTAutograd, kernels; removed afterwards): torch's own `fresh_cache`. (Not
    `torch._dynamo.reset()`: it would drop the other mode's compiled code too.)"""
    from torch._inductor import metrics, utils

    metrics.reset()
    fresh = getattr(utils, "fresh_cache", None) or utils.fresh_inductor_cache  # the name before torch 2.8
    with fresh():
        yield


def kernels_generated() -> int:
    from torch._inductor import metrics

    return metrics.generated_kernel_count


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6, help="denoising steps, each timed once per mode")
    parser.add_argument("--layers", type=int, default=2, help="transformer blocks")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--frames", type=int, default=5, help="latent frames")
    parser.add_argument("--size", type=int, default=32, help="latent height and width")
    parser.add_argument("--lowering", default=None, choices=sorted(LOWERING_ROLE),
                        help="difffuse lowering (default: reference on CPU, auto on a GPU)")
    args = parser.parse_args(argv)
    on_cpu = args.device == "cpu"
    dtype = torch.float32 if on_cpu else torch.bfloat16
    lowering = args.lowering or ("reference" if on_cpu else "auto")

    import difffuse

    model, scheduler = build(args.device, dtype, args.layers)
    gen = torch.Generator().manual_seed(1)
    latents0 = torch.randn(1, 16, args.frames, args.size, args.size, generator=gen).to(args.device, dtype)
    text = torch.randn(1, 32, 64, generator=gen).to(args.device, dtype)
    tokens = args.frames * (args.size // 2) ** 2
    print(f"Wan 2.1-style transformer (blocks: {args.layers}, random weights) on {args.device}, {dtype}, "
          f"{tokens} video tokens, {args.steps} denoising steps")
    print(f"difffuse lowering: {lowering} ({LOWERING_ROLE[lowering]})")
    difffuse.reset_report()

    modes = {"eager": model}
    compile_args = {"inductor": ("inductor", None), "difffuse": ("difffuse", {"lowering": lowering})}
    with torch.no_grad():
        scheduler.set_timesteps(args.steps, device=args.device)
        timestep = scheduler.timesteps[0].expand(1)
        warm_process(args.device)
        for name in ("eager", "inductor", "difffuse"):  # one warm-up call per mode: compiles happen here
            with cold_inductor() if name in compile_args else contextlib.nullcontext():
                if name in compile_args:
                    backend, options = compile_args[name]
                    print(f"\n{name}: compiling the transformer with torch.compile(backend={backend!r}"
                          f"{f', options={options}' if options else ''}); the first call traces and compiles it "
                          "from an empty Inductor cache, this takes a while (a minute or more on a CPU)...",
                          flush=True)
                    modes[name] = torch.compile(model, backend=backend, options=options)
                sync(args.device)
                t0 = time.perf_counter()
                modes[name](hidden_states=latents0, timestep=timestep, encoder_hidden_states=text, return_dict=False)
                sync(args.device)
            if name in compile_args:
                print(f"{name}: first call (trace + compile from an empty cache + one step) "
                      f"{time.perf_counter() - t0:.1f} s, {kernels_generated()} kernels generated by Inductor",
                      flush=True)
        print("(both first calls start from an empty Inductor cache in a process a throwaway compile warmed; a "
              "subgraph difffuse fused is one op call that Inductor generates no kernel for, so difffuse's compile "
              "has fewer kernels to build)")

        # each mode denoises the same latents with its own scheduler; the modes take turns per step
        schedulers = {name: copy.deepcopy(scheduler) for name in modes}
        latents = {name: latents0 for name in modes}
        times = {name: [] for name in modes}
        for name in modes:
            schedulers[name].set_timesteps(args.steps, device=args.device)
        for i, t in enumerate(scheduler.timesteps):
            order = list(modes) if i % 2 == 0 else list(modes)[::-1]  # alternate who goes first
            for name in order:
                sync(args.device)
                t0 = time.perf_counter()
                noise = modes[name](hidden_states=latents[name], timestep=t.expand(1),
                                    encoder_hidden_states=text, return_dict=False)[0]
                sync(args.device)
                times[name].append(time.perf_counter() - t0)
                latents[name] = schedulers[name].step(noise, t, latents[name], return_dict=False)[0]

    print()
    print(difffuse.report())
    print(f"\nmedian transformer step over {args.steps} steps (after a warm-up call; modes alternated), "
          f"{args.device}:")
    eager_ms = statistics.median(times["eager"]) * 1e3
    for name in modes:
        ms = statistics.median(times[name]) * 1e3
        label = name if name != "difffuse" else f"difffuse ({lowering})"
        line = f"  {label:<22} {ms:9.2f} ms/step  speed-up vs eager {eager_ms / ms:5.2f}x"
        if name != "eager":
            diff = (latents[name].float() - latents["eager"].float()).abs().max().item()
            line += f"   max |{name} - eager| after {args.steps} steps = {diff:.3g}"
        print(line)
    if on_cpu and lowering == "reference":
        print("note: on CPU the reference lowering shows what difffuse rewrites and that the result matches "
              "eager; it is not meant to be fast. Run on a GPU (lowering auto) for the speed-up.")


if __name__ == "__main__":
    main()
