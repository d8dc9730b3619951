"""`python -m difffuse compare`: run one model twice, same seed, two option sets (A = the
reference, B = the candidate: a compile backend and its options, a dtype, a quantisation),
and print how far B's per-step latents are from A's (relative error, cosine) and, for a
pipeline, the PSNR and SSIM of B's decoded frames against A's.

Three kinds of model: a tiny built-in transformer (`--model wan-t2v-tiny`, random weights),
run in a small deterministic flow-matching Euler loop written here (sigma from 1 to 0, the
transformer's output taken as the velocity); a tiny built-in Wan pipeline (`--pipeline t2v`);
or a diffusers checkpoint (`--checkpoint PATH_OR_ID`, with `--prompt`). Pipelines are run
with diffusers' `callback_on_step_end`, which hands over the latents after each step.
Frame metrics (`difffuse.compare_metrics`) need no downloaded weights.
"""
from __future__ import annotations

import dataclasses
import gc
import inspect
import json
import time
from typing import Optional

import torch

from difffuse.compare_metrics import cosine, frame_metrics, rel_err

BACKENDS = ("none", "inductor", "difffuse")
QUANT_SPECS = ("torchao-fp8-row", "torchao-fp8-tensor")
DTYPES = ("float32", "bfloat16", "float16")


class CompareError(RuntimeError):
    """A bad option set or a missing / refusing quantisation library (the CLI prints it)."""


@dataclasses.dataclass
class OptionSet:
    """How one run builds its model: dtype, quantisation (of the transformer), compile."""
    backend: str = "none"
    options: Optional[dict] = None
    dtype: Optional[str] = None  # None: float32 on CPU, bfloat16 on a GPU
    quant: Optional[str] = None
    regional: bool = False

    def resolved(self, device: str) -> "OptionSet":
        if self.backend not in BACKENDS:
            raise CompareError(f"backend {self.backend!r}: expected one of {', '.join(BACKENDS)}")
        if self.quant is not None and self.quant not in QUANT_SPECS:
            raise CompareError(f"quantisation {self.quant!r}: expected one of {', '.join(QUANT_SPECS)}")
        dtype = self.dtype or ("float32" if device == "cpu" else "bfloat16")
        if dtype not in DTYPES:
            raise CompareError(f"dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
        options = dict(self.options or {})
        if self.backend == "difffuse" and device == "cpu" and "lowering" not in options:
            options["lowering"] = "reference"  # on CPU "auto" rewrites nothing
        return dataclasses.replace(self, dtype=dtype, options=options or None)

    def describe(self) -> str:
        parts = ["eager" if self.backend == "none" else self.backend + (" regional" if self.regional else "")]
        if self.options:
            parts.append(json.dumps(self.options, sort_keys=True))
        parts.append(str(self.dtype))
        if self.quant:
            parts.append(self.quant)
        return ", ".join(parts)


def quantize(module: torch.nn.Module, spec: str) -> None:
    """Apply a quantisation spec to `module` in place (torchao is imported only here)."""
    try:
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, PerTensor, quantize_
    except ImportError as exc:
        raise CompareError(f"quantisation {spec!r} needs torchao, which is not importable ({exc}); "
                           "install it with `pip install torchao`") from None
    granularity = PerRow() if spec == "torchao-fp8-row" else PerTensor()
    try:
        quantize_(module, Float8DynamicActivationFloat8WeightConfig(granularity=granularity))
    except AssertionError as exc:  # torchao's hardware and dtype checks
        raise CompareError(f"torchao refused {spec!r}: {exc}") from None


def prepare(model: torch.nn.Module, opts: OptionSet):
    """Cast (diffusers' fp32 keep-modules kept), quantise, compile; returns what to call."""
    from difffuse.testing.tiny_models import to_dtype

    to_dtype(model, getattr(torch, opts.dtype))
    if opts.quant:
        quantize(model, opts.quant)
    if opts.backend == "none":
        return model
    if opts.regional:
        model.compile_repeated_blocks(backend=opts.backend, options=opts.options)
        return model
    return torch.compile(model, backend=opts.backend, options=opts.options)


def _reset():
    torch._dynamo.reset()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_tiny(name: str, opts: OptionSet, steps: int, seed: int, device: str, layers: int = 2):
    """A built-in tiny transformer in an Euler loop: (latents after each step, model outputs)."""
    from difffuse.testing.tiny_dits import DITS
    from difffuse.testing.tiny_models import MODELS

    model, kwargs = {**MODELS, **DITS}[name](num_layers=layers, dtype=torch.float32, seed=seed)
    model = model.to(device)
    dtype = getattr(torch, opts.dtype)
    kwargs = {k: (v.to(device, dtype) if v.is_floating_point() else v.to(device))
              if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    fn = prepare(model, opts)
    shape, t0 = kwargs.pop("hidden_states").shape, kwargs.pop("timestep")
    # the starting noise, seeded here so that it does not depend on the dtype
    inp = torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(device)
    x = cond = cond_dim = None
    latents, outs = [], []
    sigmas = torch.linspace(1.0, 0.0, steps + 1).tolist()
    with torch.no_grad():
        for i in range(steps):
            if x is not None:
                inp = x if cond is None else torch.cat([x, cond], dim=cond_dim)
            s = sigmas[i]
            t = torch.full_like(t0, s if t0.is_floating_point() and float(t0.max()) <= 1 else s * 1000)
            out = fn(hidden_states=inp.to(dtype), timestep=t, **kwargs)[0].float()
            if x is None:
                x, cond, cond_dim = _split_condition(inp, out)
            x = x + (sigmas[i + 1] - s) * out  # flow matching: the output is the velocity
            latents.append(x.cpu())
            outs.append(out.cpu())
    return latents, outs


def _split_condition(inp, out):
    """(latent, fixed condition channels or None, their dim): an I2V model reads
    cat([latent, image condition]) and predicts only the latent's channels."""
    if inp.shape == out.shape:
        return inp, None, None
    diff = [d for d in range(inp.dim()) if inp.shape[d] != out.shape[d]]
    if inp.dim() != out.dim() or len(diff) != 1 or out.shape[diff[0]] > inp.shape[diff[0]]:
        raise CompareError(f"model output {tuple(out.shape)} does not match its input {tuple(inp.shape)}")
    d, n = diff[0], out.shape[diff[0]]
    return inp.narrow(d, 0, n), inp.narrow(d, n, inp.shape[d] - n), d


def _tiny_pipeline(kind: str, seed: int):
    from difffuse.testing.tiny_pipelines import PIPELINES, prompt_embeds

    pipe = PIPELINES[kind](seed)
    pe, ne = prompt_embeds()
    return pipe, dict(prompt_embeds=pe, negative_prompt_embeds=ne)


def run_pipeline(source: str, opts: OptionSet, steps: int, seed: int, device: str, call: dict):
    """A diffusers pipeline (tiny kind "t2v"/"i2v"/"ti2v", or a checkpoint path or hub id):
    (latents after each step, decoded frames as a float array in [0, 1], frames x H x W x C)."""
    import numpy as np

    dtype = getattr(torch, opts.dtype)
    if source in ("t2v", "i2v", "ti2v"):
        pipe, kw = _tiny_pipeline(source, seed)
        kw = {k: v.to(device, dtype) for k, v in kw.items()}
    else:
        from diffusers import DiffusionPipeline

        pipe, kw = DiffusionPipeline.from_pretrained(source, torch_dtype=dtype), {"prompt": call.get("prompt")}
    pipe.transformer = prepare(pipe.transformer, opts)
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    params = inspect.signature(pipe.__call__).parameters
    kw.update({k: v for k, v in call.items() if k in params and k != "prompt" and v is not None})
    if "image" in params:  # image-to-video: a fixed random image
        from PIL import Image

        h, w = call.get("height") or 32, call.get("width") or 32
        kw["image"] = Image.fromarray((np.random.default_rng(seed).random((h, w, 3)) * 255).astype("uint8"))
    latents = []

    def on_step(_pipe, _i, _t, cb_kwargs):
        latents.append(cb_kwargs["latents"].detach().float().cpu())
        return cb_kwargs

    with torch.no_grad():
        res = pipe(**kw, num_inference_steps=steps, output_type="np", callback_on_step_end=on_step,
                   generator=torch.Generator().manual_seed(seed))
    frames = res.frames[0] if hasattr(res, "frames") else res.images
    frames = np.asarray(frames, dtype=np.float64)
    return latents, frames.reshape((-1,) + frames.shape[-3:])


def compare(a: OptionSet, b: OptionSet, *, model: Optional[str] = None, pipeline: Optional[str] = None,
            steps: int = 4, seed: int = 0, device: str = "cpu", layers: int = 2, call: Optional[dict] = None):
    """Run A then B; returns a dict: per-step rows, and for a pipeline the frame metrics."""
    a, b = a.resolved(device), b.resolved(device)
    runs = []
    for opts in (a, b):
        _reset()
        start = time.perf_counter()
        if model is not None:
            runs.append(run_tiny(model, opts, steps, seed, device, layers))
        else:
            runs.append(run_pipeline(pipeline, opts, steps, seed, device, call or {}))
        runs[-1] = (*runs[-1], time.perf_counter() - start)
    _reset()
    (lat_a, extra_a, sec_a), (lat_b, extra_b, sec_b) = runs
    rows = []
    for i, (la, lb) in enumerate(zip(lat_a, lat_b)):
        row = {"step": i, "latent_rel_err": rel_err(lb, la), "latent_cos": cosine(lb, la)}
        if model is not None:
            row.update(out_rel_err=rel_err(extra_b[i], extra_a[i]), out_cos=cosine(extra_b[i], extra_a[i]))
        rows.append(row)
    result = {"a": a, "b": b, "steps": rows, "seconds": (sec_a, sec_b), "model": model or pipeline}
    if model is None:
        result["frames"] = frame_metrics(extra_b, extra_a)
    return result


def format_result(r: dict, device: str) -> str:
    lines = [f"compare {r['model']} on {device}: {len(r['steps'])} steps, same seed",
             f"  A (reference): {r['a'].describe()}   [{r['seconds'][0]:.1f} s, build and compile included]",
             f"  B:             {r['b'].describe()}   [{r['seconds'][1]:.1f} s]"]
    has_out = "out_rel_err" in r["steps"][0] if r["steps"] else False
    head = f"{'step':>4}  {'latent rel err':>14}  {'latent cos':>12}"
    lines.append(head + (f"  {'output rel err':>14}  {'output cos':>12}" if has_out else ""))
    for s in r["steps"]:
        line = f"{s['step']:>4}  {s['latent_rel_err']:>14.3e}  {s['latent_cos']:>12.9f}"
        lines.append(line + (f"  {s['out_rel_err']:>14.3e}  {s['out_cos']:>12.9f}" if has_out else ""))
    if "frames" in r:
        f = r["frames"]
        lines.append(f"decoded frames ({f['count']} of {f['height']}x{f['width']}, values in [0, 1]; PSNR with "
                     f"peak 1.0, SSIM Gaussian window 11, sigma 1.5, per frame): PSNR mean {f['psnr_mean']:.2f} dB "
                     f"(worst frame {f['psnr_min']:.2f}), SSIM mean {f['ssim_mean']:.6f} (worst {f['ssim_min']:.6f})")
    return "\n".join(lines)

