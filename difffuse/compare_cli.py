"""The `python -m difffuse compare` subcommand: its arguments and its entry point (the
work is in difffuse.compare)."""
from __future__ import annotations

import json
import sys

import torch

from difffuse.compare import BACKENDS, DTYPES, QUANT_SPECS, CompareError, OptionSet, compare, format_result
from difffuse.compare import __doc__ as COMPARE_DOC



def add_parser(sub, formatter_class) -> None:
    """Register the `compare` subcommand on `python -m difffuse`'s subparsers."""
    p = sub.add_parser(
        "compare", formatter_class=formatter_class,
        help="run a model twice (same seed) with two option sets and print how far B is from A",
        description=COMPARE_DOC.split("\n\n")[0] + "\n\nExample: --b-dtype bfloat16 --b-quant torchao-fp8-row "
                    "--b-backend difffuse against the bf16 eager default A. Needs diffusers.")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", default=None, help="a tiny built-in transformer (default wan-t2v-tiny), "
                     "random weights, in an Euler loop: " + ", ".join(_model_names()))
    src.add_argument("--pipeline", default=None, choices=["t2v", "i2v", "ti2v"],
                     help="a tiny built-in Wan pipeline (random weights, no download); prints frame PSNR/SSIM")
    src.add_argument("--checkpoint", default=None, help="a diffusers pipeline: local path or hub id")
    p.add_argument("--prompt", default="a cat surfing a wave at sunset", help="prompt (with --checkpoint)")
    p.add_argument("--steps", type=int, default=4, help="denoising steps")
    p.add_argument("--seed", type=int, default=0, help="seed of both runs")
    p.add_argument("--layers", type=int, default=2, help="transformer blocks of a tiny --model")
    for k, tiny in (("height", 32), ("width", 32), ("frames", 9)):
        p.add_argument(f"--{k}", type=int, default=None, help=f"pipeline {k} (default: {tiny} for a tiny "
                       "pipeline, the pipeline's own for a checkpoint)")
    p.add_argument("--guidance", type=float, default=None, help="pipeline guidance scale (default: its own)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="device to run on")
    for side, backend in (("a", "none"), ("b", "difffuse")):
        name = "A, the reference" if side == "a" else "B, the candidate"
        p.add_argument(f"--{side}-backend", default=backend, choices=BACKENDS, help=f"{name}: compile backend "
                       "(none = eager)")
        p.add_argument(f"--{side}-options", default=None, help=f"{name}: compile options as JSON, e.g. "
                       "'{\"lowering\": \"reference\"}' (difffuse on CPU defaults to the reference lowering)")
        p.add_argument(f"--{side}-dtype", default=None, choices=DTYPES,
                       help=f"{name}: dtype (default float32 on CPU, bfloat16 on a GPU)")
        p.add_argument(f"--{side}-quant", default=None, choices=QUANT_SPECS, help=f"{name}: quantise the "
                       "transformer's Linears with torchao (float8 dynamic activation + weight, per row or tensor)")
        p.add_argument(f"--{side}-regional", action="store_true", help=f"{name}: compile_repeated_blocks")


def _model_names() -> list:
    from difffuse.testing.tiny_dits import DITS
    from difffuse.testing.tiny_models import MODELS

    return sorted({**MODELS, **DITS})


def cli(args) -> int:
    """`python -m difffuse compare ...` (parsed by add_parser's parser)."""
    sets = []
    for side in ("a", "b"):
        raw = getattr(args, f"{side}_options")
        try:
            options = json.loads(raw) if raw else None
        except json.JSONDecodeError as exc:
            print(f"--{side}-options: not JSON ({exc}): {raw!r}", file=sys.stderr)
            return 2
        sets.append(OptionSet(getattr(args, f"{side}_backend"), options, getattr(args, f"{side}_dtype"),
                              getattr(args, f"{side}_quant"), getattr(args, f"{side}_regional")))
    source = {}
    if args.pipeline or args.checkpoint:
        tiny = args.pipeline is not None
        source["pipeline"] = args.pipeline or args.checkpoint
        source["call"] = dict(prompt=args.prompt, height=args.height or (32 if tiny else None),
                              width=args.width or (32 if tiny else None),
                              num_frames=args.frames or (9 if tiny else None), guidance_scale=args.guidance)
    else:
        source["model"] = args.model or "wan-t2v-tiny"
    try:
        import diffusers  # noqa: F401
    except ImportError as exc:
        print(f"python -m difffuse compare: needs diffusers ({exc}); `pip install diffusers`", file=sys.stderr)
        return 2
    try:
        r = compare(*sets, steps=args.steps, seed=args.seed, device=args.device, layers=args.layers, **source)
    except CompareError as exc:
        print(f"python -m difffuse compare: {exc}", file=sys.stderr)
        return 2
    print(format_result(r, args.device))
    return 0
