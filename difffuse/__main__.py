"""`python -m difffuse report --model wan-t2v-tiny [--regional] [--lowering reference]`:
compile a tiny model with the difffuse backend, run one step and print the fusion report."""
from __future__ import annotations

import argparse
import logging
import sys

import torch

DESCRIPTION = "difffuse: a torch.compile backend that fuses the memory-bound subgraphs of diffusion transformers."
EPILOG = ("More: `python -m difffuse report --help`; the fuzzer: `python -m difffuse.testing.fuzz --help`; "
          "in Python, torch.compile(model, backend=\"difffuse\") and difffuse.report().")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each argument's default, except where it is None (its help says what happens)."""

    def _get_help_string(self, action):
        if action.default is None:
            return action.help
        return super()._get_help_string(action)


def _model_names() -> list[str]:
    # the registries import only torch; diffusers is imported when a model is built
    from difffuse.testing.tiny_dits import DITS
    from difffuse.testing.tiny_models import MODELS

    return sorted({**MODELS, **DITS})


def build_parser() -> argparse.ArgumentParser:
    from difffuse.fusion_pass.config import LOWERING_NAMES

    parser = argparse.ArgumentParser(prog="python -m difffuse", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=_HelpFormatter)
    sub = parser.add_subparsers(dest="cmd", title="commands", metavar="COMMAND")
    rep = sub.add_parser(
        "report", formatter_class=_HelpFormatter,
        help="compile a tiny diffusion transformer (random weights, no download) and print the fusion report",
        description="Build a tiny diffusion transformer from its diffusers config (random weights, no "
                    "download), compile it with backend=\"difffuse\", run one step and print the fusion "
                    "report, the site coverage and the max difference from eager. Needs diffusers.")
    rep.add_argument("--model", default="wan-t2v-tiny", choices=_model_names(), help="which tiny model")
    rep.add_argument("--layers", type=int, default=2, help="number of transformer blocks")
    rep.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                     help="dtype of the weights and inputs")
    rep.add_argument("--lowering", default=None, choices=LOWERING_NAMES,
                     help="the difffuse lowering (default: reference on CPU, which shows the rewrites "
                          "with pure-PyTorch fused ops; auto on a GPU)")
    rep.add_argument("--regional", action="store_true",
                     help="compile_repeated_blocks (one compiled block, reused) instead of the whole model")
    rep.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                     help="device to run on")
    from difffuse.compare_cli import add_parser as add_compare

    add_compare(sub, _HelpFormatter)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.cmd is None:  # bare `python -m difffuse`: what it can do
        parser.print_help()
        return 0
    if args.cmd == "compare":
        from difffuse.compare_cli import cli as compare_cli

        return compare_cli(args)
    return report(args)


def report(args) -> int:
    try:
        import diffusers  # noqa: F401
    except ImportError as exc:
        print(f"python -m difffuse report: needs diffusers, which is not importable ({exc}); "
              "install it with `pip install diffusers`", file=sys.stderr)
        return 2
    from difffuse.testing.tiny_dits import DITS
    from difffuse.testing.tiny_models import MODELS

    models = {**MODELS, **DITS}
    logging.basicConfig(level=logging.WARNING)

    import difffuse

    dtype = getattr(torch, args.dtype)
    model, kwargs = models[args.model](num_layers=args.layers, dtype=dtype)
    model = model.to(args.device)
    kwargs = {k: v.to(args.device) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    lowering = args.lowering or ("reference" if args.device == "cpu" else "auto")
    options = {"lowering": lowering}
    with torch.no_grad():
        ref = model(**kwargs)[0]
        difffuse.reset_report()
        if args.regional:
            model.compile_repeated_blocks(backend="difffuse", options=options)
            out = model(**kwargs)[0]
        else:
            out = torch.compile(model, backend="difffuse", options=options)(**kwargs)[0]
    rep = difffuse.report()
    print(rep)
    if rep.unknown:
        print("site coverage: unknown (a cached graph without a difffuse record; run with a fresh "
              "TORCHINDUCTOR_CACHE_DIR to recount)")
    elif not args.regional:
        from difffuse.testing import sites

        model_sites = sites.count_eager_sites(model, kwargs)
        print(sites.format_table(args.model, sites.coverage(model_sites, rep), model_sites))
    print(f"model {args.model}, {args.layers} layers, {args.dtype}, {'regional' if args.regional else 'full'}"
          f" compile, lowering {lowering}: max |compiled - eager| = {(out.float() - ref.float()).abs().max():.3g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
