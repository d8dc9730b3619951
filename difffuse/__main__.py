"""`python -m difffuse report --model wan-t2v-tiny [--regional] [--lowering reference]`:
compile a tiny model with the difffuse backend, run one step and print the fusion report."""
from __future__ import annotations

import argparse
import logging
import sys

import torch


def main(argv=None) -> int:
    from difffuse.testing.tiny_dits import DITS
    from difffuse.testing.tiny_models import MODELS

    MODELS = {**MODELS, **DITS}

    parser = argparse.ArgumentParser(prog="python -m difffuse")
    sub = parser.add_subparsers(dest="cmd", required=True)
    rep = sub.add_parser("report", help="compile a tiny model and print the fusion report")
    rep.add_argument("--model", default="wan-t2v-tiny", choices=sorted(MODELS))
    rep.add_argument("--layers", type=int, default=2)
    rep.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    rep.add_argument("--lowering", default=None,
                     help="default: reference on CPU, auto on a GPU")
    rep.add_argument("--regional", action="store_true", help="compile_repeated_blocks instead of the whole model")
    rep.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    import difffuse

    dtype = getattr(torch, args.dtype)
    model, kwargs = MODELS[args.model](num_layers=args.layers, dtype=dtype)
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
