"""The fp8_quant family on a GPU (issue 29, item 1): torchao's per-row float8 activation
quantisation fused into difffuse's norm kernel, against today's unfused path (difffuse's
norm kernel writes bf16, Inductor's kernel quantises it) and plain Inductor.

    PYTHONPATH=/tmp/site:. python benchmarks/fp8_quant_fused.py --out DIR

1. bit-equality, 2 x 4096 x 1536 bf16, row magnitudes spread by exp(N(0, 1)), outliers x40,
   zero rows: torchao's own primitives (`_choose_scale_float8`, `_quantize_affine_float8`)
   after LN + modulation (three readers, Wan's q/k/v) and after an RMSNorm, compiled with
   difffuse with and without fp8_quant; q compared as bytes, s as fp32 bits; then the same
   with torchao `quantize_` Linears (PerRow), the GEMM outputs compared; PerTensor reported.
2. timing at Wan 2.1 1.3B's (1, 32760, 1536): LN + modulation + quantisation (1 and 3
   readers, q and s returned) and the block with three torchao fp8 Linears; modes
   alternated round by round, median of `do_bench` medians.
Writes fp8_quant_fused.log and .json under --out.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import traceback

import torch
import torch.nn.functional as F
from torch import nn

BF16, F32, FP8 = torch.bfloat16, torch.float32, torch.float8_e4m3fn
D = 1536
LOG: list = []


def say(*a):
    s = " ".join(str(x) for x in a)
    print(s, flush=True)
    LOG.append(s)


def torchao_quant(x, per_row=True):
    from torchao.quantization.granularity import PerRow, PerTensor
    from torchao.quantization.quant_primitives import _choose_scale_float8, _quantize_affine_float8
    from torchao.quantization.utils import get_block_size

    bs = list(get_block_size(x.shape, PerRow() if per_row else PerTensor()))
    s = _choose_scale_float8(x, bs, FP8)
    return _quantize_affine_float8(x, s, FP8), s


def modulate(x, scale, shift):
    return (F.layer_norm(x.float(), (x.shape[-1],), eps=1e-6) * (1 + scale) + shift).type_as(x)


class NormQuant(nn.Module):
    def __init__(self, readers=3):
        super().__init__()
        self.readers = readers

    def forward(self, x, scale, shift):
        h = modulate(x, scale, shift)
        out = []
        for _ in range(self.readers):
            out += list(torchao_quant(h))
        return tuple(out)


class RMSQuant(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(D, dtype=BF16) + 0.1 * torch.randn(D).to(BF16))

    def forward(self, x):
        var = x.float().pow(2).mean(-1, keepdim=True)
        h = (x.float() * torch.rsqrt(var + 1e-6)).to(self.weight.dtype) * self.weight
        return torchao_quant(h)


class AdaLNQKV(nn.Module):
    def __init__(self):
        super().__init__()
        self.to_q, self.to_k, self.to_v = (nn.Linear(D, D) for _ in range(3))

    def forward(self, x, scale, shift):
        h = modulate(x, scale, shift)
        return self.to_q(h), self.to_k(h), self.to_v(h)


def fp8_linears(mod, per_row=True):
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, PerTensor, quantize_

    quantize_(mod, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow() if per_row else PerTensor(),
                                                              set_inductor_config=False))
    return mod


def spread_inputs(b, l, gen, zero_rows=True):
    x = torch.randn(b, l, D, device="cuda", generator=gen)
    x = x * torch.exp(torch.randn(b, l, 1, device="cuda", generator=gen))
    out = torch.rand(b, l, D, device="cuda", generator=gen) < 1e-3
    x = torch.where(out, x * 40, x).to(BF16)
    scale = 0.1 * torch.randn(b, 1, D, device="cuda", generator=gen)
    shift = 0.1 * torch.randn(b, 1, D, device="cuda", generator=gen)
    if zero_rows:  # a zero input row of the last sample, whose shift is 0: a zero row of y
        x[-1, 7] = 0
        x[-1, 100] = 0
        shift[-1] = 0
    return x, scale, shift


def compiled(mod, mode):
    import difffuse
    from difffuse.families import DEFAULTS
    from difffuse.fusion_pass.backend import difffuse_backend

    torch._dynamo.reset()
    difffuse.reset_report()
    if mode == "inductor":
        return torch.compile(mod, backend="inductor")
    opts = {"lowering": "cuda"}
    if mode == "unfused":
        opts["patterns"] = [f for f in DEFAULTS if f != "fp8_quant"]
    return torch.compile(mod, backend=difffuse_backend, options=opts)


def run(mod, mode, *args):
    import difffuse

    c = compiled(mod, mode)
    with torch.no_grad():
        out = c(*args)
    torch.cuda.synchronize()
    return out, (str(difffuse.report()) if mode != "inductor" else "")


def compare_qs(name, fused, unfused, eager=None):
    """q as bytes and s as bits, fused vs unfused, zero rows apart."""
    res = {}
    pairs = list(zip(fused[0::2], fused[1::2], unfused[0::2], unfused[1::2]))
    for i, (qf, sf, qu, su) in enumerate(pairs):
        zero = (su == 0).squeeze(-1)
        keep = ~zero
        s_ne = int((sf.view(torch.int32) != su.view(torch.int32))[keep].sum())
        q_ne = int((qf.view(torch.uint8) != qu.view(torch.uint8))[keep].sum())
        zf_ok = bool((sf[zero] == 1).all() and (qf[zero].float() == 0).all())
        zu_nan = bool(qu[zero].float().isnan().all()) if zero.any() else None
        r = {"rows": int(keep.sum()), "zero_rows": int(zero.sum()), "scale_rows_differ": s_ne,
             "fp8_elems_differ": q_ne, "elems": int(qf[keep].numel()), "fused_zero_rows_scale1_q0": zf_ok,
             "unfused_zero_rows_nan": zu_nan}
        if i == 0 and eager is not None:
            qe, se = eager
            r["fused_vs_eager_torchao_scale_rows_differ"] = int((sf.view(torch.int32) != se.view(torch.int32))[keep].sum())
            r["fused_vs_eager_torchao_fp8_elems_differ"] = int((qf.view(torch.uint8) != qe.view(torch.uint8))[keep].sum())
        if len(pairs) > 1 and i > 0:
            r["same_tensor_as_reader_0"] = bool(qf.data_ptr() == fused[0].data_ptr())
        res[f"reader{i}"] = r
        say(f"  {name} reader {i}: {r}")
    return res


def bitwise(out):
    gen = torch.Generator(device="cuda").manual_seed(0)
    x, scale, shift = spread_inputs(2, 4096, gen)
    res = {}
    # LN + modulation + torchao quantisation, three readers
    mod = NormQuant(3).cuda()
    fused, rep_f = run(mod, "fused", x, scale, shift)
    unfused, rep_u = run(mod, "unfused", x, scale, shift)
    say("fused report:\n" + rep_f)
    say("unfused report:\n" + rep_u)
    with torch.no_grad():
        eager = torchao_quant(modulate(x, scale, shift))
    res["norm_scale_shift"] = compare_qs("LN+mod+quant", fused, unfused, eager)
    res["norm_scale_shift"]["report_fused"] = rep_f
    # RMSNorm + quantisation
    torch.manual_seed(0)
    mod = RMSQuant().cuda()
    fused, rep_f = run(mod, "fused", x)
    unfused, _ = run(mod, "unfused", x)
    say("fused report (rms):\n" + rep_f)
    res["rms_norm"] = compare_qs("RMS+quant", fused, unfused)
    res["rms_norm"]["report_fused"] = rep_f
    # torchao Linears (PerRow): GEMM outputs, bitwise, zero rows apart
    torch.manual_seed(0)
    mod = fp8_linears(AdaLNQKV().to("cuda", BF16).eval())
    fused, rep_f = run(mod, "fused", x, scale, shift)
    unfused, _ = run(mod, "unfused", x, scale, shift)
    say("fused report (torchao Linears, PerRow):\n" + rep_f)
    zero = unfused[0].isnan().any(-1)
    lin = {"zero_rows_unfused_nan": int(zero.sum()),
           "outputs_bitwise_equal_elsewhere": all(torch.equal(a[~zero], b[~zero]) for a, b in zip(fused, unfused)),
           "fused_finite": all(bool(a.isfinite().all()) for a in fused)}
    say(f"  torchao Linears PerRow: {lin}")
    res["linears_per_row"] = lin
    # PerTensor: reported, not fused
    torch.manual_seed(0)
    mod = fp8_linears(AdaLNQKV().to("cuda", BF16).eval(), per_row=False)
    _, rep_t = run(mod, "fused", x[:, :512], scale, shift)
    say("fused report (torchao Linears, PerTensor):\n" + rep_t)
    res["linears_per_tensor_report"] = rep_t
    return res


def timing(out, rounds=5):
    from triton.testing import do_bench

    gen = torch.Generator(device="cuda").manual_seed(1)
    x, scale, shift = spread_inputs(1, 32760, gen, zero_rows=False)
    n = x.numel()
    cases = []
    for readers in (1, 3):
        cases.append((f"LN+mod+quant, {readers} reader(s)", NormQuant(readers).cuda(), (x, scale, shift),
                      3 * n + 4 * n // D))
    torch.manual_seed(0)
    lin = fp8_linears(AdaLNQKV().to("cuda", BF16).eval())
    cases.append(("LN+mod + 3 torchao fp8 Linears (1536x1536)", lin, (x, scale, shift), None))
    res = {}
    for name, mod, args, nbytes in cases:
        fns, reports = {}, {}
        for mode in ("inductor", "unfused", "fused"):
            c = compiled(mod, mode)
            with torch.no_grad():
                c(*args)
                c(*args)
            import difffuse
            reports[mode] = str(difffuse.report()) if mode != "inductor" else ""
            fns[mode] = (lambda c=c: c(*args))
        times = {m: [] for m in fns}
        with torch.no_grad():
            for _ in range(rounds):
                for m, fn in fns.items():
                    times[m].append(do_bench(fn, warmup=25, rep=150, return_mode="median"))
        row = {}
        for m, ts in times.items():
            ts = sorted(ts)
            med = ts[len(ts) // 2]
            row[m] = {"ms": med, "min": ts[0], "max": ts[-1]}
            if nbytes:
                row[m]["GB/s (min bytes)"] = nbytes / med / 1e6
        say(f"{name}: " + ", ".join(f"{m} {v['ms'] * 1e3:.1f} us [{v['min'] * 1e3:.1f}-{v['max'] * 1e3:.1f}]"
                                    for m, v in row.items())
            + f"; fused vs unfused {row['unfused']['ms'] / row['fused']['ms']:.2f}x, "
              f"vs inductor {row['inductor']['ms'] / row['fused']['ms']:.2f}x")
        say("  fused report: " + reports["fused"].replace("\n", "\n  "))
        res[name] = {"times": row, "fused_report": reports["fused"]}
    return res


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=".")
    p.add_argument("--skip", default="")
    args = p.parse_args(argv)
    import triton

    import difffuse  # noqa: F401
    torch._inductor.config.fx_graph_cache = False
    from torch._functorch import config as functorch_config
    functorch_config.enable_autograd_cache = False
    try:
        import torchao
        tv = torchao.__version__
    except Exception as exc:  # noqa: BLE001
        tv = f"missing ({exc})"
    info = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "torchao": tv}
    say(f"device {info}")
    result = {"info": info}
    for name, fn in (("bitwise", bitwise), ("timing", timing)):
        if name in args.skip:
            continue
        try:
            result[name] = fn(args.out)
        except Exception:  # noqa: BLE001
            tb = traceback.format_exc()
            say(f"{name} FAILED:\n{tb}")
            result[name] = {"error": tb[-3000:]}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "fp8_quant_fused.json"), "w") as f:
        json.dump(result, f, indent=1, default=str)
    with open(os.path.join(args.out, "fp8_quant_fused.log"), "w") as f:
        f.write("\n".join(LOG) + "\n")


if __name__ == "__main__":
    sys.exit(main())
