"""difffuse demo: a small Wan 2.1 transformer (diffusers config, random weights, no
downloads) denoises a latent video for a few steps, eager and compiled with
`backend="difffuse"`; prints the fusion report, the times and the max difference.

    python examples/demo.py [--steps 4] [--layers 4] [--device cpu|cuda]

On CPU the reference lowering is used (pure-PyTorch fused ops); on a GPU, auto.
"""
from __future__ import annotations

import argparse
import time

import torch


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


def denoise(transformer, scheduler, latents, text, steps):
    scheduler.set_timesteps(steps, device=latents.device)
    for t in scheduler.timesteps:
        noise_pred = transformer(hidden_states=latents, timestep=t.expand(latents.shape[0]),
                                 encoder_hidden_states=text, return_dict=False)[0]
        latents = scheduler.step(noise_pred, t, latents, return_dict=False)[0]
    return latents


def timed(fn):
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, time.perf_counter() - t0


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--frames", type=int, default=5)
    parser.add_argument("--size", type=int, default=32, help="latent height and width")
    args = parser.parse_args()
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    lowering = "auto" if args.device == "cuda" else "reference"

    import difffuse

    model, scheduler = build(args.device, dtype, args.layers)
    gen = torch.Generator().manual_seed(1)
    latents = torch.randn(1, 16, args.frames, args.size, args.size, generator=gen).to(args.device, dtype)
    text = torch.randn(1, 32, 64, generator=gen).to(args.device, dtype)

    with torch.no_grad():
        ref, t_eager = timed(lambda: denoise(model, scheduler, latents, text, args.steps))
        compiled = torch.compile(model, backend="difffuse", options={"lowering": lowering})
        _, t_first = timed(lambda: denoise(compiled, scheduler, latents, text, args.steps))
        out, t_comp = timed(lambda: denoise(compiled, scheduler, latents, text, args.steps))

    print(difffuse.report())
    print(f"\ndevice {args.device}, {dtype}, lowering {lowering}, {args.layers} layers, {args.steps} steps")
    print(f"eager    {t_eager * 1e3 / args.steps:8.1f} ms/step")
    print(f"difffuse {t_comp * 1e3 / args.steps:8.1f} ms/step  (first run incl. compile {t_first:.1f} s)")
    print(f"max |difffuse - eager| = {(out.float() - ref.float()).abs().max().item():.3g}")


if __name__ == "__main__":
    main()
