"""Shared command line for the Wan examples: build the pipeline (a real checkpoint with
--model, else a tiny random one), compile the transformer as asked, generate, report."""
from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch


class _Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The module docstring as written, and each argument's default, except where it is None
    or False (the help says what happens then)."""

    def _get_help_string(self, action):
        if action.default in (None, False):
            return action.help
        return super()._get_help_string(action)


def parse(kind: str, doc: str):
    p = argparse.ArgumentParser(description=doc, formatter_class=_Formatter)
    p.add_argument("--model", default=None, help="checkpoint path or hub id (default: tiny random pipeline)")
    p.add_argument("--compile", default="difffuse", choices=["none", "inductor", "difffuse"],
                   help="how to compile the transformer (difffuse on CPU uses the reference lowering)")
    p.add_argument("--regional", action="store_true", help="compile_repeated_blocks instead of the whole model")
    p.add_argument("--steps", type=int, default=4, help="denoising steps")
    p.add_argument("--height", type=int, default=32, help="video height in pixels")
    p.add_argument("--width", type=int, default=32, help="video width in pixels")
    p.add_argument("--frames", type=int, default=9, help="number of frames")
    p.add_argument("--guidance", type=float, default=5.0, help="classifier-free guidance scale")
    p.add_argument("--prompt", default="a cat surfing a wave at sunset", help="prompt (only with --model)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="device to run on")
    p.add_argument("--output", default=os.path.join("outputs", f"wan_{kind}.gif"),
                   help="where to write the frames (.gif or .npy); its directory is created")
    return p.parse_args()


def load(kind: str, args):
    """(pipeline, call kwargs) for a real checkpoint or the tiny default."""
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    kw = dict(height=args.height, width=args.width, num_frames=args.frames, num_inference_steps=args.steps,
              guidance_scale=args.guidance, output_type="np")
    if args.model:
        from diffusers import DiffusionPipeline

        pipe = DiffusionPipeline.from_pretrained(args.model, torch_dtype=dtype)
        kw["prompt"] = args.prompt
    else:
        from difffuse.testing.tiny_pipelines import PIPELINES, prompt_embeds, to_dtype_pipeline

        pipe = to_dtype_pipeline(PIPELINES[kind](), dtype)
        pe, ne = prompt_embeds()
        kw.update(prompt_embeds=pe.to(dtype), negative_prompt_embeds=ne.to(dtype))
    if kind == "i2v":
        from PIL import Image

        rng = np.random.default_rng(0)
        kw["image"] = Image.fromarray((rng.random((args.height, args.width, 3)) * 255).astype("uint8"))
    return pipe.to(args.device), kw


def compile_transformer(pipe, args):
    if args.compile == "none":
        return
    backend = "difffuse" if args.compile == "difffuse" else "inductor"
    options = {"lowering": "reference"} if (backend == "difffuse" and args.device == "cpu") else None
    if args.regional:
        pipe.transformer.compile_repeated_blocks(backend=backend, options=options)
    else:
        pipe.transformer = torch.compile(pipe.transformer, backend=backend, options=options)


def run(kind: str, doc: str):
    args = parse(kind, doc)
    pipe, kw = load(kind, args)
    compile_transformer(pipe, args)
    stamps = []

    def on_step(_pipe, _i, _t, cb_kwargs):
        if args.device == "cuda":
            torch.cuda.synchronize()
        stamps.append(time.perf_counter())
        return cb_kwargs

    with torch.no_grad():
        t0 = time.perf_counter()
        frames = pipe(**kw, callback_on_step_end=on_step).frames[0]
        total = time.perf_counter() - t0
    steps = np.diff(stamps) * 1e3
    if args.compile == "difffuse":
        import difffuse

        print(difffuse.report())
    print(f"{kind}: {len(frames)} frames {args.height}x{args.width}, {args.steps} steps, compile={args.compile}"
          f"{' regional' if args.regional else ''}: total {total:.2f} s (first step incl. compile "
          f"{(stamps[0] - t0):.2f} s), later steps median {np.median(steps) if len(steps) else float('nan'):.1f} ms")
    save(frames, args.output)
    print(f"wrote {args.output}")


def save(frames, path: str):
    if os.path.dirname(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
    if path.endswith(".npy"):
        np.save(path, frames)
        return
    from PIL import Image

    images = [Image.fromarray((np.clip(f, 0, 1) * 255).astype("uint8")) for f in frames]
    images[0].save(path, save_all=True, append_images=images[1:], duration=100, loop=0)
