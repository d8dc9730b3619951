"""The one rope recogniser (difffuse/patterns/rope.py) on the spellings real code writes:
each fuses with its q/k norm (qk_norm_rope) or, with no norm in front, on its own (rope),
exactly; what is not a pair rotation stays, reported with its real reason; the fp64 rule;
the CUDA lowering's choice for ropes alone; the NPU's npu_rotary_mul for the complex128 rope."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from conftest import assert_close, compile_and_run
from difffuse.testing.vendor_stubs import install, npu_modules

D, H, L = 16, 2, 5


# ----------------------------------------------------------------- spellings (x: [B, L, H, D])
def sglang(x, t):  # even/odd strided slices, one table entry per pair
    cos, sin = t["half"]
    x1, x2 = x[..., ::2], x[..., 1::2]
    return torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), -1).flatten(-2)


def strided_writes(x, t):  # LightX2V: empty_like + strided slice writes
    cos, sin = t["half"]
    a, b = x[..., 0::2], x[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = a * cos - b * sin
    out[..., 1::2] = a * sin + b * cos
    return out


def rotation_matrix(x, t):  # ComfyUI / HiDream: 2x2 rotation-matrix table
    f = t["matrix"]
    x_ = x.reshape(*x.shape[:-1], -1, 1, 2)
    return (f[..., 0] * x_[..., 0] + f[..., 1] * x_[..., 1]).reshape(*x.shape).type_as(x)


def rotation_matrix_addcmul(x, t):
    f = t["matrix"]
    x_ = x.reshape(*x.shape[:-1], -1, 1, 2)
    out = f[..., 0] * x_[..., 0]
    out.addcmul_(f[..., 1], x_[..., 1])
    return out.reshape(*x.shape).type_as(x)


def matrix_sum(x, t):  # Kandinsky 5: (rope * x).sum(-1)
    x_ = x.reshape(*x.shape[:-1], -1, 1, 2)
    return (t["matrix"] * x_).sum(-1).reshape(*x.shape).to(x.dtype)


def rotate_half_chunk(x, t):
    cos, sin = t["neox"]
    a, b = x.chunk(2, -1)
    return x * cos + torch.cat((-b, a), -1) * sin


def rotate_half_slices(x, t):
    cos, sin = t["neox"]
    d = x.shape[-1]
    return x * cos + torch.cat((-x[..., d // 2:], x[..., :d // 2]), -1) * sin


def unbind_half_tables(x, t):  # interleaved pairs with cos[..., 0::2] / sin[..., 1::2]
    cos, sin = t["full"]
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    c, s = cos[..., 0::2], sin[..., 1::2]
    return torch.stack([x1 * c - x2 * s, x1 * s + x2 * c], -1).flatten(-2)


def complex128(x, t):  # official Wan / DiffSynth
    xc = torch.view_as_complex(x.to(torch.float64).reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(xc * t["freqs128"]).flatten(3).to(x.dtype)


def complex64(x, t):
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(xc * t["freqs64"]).flatten(3).type_as(x)


SPELLINGS = {f.__name__: f for f in (sglang, strided_writes, rotation_matrix, rotation_matrix_addcmul, matrix_sum,
                                     rotate_half_chunk, rotate_half_slices, unbind_half_tables, complex128, complex64)}


def tables(seq=L, d=D):
    """Random angles (and random, not pair-duplicated, full tables: the op reads each entry)."""
    th = torch.rand(seq, 1, d // 2, dtype=torch.float64) * 6
    full = [torch.randn(seq, 1, d) for _ in range(2)]
    rot = torch.stack([torch.stack([th.cos(), -th.sin()], -1), torch.stack([th.sin(), th.cos()], -1)], -2)
    return {"half": (th.cos().float(), th.sin().float()), "full": full,
            "neox": (torch.cat([th, th], -1).cos().float(), torch.cat([th, th], -1).sin().float()),
            "matrix": rot.float(), "freqs128": torch.polar(torch.ones_like(th), th),
            "freqs64": torch.polar(torch.ones_like(th), th).to(torch.complex64)}


def rms(x, w, eps=1e-6):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


class QK(nn.Module):
    """q/k projections, RMSNorm across heads (Wan), then the rope; `norm=False`: rope alone."""

    def __init__(self, rope, norm=True, dtype=torch.float32):
        super().__init__()
        self.rope, self.norm = rope, norm
        self.q, self.k = nn.Linear(H * D, H * D, dtype=dtype), nn.Linear(H * D, H * D, dtype=dtype)
        self.wq, self.wk = nn.Parameter(torch.randn(H * D, dtype=dtype)), nn.Parameter(torch.randn(H * D, dtype=dtype))

    def forward(self, x, t):
        q, k = self.q(x), self.k(x)
        if self.norm:
            q, k = rms(q, self.wq), rms(k, self.wk)
        return self.rope(q.unflatten(-1, (H, D)), t), self.rope(k.unflatten(-1, (H, D)), t)


def run(m, dtype=torch.float32, **kw):
    torch.manual_seed(1)
    x, t = torch.randn(2, L, H * D, dtype=dtype), tables()
    with torch.no_grad():
        ref = m(x, t)
    out, rep = compile_and_run(m, x, t, **kw)
    return ref, out, rep


def close_as_eager(out, ref, m, dtype):
    """fp32: equal to eager. bf16: eager rounds its norm in bf16 where the op computes in
    fp32, so both are compared with the model run in fp32: difffuse no further off."""
    if dtype == torch.float32:
        for o, r in zip(out, ref):
            assert_close(o, r)
        return
    torch.manual_seed(1)
    x, t = torch.randn(2, L, H * D, dtype=dtype), tables()
    with torch.no_grad():
        exact = m.float()(x.float(), t)
    m.to(dtype)
    for o, r, e in zip(out, ref, exact):
        mine, eager = (o.float() - e).abs().max(), (r.float() - e).abs().max()
        assert mine <= eager + 2 ** -7 * e.abs().max(), (float(mine), float(eager))  # one bf16 ulp


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", sorted(SPELLINGS))
def test_every_spelling_fuses_with_its_norm(name, dtype):
    torch.manual_seed(0)
    m = QK(SPELLINGS[name], dtype=dtype).eval()
    ref, out, rep = run(m, dtype)
    assert rep.matches() == {"qk_norm_rope": 2}, (str(rep), rep.misses)
    assert rep.misses == []
    close_as_eager(out, ref, m, dtype)


@pytest.mark.parametrize("name", ["sglang", "rotation_matrix", "complex128", "strided_writes"])
def test_dynamic_shapes(name):
    m = QK(SPELLINGS[name]).eval()
    ref, out, rep = run(m, dynamic=True)
    assert rep.matches() == {"qk_norm_rope": 2}, (str(rep), rep.misses)
    for o, r in zip(out, ref):
        assert_close(o, r)


@pytest.mark.parametrize("name", ["sglang", "rotate_half_chunk", "complex128"])
def test_rope_without_norm_fuses_on_its_own(name):
    m = QK(SPELLINGS[name], norm=False).eval()
    ref, out, rep = run(m)
    assert rep.matches() == {"rope": 2}, (str(rep), rep.misses)
    for o, r in zip(out, ref):
        assert_close(o, r)


# ----------------------------------------------------------------- not ropes (and why)
def mixes_three(x, t):  # channel j reads j, its pair and j+2: not a pair rotation
    cos, sin = t["half"]
    x1, x2 = x[..., ::2], x[..., 1::2]
    return torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin + x1.roll(1, -1) * sin), -1).flatten(-2)


def wrong_pairs(x, t):  # pairs (2i, 2i+2): not interleaved pairs nor halves
    cos, sin = t["neox"]
    return x * cos + x.roll(2, -1) * sin


def rounds_midway(x, t):  # a product rounded to bf16 before the sum: the op rounds only its output
    cos, sin = t["half"]
    x1, x2 = x[..., ::2].float(), x[..., 1::2].float()
    a = (x1 * cos).to(torch.bfloat16).float()
    return torch.stack((a - x2 * sin, x2 * cos + x1 * sin), -1).flatten(-2).to(x.dtype)


def stays_fp64(x, t):  # computed and returned in fp64: the op computes in fp32
    xc = torch.view_as_complex(x.to(torch.float64).reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(xc * t["freqs128"]).flatten(3)


def squared(x, t):  # x * x: not linear in x
    cos, sin = t["neox"]
    a, b = x.chunk(2, -1)
    return x * x * cos + torch.cat((-b, a), -1) * sin


NOT_ROPES = {
    "mixes_three": None,  # roll is no channel move the recogniser follows: not rope-shaped at all
    "wrong_pairs": None,
    "rounds_midway": "narrowing cast rounds a partial result",
    "stays_fp64": "returns fp64",
    "squared": "multiplies the rope input by itself",
}


@pytest.mark.parametrize("name", sorted(NOT_ROPES))
def test_not_a_rope_is_not_fused(name):
    fn = globals()[name]
    m = QK(fn).eval()
    ref, out, rep = run(m)
    assert rep.matches().get("qk_norm_rope", 0) == 0 and rep.matches().get("rope", 0) == 0, str(rep)
    why = NOT_ROPES[name]
    if why:
        reasons = [x.reason for x in rep.misses if x.family in ("qk_norm_rope", "rope")]
        assert len(reasons) == 2 and all(why in r for r in reasons), reasons
    for o, r in zip(out, ref):  # Inductor itself does not emulate the bf16 round trip of rounds_midway
        if r.dtype == torch.float64:
            torch.testing.assert_close(o, r, rtol=1e-5, atol=1e-5)
        else:
            assert_close(o, r, torch.bfloat16 if name == "rounds_midway" else None)


# ----------------------------------------------------------------- graph break between norm and rope
class Broken(nn.Module):
    """Official Wan: the q/k norm, then a graph break, then the rope."""

    def __init__(self):
        super().__init__()
        self.qk = QK(complex128)

    def forward(self, x, t):
        q = rms(self.qk.q(x), self.qk.wq).unflatten(-1, (H, D))
        torch._dynamo.graph_break()
        return complex128(q, t)


def test_graph_break_between_norm_and_rope_is_named():
    m = Broken().eval()
    ref, out, rep = run(m, options={"lowering": "cuda"})  # the CUDA rules, kernels in the interpreter
    # the complex128 rope alone is rewritten to fp32 arithmetic (Inductor cannot fuse complex ops)
    assert rep.matches().get("rope", 0) == 1, str(rep)
    assert_close(out, ref)

    class Real(Broken):
        def forward(self, x, t):
            q = rms(self.qk.q(x), self.qk.wq).unflatten(-1, (H, D))
            torch._dynamo.graph_break()
            return sglang(q, t)
    ref, out, rep = run(Real().eval(), options={"lowering": "cuda"})
    misses = [x for x in rep.misses if x.family == "rope"]
    assert len(misses) == 1 and "graph break" in misses[0].reason and "Inductor already" in misses[0].reason, misses
    assert_close(out, ref)


# ----------------------------------------------------------------- NPU: complex128 -> npu_rotary_mul
def test_npu_complex128_rope_goes_to_npu_rotary_mul(monkeypatch):
    calls: list = []
    install(monkeypatch, npu_modules(calls), "difffuse.lowering.npu")
    m = QK(complex128).eval()
    ref, out, rep = run(m, options={"lowering": "npu", "inductor": False})
    assert rep.matches().get("qk_norm_rope", 0) == 2, (str(rep), rep.misses)
    rot = [c for c in calls if c[0] == "npu_rotary_mul"]
    assert len(rot) == 2 and all(dt == torch.float32 for c in rot for _, dt in c[1]), rot
    for o, r in zip(out, ref):
        assert_close(o, r)
