"""How torchao's dynamic float8 activation quantisation appears in a post-grad aten graph
(issue 29, item 1, first step): the ops between a norm / GELU output and `_scaled_mm`, their
constants, the Triton code Inductor makes of them, and how equal Inductor's result is to
torchao's eager one, bit for bit.

    python -m benchmarks.fp8_graph_probe [--out DIR] [--device cuda]

Blocks (bf16 weights, Wan 2.1 1.3B widths D=1536, FFN 8960):
  adaln_qkv   fp32 LayerNorm (no affine) -> *(1+scale)+shift (fp32 modulation) -> .type_as(x)
              -> to_q, to_k, to_v (three Linears reading the same normed input, as Wan's attn1)
  rms_linear  diffusers-style RMSNorm (fp32 statistics, bf16 weight) -> Linear
  ffn_gelu    Linear -> tanh-GELU -> Linear (Wan's FFN)
Each block's Linears are quantised with torchao's
`Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())` and `PerTensor()` (with
`set_inductor_config=False`: its coordinate-descent tuning changes launch configs, not the
graph, and would multiply the compile time), compiled
with plain Inductor and a post-grad custom pass that dumps the graph; the walk back from each
`_scaled_mm` prints the quantisation ops. Then the bitwise section compiles torchao's own
quantisation primitives (and LN+modulation+quantisation together) and compares data and
scales with eager torchao and with candidate formulas; then a zero row; then the difffuse
backend on the per-row blocks (what it matches, what the quantisation reads).

Needs torchao (0.18 was read); `--allow-cpu` skips torchao's hardware check so the graph part
runs on a CPU (the CPU lowering keeps `div` by a constant, so the code there is not the GPU's).
Writes fp8_graph_probe.log (everything printed), fp8_graph_code.txt (all generated code) and
fp8_graph_probe.json (the bitwise counts) under --out.
"""
from __future__ import annotations

import argparse
import copy
import io
import json
import os
import re
import sys
import uuid

import torch
import torch.nn.functional as F
from torch import nn

BF16, F32, FP8 = torch.bfloat16, torch.float32, torch.float8_e4m3fn
D, FF, L = 1536, 8960, 512

# ops that may sit between a high-precision activation and _scaled_mm (the walk stops elsewhere)
QUANT_OPS = {"abs", "amax", "max", "div", "reciprocal", "clamp_min", "clamp_max", "clamp", "convert_element_type",
             "reshape", "view", "_unsafe_view", "unsqueeze", "squeeze", "expand", "permute", "clone", "where",
             "full", "scalar_tensor", "maximum", "minimum", "eq", "ne", "isnan", "log2", "exp2", "round",
             "select", "slice", "contiguous", "_to_copy", "copy"}


class Tee(io.TextIOBase):
    def __init__(self, *streams):
        self.streams = streams

    def write(self, s):
        for st in self.streams:
            st.write(s)
        return len(s)

    def flush(self):
        for st in self.streams:
            st.flush()


# --- blocks -------------------------------------------------------------------------------------

class AdaLNQKV(nn.Module):
    def __init__(self):
        super().__init__()
        self.to_q, self.to_k, self.to_v = (nn.Linear(D, D) for _ in range(3))

    def forward(self, x, scale, shift):
        h = (F.layer_norm(x.float(), (D,), eps=1e-6) * (1 + scale) + shift).type_as(x)
        return self.to_q(h), self.to_k(h), self.to_v(h)


class RMSLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(D) + 0.1 * torch.randn(D))
        self.proj = nn.Linear(D, D)

    def forward(self, x):
        var = x.float().pow(2).mean(-1, keepdim=True)
        h = x.float() * torch.rsqrt(var + 1e-6)
        h = h.to(self.weight.dtype) * self.weight
        return self.proj(h)


class FFNGelu(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(D, FF), nn.Linear(FF, D)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


def inputs(name, device, gen):
    x = torch.randn(1, L, D, device=device, generator=gen).to(BF16)
    if name == "adaln_qkv":
        return (x, 0.1 * torch.randn(1, 1, D, device=device, generator=gen),
                0.1 * torch.randn(1, 1, D, device=device, generator=gen))
    return (x,)


BLOCKS = {"adaln_qkv": AdaLNQKV, "rms_linear": RMSLinear, "ffn_gelu": FFNGelu}


# --- graph capture ------------------------------------------------------------------------------

def _dump_pass(store):
    from torch._inductor.custom_graph_pass import CustomGraphPass

    class Dump(CustomGraphPass):
        def __call__(self, graph):
            store.append(graph)
            store.append(str(graph))

        def uuid(self):
            return uuid.uuid4().hex  # never a cache hit

    return Dump()


def _val(n):
    v = n.meta.get("val") if isinstance(n, torch.fx.Node) else None
    if isinstance(v, torch.Tensor):
        return f"{str(v.dtype).replace('torch.', '')}{list(v.shape)}"
    return ""


def _arg(a):
    if isinstance(a, torch.fx.Node):
        return f"%{a.name}"
    if isinstance(a, (list, tuple)):
        return "[" + ", ".join(_arg(x) for x in a) + "]"
    if isinstance(a, float):
        return repr(a)
    return str(a).replace("torch.", "")


def fmt(n):
    tgt = getattr(n.target, "__name__", str(n.target))
    args = ", ".join([_arg(a) for a in n.args] + [f"{k}={_arg(v)}" for k, v in n.kwargs.items()])
    return f"%{n.name} = {tgt}({args})  -> {_val(n)}"


def _opname(n):
    return getattr(n.target, "__name__", str(n.target)).split(".")[0] if n.op == "call_function" else n.op


def quant_chain(mm):
    """The nodes between _scaled_mm's fp8 operand / scale_a and the first non-quantisation op."""
    seen, stops, stack = set(), {}, [mm.args[0], mm.args[2]]
    while stack:
        n = stack.pop()
        if not isinstance(n, torch.fx.Node) or n in seen or n in stops:
            continue
        if n.op == "call_function" and _opname(n) in QUANT_OPS:
            seen.add(n)
            stack.extend(a for a in n.all_input_nodes)
        else:
            stops[n] = True
    order = {n: i for i, n in enumerate(mm.graph.nodes)}
    return sorted(seen, key=order.get), sorted(stops, key=order.get)


def describe_graph(graph, out):
    mms = [n for n in graph.nodes if n.op == "call_function" and _opname(n) == "_scaled_mm"]
    print(f"  {len(mms)} _scaled_mm; amax nodes: "
          f"{sum(1 for n in graph.nodes if _opname(n) in ('amax', 'max'))}", file=out)
    summary = []
    for mm in mms:
        chain, stops = quant_chain(mm)
        print(f"  {fmt(mm)}", file=out)
        for s in stops:
            print(f"    reads  {fmt(s) if s.op == 'call_function' else '%' + s.name + ' ' + s.op + ' ' + _val(s)}",
                  file=out)
        for n in chain:
            print(f"    {fmt(n)}", file=out)
        summary.append([_opname(n) for n in chain])
    return summary


def compile_and_dump(mod, args, backend="inductor", options=None):
    from torch._inductor.utils import run_and_get_code

    store = []
    torch._dynamo.reset()
    with torch._inductor.config.patch(post_grad_custom_post_pass=_dump_pass(store), fx_graph_cache=False):
        if backend == "inductor":
            comp = torch.compile(mod, backend="inductor")
        else:
            comp = torch.compile(mod, backend=backend, options=options)
        with torch.no_grad():
            res, codes = run_and_get_code(comp, *args)
    return res, [g for g in store if not isinstance(g, str)], codes


def fp8_kernels(code):
    """The Triton kernels of a generated module that touch fp8 or the 448 constant, and the
    wrapper lines that call _scaled_mm."""
    out = []
    for m in re.finditer(r"@triton\.jit\ndef (\w+)\(.*?(?=\n''', device_str|\n\n\n|\Z)", code, re.S):
        body = m.group(0)
        if re.search(r"float8|448|0\.002232", body):
            out.append(body)
    calls = [ln.strip() for ln in code.splitlines() if "_scaled_mm" in ln and "extern_kernels" in ln]
    return out, calls


# --- bitwise ------------------------------------------------------------------------------------

def torchao_quant(x, granularity):
    from torchao.quantization.quant_primitives import _choose_scale_float8, _quantize_affine_float8
    from torchao.quantization.utils import get_block_size

    bs = list(get_block_size(x.shape, granularity))
    s = _choose_scale_float8(x, bs, FP8)
    return _quantize_affine_float8(x, s, FP8), s


def modulate(x, scale, shift):
    return (F.layer_norm(x.float(), (x.shape[-1],), eps=1e-6) * (1 + scale) + shift).type_as(x)


def _neq(a, b):
    a, b = a.reshape(-1), b.reshape(-1)
    if a.dtype == FP8:
        a, b = a.view(torch.uint8), b.view(torch.uint8)
    return int((a != b).sum())


def _fp8_ulps(a, b):
    """Largest distance between two fp8 e4m3fn tensors in representable steps (NaN-free)."""
    def code(t):
        u = t.reshape(-1).view(torch.uint8).to(torch.int32)
        return torch.where(u >= 128, -(u - 128), u)
    return int((code(a) - code(b)).abs().max()) if a.numel() else 0


def _gelu32(y, s_=None, b_=None):
    return F.gelu(y.float(), approximate="tanh")


def _mod32(x, s_, b_):
    return F.layer_norm(x.float(), (x.shape[-1],), eps=1e-6) * (1 + s_) + b_


# case -> (fp32 producer before the bf16 cast, whether the compiled function also returns the bf16
# activation (materialising it), emulate_precision_casts)
CASES = {
    "quant": (None, False, False),
    "ln_mod_quant": (_mod32, False, False),
    "ln_mod_quant_returning_activation": (_mod32, True, False),
    "gelu_quant": (_gelu32, False, False),
    "ln_mod_quant_emulate_precision_casts": (_mod32, False, True),
}


def bitwise(device, gen, out):
    """Compiled torchao quantisation (with its producer) against eager torchao and against
    candidate formulas, element by element."""
    from torch._inductor.utils import run_and_get_code
    from torchao.quantization import PerRow, PerTensor

    res = {}
    x = torch.randn(2, 8 * L, D, device=device, generator=gen)
    x = x * torch.exp(torch.randn(2, 8 * L, 1, device=device, generator=gen))  # rows of varied magnitude
    x[0, :4, :8] *= 40  # outliers
    x = x.to(BF16)
    scale = 0.1 * torch.randn(2, 1, D, device=device, generator=gen)
    shift = 0.1 * torch.randn(2, 1, D, device=device, generator=gen)
    recip = torch.tensor(1 / 448.0, dtype=F32).item()  # the fp32 constant Inductor multiplies by
    for gname, gran in (("per_row", PerRow()), ("per_tensor", PerTensor())):
        red = dict(dim=-1, keepdim=True) if gname == "per_row" else {}

        def amax(t):
            return t.abs().amax(**red) if red else t.abs().amax()

        for case, (prod32, ret_h, emulate) in CASES.items():
            if gname == "per_tensor" and case in ("ln_mod_quant_returning_activation", "gelu_quant"):
                continue

            def fn(x_, s_, b_, prod32=prod32, ret_h=ret_h, gran=gran):
                h = x_ if prod32 is None else prod32(x_, s_, b_).to(x_.dtype)
                q, sc = torchao_quant(h, gran)
                return (q, sc, h) if ret_h else (q, sc)

            torch._dynamo.reset()
            with torch.no_grad(), torch._inductor.config.patch(emulate_precision_casts=emulate):
                got, codes = run_and_get_code(torch.compile(fn, fullgraph=True), x, scale, shift)
                h32 = x.float() if prod32 is None else prod32(x, scale, shift)  # eager, before the cast
                h_e = h32.to(BF16)
                q_e, s_e = torchao_quant(h_e, gran)  # eager torchao
            q_c, s_c = got[0], got[1].reshape(s_e.shape)
            h_b = got[2] if ret_h else h_e  # the bf16 activation (the compiled one where returned)
            row = {"scale_elems": s_e.numel(), "fp8_elems": q_e.numel(),
                   "scale_neq_compiled_vs_eager": _neq(s_c, s_e),
                   "scale_max_rel_diff_vs_eager": float((s_c / s_e - 1).abs().max()),
                   "fp8_neq_compiled_vs_eager": _neq(q_c, q_e),
                   "fp8_max_steps_compiled_vs_eager": _fp8_ulps(q_c, q_e)}
            if ret_h:
                row["bf16_activation_neq_compiled_vs_eager"] = _neq(h_b, h_e)
            cand_s = {
                "A bf16(amax(bf16 act) * f32(1/448)) [eager torchao on CUDA]": (amax(h_b) * recip).float(),
                "B amax(bf16 act) * f32(1/448) in fp32": amax(h_b).float() * recip,
                "C amax(fp32 act before the bf16 cast) * f32(1/448)": amax(h32) * recip,
            }
            for k, v in cand_s.items():
                row[f"scale_neq_compiled_vs[{k}]"] = _neq(s_c, v.reshape(s_e.shape))
            cand_q = {
                "bf16 act / compiled scale (IEEE div)": h_b.float() / s_c,
                "fp32 act before the cast / compiled scale (IEEE div)": h32 / s_c,
                "bf16 act * (1 / compiled scale)": h_b.float() * (1.0 / s_c),
            }
            for k, v in cand_q.items():
                row[f"fp8_neq_compiled_vs[{k}]"] = _neq(q_c, v.clamp(-448.0, 448.0).to(FP8))
            row["fp8_neq_eager_vs[bf16 act / eager scale (IEEE div)]"] = _neq(
                q_e, (h_e.float() / s_e).clamp(-448.0, 448.0).to(FP8))
            res[f"{gname}/{case}"] = row
            print(f"\n[bitwise] {gname} / {case}:", file=out)
            for k, v in row.items():
                print(f"    {k}: {v}", file=out)
            for code in codes:
                for k in fp8_kernels(code)[0]:
                    print("    --- kernel ---\n" + "\n".join("    " + ln for ln in k.splitlines()), file=out)
    # zero rows: torchao's scale is amax/448 with no floor, so 0/0
    z = x[:, :64].clone()
    z[0, 3] = 0
    torch._dynamo.reset()
    with torch.no_grad():
        q_e, s_e = torchao_quant(z, PerRow())
        q_c, s_c = torch.compile(lambda t: torchao_quant(t, PerRow()))(z)
    row = {"eager_scale_of_zero_row": float(s_e.reshape(-1)[3]),
           "eager_fp8_nan_in_zero_row": int(q_e[0, 3].float().isnan().sum()),
           "compiled_scale_of_zero_row": float(s_c.reshape(-1)[3]),
           "compiled_fp8_nan_in_zero_row": int(q_c[0, 3].float().isnan().sum()),
           "compiled_fp8_nan_elsewhere": int(q_c.float().isnan().sum()) - int(q_c[0, 3].float().isnan().sum())}
    res["zero_row"] = row
    print(f"\n[bitwise] zero row (per_row): {row}", file=out)
    return res


def difffuse_section(args, gen, out, codef):
    import difffuse
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_

    from difffuse.fusion_pass import pass_manager
    from difffuse.fusion_pass.backend import difffuse_backend

    lowering = "auto" if args.device == "cuda" else "reference"
    orig = pass_manager.DifffusePass.__call__
    for bname in ("adaln_qkv", "rms_linear", "ffn_gelu"):
        after = []

        def call(self, graph, _orig=orig, _after=after):
            _orig(self, graph)
            _after.append(graph)

        pass_manager.DifffusePass.__call__ = call
        try:
            torch.manual_seed(0)
            mod = BLOCKS[bname]().to(args.device, BF16).eval()
            quantize_(mod, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow(), set_inductor_config=False))
            inp = inputs(bname, args.device, gen)
            difffuse.reset_report()
            torch._dynamo.reset()
            from torch._functorch import config as functorch_config
            from torch._inductor.utils import run_and_get_code

            with torch.no_grad(), torch._inductor.config.patch(fx_graph_cache=False), \
                    functorch_config.patch(enable_autograd_cache=False):  # a cache hit skips the pass
                ref = mod(*inp)

                # the backend callable: the name is registered only where difffuse is pip-installed
                got, codes = run_and_get_code(
                    torch.compile(mod, backend=difffuse_backend, options={"lowering": lowering}), *inp)
            ref = ref if isinstance(ref, tuple) else (ref,)
            got = got if isinstance(got, tuple) else (got,)
            err = max(float((a.float() - b.float()).abs().max()) for a, b in zip(got, ref))
        finally:
            pass_manager.DifffusePass.__call__ = orig
        print(f"\n=== difffuse ({lowering}) / {bname} / per_row: max |difffuse - eager torchao| = {err:.3g}",
              file=out)
        print(difffuse.report(), file=out)
        for g in after:
            describe_graph(g, out)
            print(f"--- difffuse {bname}/per_row graph after the pass ---\n{g}", file=codef)
        for code in codes:
            print(f"--- difffuse {bname}/per_row generated code ---\n{code}", file=codef)
            for k in fp8_kernels(code)[0]:
                print("  --- kernel ---\n" + "\n".join("  " + ln for ln in k.splitlines()), file=out)


# --- main ---------------------------------------------------------------------------------------

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.environ.get("OUT", "out"))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--allow-cpu", action="store_true", help="skip torchao's hardware check (graph part on CPU)")
    p.add_argument("--skip", default="", help="comma list of sections to skip: graphs,bitwise,difffuse")
    p.add_argument("--small", action="store_true", help="D=256, FFN 512, 64 tokens (a quick CPU check)")
    args = p.parse_args(argv)
    if args.small:
        global D, FF, L
        D, FF, L = 256, 512, 64
    os.makedirs(args.out, exist_ok=True)
    logf = open(os.path.join(args.out, "fp8_graph_probe.log"), "w")
    codef = open(os.path.join(args.out, "fp8_graph_code.txt"), "w")
    out = Tee(sys.stdout, logf)
    skip = set(filter(None, args.skip.split(",")))

    import torchao
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, PerTensor, quantize_

    if args.allow_cpu:
        import torchao.quantization.quant_api as qa
        qa._check_hardware_support = lambda *a, **k: None
    import triton

    ic = torch._inductor.config
    dev = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(f"{dev} · torch {torch.__version__} · triton {triton.__version__} · torchao {torchao.__version__} · "
          f"CUDA {torch.version.cuda}", file=out)
    print("inductor numerics config: " + ", ".join(
        f"{k}={getattr(ic, k, None)!r}" for k in ("emulate_precision_casts", "emulate_divison_rounding")) +
        f", eager_numerics={vars(getattr(ic, 'eager_numerics', object())) if hasattr(ic, 'eager_numerics') else None}",
        file=out)
    try:
        import mslk  # noqa: F401
        print("mslk is installed: torchao's AUTO kernel preference takes its Triton quantize_fp8_row", file=out)
    except ImportError:
        print("mslk not installed: torchao quantises activations with its torch path (quant_primitives)", file=out)

    gen = torch.Generator(device=args.device).manual_seed(0)
    summary = {}
    grans = (("per_row", PerRow()), ("per_tensor", PerTensor()))
    if "graphs" not in skip:
        for bname, cls in BLOCKS.items():
            torch.manual_seed(0)
            base = cls().to(args.device, BF16).eval()
            inp = inputs(bname, args.device, gen)
            for gname, gran in grans:
                mod = copy.deepcopy(base)
                quantize_(mod, Float8DynamicActivationFloat8WeightConfig(granularity=gran, set_inductor_config=False))
                with torch.no_grad():
                    ref = mod(*inp)
                res, graphs, codes = compile_and_dump(mod, inp)
                ref = ref if isinstance(ref, tuple) else (ref,)
                res = res if isinstance(res, tuple) else (res,)
                err = max(float((a.float() - b.float()).abs().max()) for a, b in zip(res, ref))
                print(f"\n=== {bname} / {gname}: {len(graphs)} graph(s); max |compiled - eager torchao| = {err:.3g}",
                      file=out)
                for g in graphs:
                    summary[f"{bname}/{gname}"] = describe_graph(g, out)
                    print(f"--- {bname}/{gname} post-grad graph ---\n{g}", file=codef)
                for code in codes:
                    print(f"--- {bname}/{gname} generated code ---\n{code}", file=codef)
                    kern, calls = fp8_kernels(code)
                    for c in calls:
                        print(f"  wrapper: {c}", file=out)
                    for k in kern:
                        print("  --- kernel ---\n" + "\n".join("  " + ln for ln in k.splitlines()), file=out)
    bits = bitwise(args.device, gen, out) if "bitwise" not in skip else {}
    if "difffuse" not in skip:
        try:
            difffuse_section(args, gen, out, codef)
        except Exception as exc:  # noqa: BLE001 - the sections above are already written
            import traceback

            print(f"\n=== difffuse section failed: {exc!r}\n{traceback.format_exc()}", file=out)
    with open(os.path.join(args.out, "fp8_graph_probe.json"), "w") as f:
        json.dump({"chains": summary, "bitwise": bits}, f, indent=1)
    print("\nsummary (ops from the activation to _scaled_mm, per _scaled_mm):", file=out)
    for k, v in summary.items():
        for ch in v:
            print(f"  {k}: {' -> '.join(ch)}", file=out)
    logf.close()
    codef.close()


if __name__ == "__main__":
    main()
