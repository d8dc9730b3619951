"""Per-subgraph benchmark at Wan shapes (design.md §6): eager vs Inductor vs difffuse.

Each subgraph is written as the model writes it (diffusers' Wan blocks), compiled with
plain Inductor and with difffuse, checked against eager, and timed (median, L2 flushed),
modes alternated over several rounds. GB/s counts each input and output once; the floor
is those bytes at the measured copy bandwidth. A second column sums the GPU kernels'
durations per call from the profiler (back-to-back calls, no flush): the part of a
timed call that is kernel work, not host launch overhead.

    python -m benchmarks.kernels [--rounds 3] [--only NAME] [--warps JSON] [--qk-kernel triton|jit] [--csv PATH]
"""
from __future__ import annotations

import argparse
import statistics

import torch
import torch.nn.functional as F
from torch import nn

import difffuse
from benchmarks import harness
from benchmarks.harness import gpu_us

BF16, F32 = torch.bfloat16, torch.float32
L480, L704 = 32760, 27280  # Wan 2.1 480p x 81 frames; Wan 2.2 TI2V-5B 704p x 121


class RMSNorm(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.norm = nn.RMSNorm(d, eps=1e-6, dtype=BF16)

    def forward(self, x):
        return self.norm(x)


class LNModulate(nn.Module):
    """Wan norm1: (LN(h.float()) * (1 + scale) + shift).type_as(h), per-sample modulation."""

    def forward(self, h, scale, shift):
        return (F.layer_norm(h.float(), h.shape[-1:], eps=1e-6) * (1 + scale) + shift).type_as(h)


class GatedResidualAffineLN(nn.Module):
    """Wan norm2: h = (h.float() + attn * gate).type_as(h); n = affine LN(h.float()).type_as(h)."""

    def __init__(self, d):
        super().__init__()
        self.w, self.b = nn.Parameter(torch.randn(d)), nn.Parameter(torch.randn(d))

    def forward(self, h, attn, gate):
        h = (h.float() + attn * gate).type_as(h)
        return F.layer_norm(h.float(), h.shape[-1:], self.w, self.b, 1e-6).type_as(h), h


class ResidualLNModulate(nn.Module):
    """TI2V: h = h + attn; (LN(h.float()) * (1 + scale) + shift).type_as(h), per-token modulation."""

    def forward(self, h, attn, scale, shift):
        h = h + attn
        return (F.layer_norm(h.float(), h.shape[-1:], eps=1e-6) * (1 + scale) + shift).type_as(h), h


class GatedResidual(nn.Module):
    """Wan FFN output: (h.float() + ff.float() * gate).type_as(h)."""

    def forward(self, h, ff, gate):
        return (h.float() + ff.float() * gate).type_as(h)


def wan_rope(x, cos, sin):
    """diffusers' Wan apply_rotary_emb."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    c, s = cos[..., 0::2], sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * c - x2 * s
    out[..., 1::2] = x1 * s + x2 * c
    return out.type_as(x)


class WanQKNormRope(nn.Module):
    """Wan self-attention: RMSNorm of q and k across heads, unflatten, interleaved rope."""

    def __init__(self, d, heads):
        super().__init__()
        self.heads = heads
        self.norm_q = nn.RMSNorm(d, eps=1e-6, dtype=BF16)
        self.norm_k = nn.RMSNorm(d, eps=1e-6, dtype=BF16)

    def forward(self, q, k, cos, sin):
        q = self.norm_q(q).unflatten(2, (self.heads, -1))
        k = self.norm_k(k).unflatten(2, (self.heads, -1))
        return wan_rope(q, cos, sin), wan_rope(k, cos, sin)


class LinearGelu(nn.Module):
    def __init__(self, d, f):
        super().__init__()
        self.proj = nn.Linear(d, f, dtype=BF16)

    def forward(self, x):
        return F.gelu(self.proj(x), approximate="tanh")


def r(*shape, dtype=BF16):
    return torch.randn(*shape, device="cuda", dtype=dtype)


def rope_tables(L, hd=128):
    ang = torch.rand(1, L, 1, hd // 2, device="cuda") * 6.28
    return ang.cos().repeat_interleave(2, -1), ang.sin().repeat_interleave(2, -1)


CASES = {
    "rms_norm D=1536": lambda: (RMSNorm(1536), (r(1, L480, 1536),)),
    "rms_norm D=5120": lambda: (RMSNorm(5120), (r(1, L480, 5120),)),
    "LN -> *(1+scale)+shift D=1536 per-sample": lambda: (LNModulate(), (r(1, L480, 1536), r(1, 1, 1536, dtype=F32),
                                                                      r(1, 1, 1536, dtype=F32))),
    "residual+gate -> affine LN (2 out) D=1536": lambda: (GatedResidualAffineLN(1536),
                                                          (r(1, L480, 1536), r(1, L480, 1536),
                                                           r(1, 1, 1536, dtype=F32))),
    "residual -> LN -> scale/shift D=3072 per-token L=27280": lambda: (
        ResidualLNModulate(), (r(1, L704, 3072), r(1, L704, 3072), r(1, L704, 3072, dtype=F32),
                               r(1, L704, 3072, dtype=F32))),
    "gated residual D=1536": lambda: (GatedResidual(), (r(1, L480, 1536), r(1, L480, 1536),
                                                        r(1, 1, 1536, dtype=F32))),
    "Wan qk-norm + rope (q,k) 12x128": lambda: (WanQKNormRope(1536, 12), (r(1, L480, 1536), r(1, L480, 1536),
                                                                          *rope_tables(L480))),
    "Wan qk-norm + rope (q,k) 40x128": lambda: (WanQKNormRope(5120, 40), (r(1, L480, 5120), r(1, L480, 5120),
                                                                          *rope_tables(L480))),
    "Linear 1536->8960 + tanh-GELU": lambda: (LinearGelu(1536, 8960), (r(L480, 1536),)),
}


def nbytes(*ts) -> int:
    flat = []
    for t in ts:
        flat.extend(t if isinstance(t, (tuple, list)) else [t])
    return sum(t.numel() * t.element_size() for t in flat if isinstance(t, torch.Tensor))


def close(a, b) -> float:
    """Max abs difference over (tuple) outputs."""
    a = a if isinstance(a, tuple) else (a,)
    b = b if isinstance(b, tuple) else (b,)
    return max((x.float() - y.float()).abs().max().item() for x, y in zip(a, b))


def run_case(name, rounds, bw):
    module, args = CASES[name]()
    module = module.cuda()
    with torch.no_grad():
        ref = module(*args)
        torch._dynamo.reset()
        ind = torch.compile(module, backend="inductor")
        ind_out = ind(*args)
        difffuse.reset_report()
        dff = torch.compile(module, backend="difffuse")
        dff_out = dff(*args)
        matches = difffuse.report().matches()
        modes = {"eager": lambda: module(*args), "inductor": lambda: ind(*args), "difffuse": lambda: dff(*args)}
        times = {m: [] for m in modes}
        kern, names = {m: [] for m in modes}, {}
        for _ in range(rounds):
            for m, fn in modes.items():
                times[m].append(harness.bench_ms(fn) * 1e3)
                us, names[m] = gpu_us(fn)
                kern[m].append(us)
    med = {m: statistics.median(t) for m, t in times.items()}
    kmed = {m: statistics.median(t) for m, t in kern.items()}
    moved = nbytes(*args) + nbytes(ref)
    floor = moved / bw * 1e6
    return {
        "subgraph": name, "eager µs": f"{med['eager']:.1f}", "inductor µs": f"{med['inductor']:.1f}",
        "difffuse µs": f"{med['difffuse']:.1f}", "floor µs": f"{floor:.1f}",
        "GPU kernels µs (inductor / difffuse)": f"{kmed['inductor']:.1f} / {kmed['difffuse']:.1f}",
        "difffuse % of copy bw": f"{100 * floor / med['difffuse']:.0f}",
        "vs inductor": f"{med['inductor'] / med['difffuse']:.2f}x",
        "max|diff| inductor / difffuse": f"{close(ind_out, ref):.3g} / {close(dff_out, ref):.3g}",
        "difffuse kernels": names["difffuse"],
        "difffuse matches": ", ".join(f"{k}={v}" for k, v in matches.items()) or "none",
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--only", default=None, help="substring of a subgraph name")
    ap.add_argument("--warps", default=None, help="json file from tune_triton.py: Triton num_warps table")
    ap.add_argument("--qk-kernel", choices=["triton", "jit"], default=None, help="qk-norm+rope kernel")
    harness.add_csv_arg(ap)
    a = ap.parse_args()
    if a.qk_kernel:
        from difffuse.lowering import cuda

        cuda.QK_KERNEL = a.qk_kernel
    harness.load_warps(a.warps)
    bw = harness.copy_bandwidth()
    print(harness.header())
    print(f"copy bandwidth {bw / 1e12:.2f} TB/s (read + write); clocks before: {harness.clocks()}")
    rows = []
    for name in CASES:
        if a.only and a.only not in name:
            continue
        rows.append(run_case(name, a.rounds, bw))
        print(rows[-1], flush=True)
    print(f"clocks after: {harness.clocks()}\n")
    print(harness.table(rows, list(rows[0]), csv=a.csv))


if __name__ == "__main__":
    main()
