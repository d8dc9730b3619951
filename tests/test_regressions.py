"""One regression test per bug of issue 20 (items 1-6), each the few-line reproduction from
the issue, compiled as a user would (Inductor on). Each asserts the output equals eager
and the compile does not raise; where the family's op cannot compute the site, 0 matches
and a reported miss; where the site is the family's math under another spelling (an
`alpha=` that only rescales a constant: `add(s, 1, alpha=3)` is k = 3), fusing is allowed,
but then exactly; item 6: the independent site in the same graph still fuses.
Items that name the CUDA lowering run it too (its Triton kernels under TRITON_INTERPRET=1
on a CPU)."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from conftest import DEVICE, TOL, compile_and_run

B, L, D = 2, 6, 16
# ids: conftest skips a test whose keywords include "cuda" (its GPU marker); these run on a CPU
LOWERINGS = pytest.mark.parametrize("lowering", ["reference", "cuda"], ids=["reference", "cuda_interpreted"])


class Fn(nn.Module):
    """forward = fn(self, *inputs); parameters: w [D], W [D, 2] (W[:, 0] is a strided weight)."""

    def __init__(self, fn, d=D):
        super().__init__()
        self.fn = fn
        self.w = nn.Parameter(torch.randn(d))
        self.W = nn.Parameter(torch.randn(d, 2))

    def forward(self, *args):
        return self.fn(self, *args)


def run(fn, *inputs, lowering="reference", d=D):
    torch.manual_seed(0)
    m = Fn(fn, d).to(DEVICE).eval()
    inputs = [t.to(DEVICE) for t in inputs]
    with torch.no_grad():
        ref = m(*inputs)
    out, rep = compile_and_run(m, *inputs, options={"lowering": lowering})
    outs, refs = (out, ref) if isinstance(ref, tuple) else ((out,), (ref,))
    for o, r in zip(outs, refs):
        assert o.dtype == r.dtype and o.shape == r.shape, (o.dtype, r.dtype, o.shape, r.shape)
        rtol, atol = TOL.get(r.dtype, (0, 0))
        torch.testing.assert_close(o, r, rtol=rtol, atol=atol, msg=lambda m: f"{m}\n{rep}\n{rep.variants()}")
    return rep


def not_fused(rep, family: str, allow: int = 0) -> None:
    """At most `allow` matches of `family` (a smaller valid site inside) and the site reported."""
    assert rep.matches().get(family, 0) <= allow, (str(rep), rep.variants())
    assert any(m.family == family for m in rep.misses), str(rep)


def fused_or_reported(rep, family: str, n: int = 1) -> None:
    """The family took the site (the output check above proved it exact) or said why not."""
    got = rep.matches().get(family, 0)
    assert got == n or sum(m.family == family for m in rep.misses) >= n - got, (str(rep), rep.variants())


def no_aborted_pass(rep) -> None:
    notes = [n for g in rep.graphs for n in g.notes]
    assert not any(n.startswith("pass failed") for n in notes), notes
    assert not any(m.reason.startswith("internal error") for m in rep.misses), str(rep)


def modulation():
    return torch.randn(B, 6, D)


# ------------------------------------------------------------------ 1. alpha= is ignored
def test_alpha_on_the_shift_add_is_not_scale_shift():
    """`torch.add(shift, x * (1 + scale), alpha=2)`: 2 * x * (1 + scale) is no `c + a*(k+b)`."""
    rep = run(lambda m, x, mod: torch.add(mod[:, 0, None], x * (1 + mod[:, 1, None]), alpha=2),
              torch.randn(B, L, D), modulation())
    not_fused(rep, "scale_shift")


def test_alpha_on_the_one_plus_scale_add():
    """`x * torch.add(scale, 1, alpha=3) + shift` is x * (scale + 3) + shift: k = 3 or no match."""
    rep = run(lambda m, x, mod: x * torch.add(mod[:, 1, None], 1, alpha=3) + mod[:, 0, None],
              torch.randn(B, L, D), modulation())
    fused_or_reported(rep, "scale_shift")


def test_alpha_on_the_rms_norm_eps_add():
    """`rsqrt(torch.add(mean(x²), 1e-3, alpha=100))` has eps 0.1, not 1e-3: eps 0.1 or no match."""
    rep = run(lambda m, x: x * torch.rsqrt(torch.add(x.pow(2).mean(-1, keepdim=True), 1e-3, alpha=100)),
              torch.randn(B, L, D) * 3)
    fused_or_reported(rep, "rms_norm")


def test_alpha_on_the_residual_add_before_layernorm_modulation():
    """`r = torch.add(res, x, alpha=0.5)` → LayerNorm → modulation: the residual is not
    `res + x`. The norm + modulation of r alone is a valid site (at most that fuses)."""
    def fn(m, res, x, mod):
        r = torch.add(res, x, alpha=0.5)
        return F.layer_norm(r, (D,), eps=1e-6) * (1 + mod[:, 1, None]) + mod[:, 0, None], r
    rep = run(fn, torch.randn(B, L, D), torch.randn(B, L, D), modulation())
    assert rep.matches().get("norm_scale_shift", 0) <= 1, rep.variants()


def test_sub_with_alpha_in_a_layernorm():
    """`torch.sub(r, mean, alpha=2)` in a hand-written LayerNorm is not (r - mean)."""
    def fn(m, res, x, mod):
        r = res + x
        var, mean = torch.var_mean(r, dim=-1, keepdim=True, correction=0)
        n = torch.sub(r, mean, alpha=2) * torch.rsqrt(var + 1e-6)
        return n * (1 + mod[:, 1, None]) + mod[:, 0, None], r
    rep = run(fn, torch.randn(B, L, D), torch.randn(B, L, D) + 1, modulation())
    not_fused(rep, "norm_scale_shift")


def test_sub_with_alpha_in_wans_rope():
    """`torch.sub(x1 * cos, x2 * sin, alpha=2)` in Wan's rope: not a rotation, but every
    channel still reads its pair times table entries; the rope recogniser reads alpha as
    the factor 2 on sin, so it fuses exactly (run() compares with eager) or is reported."""
    def fn(m, q, cos, sin):
        n = F.rms_norm(q, (D,), m.w, 1e-6).unflatten(2, (2, -1))
        x1, x2 = n.unflatten(-1, (-1, 2)).unbind(-1)
        c, s = cos[None, :, None, 0::2], sin[None, :, None, 1::2]
        out = torch.empty_like(n)
        out[..., 0::2] = torch.sub(x1 * c, x2 * s, alpha=2)
        out[..., 1::2] = x1 * s + x2 * c
        return out
    rep = run(fn, torch.randn(B, L, D), torch.randn(L, D // 2), torch.randn(L, D // 2))
    fused_or_reported(rep, "qk_norm_rope")


# ------------------------------------------------------------------ 2. casts dropped
@pytest.mark.parametrize("dtype", [torch.int32, torch.bool], ids=["int32", "bool"])
def test_integer_cast_between_layernorm_and_modulation(dtype):
    rep = run(lambda m, x, mod: F.layer_norm(x, (D,)).to(dtype) * (1 + mod[:, 1, None]) + mod[:, 0, None],
              torch.randn(B, L, D), modulation())
    not_fused(rep, "norm_scale_shift")


def test_rms_norm_separate_casts_with_an_integer_square():
    """diffusers-style separate `.float()` casts, but the squared side is cast to int32."""
    rep = run(lambda m, x: x.float() * torch.rsqrt(x.to(torch.int32).pow(2.0).mean(-1, keepdim=True) + 1e-6),
              torch.randn(B, L, D, dtype=torch.bfloat16) * 3)
    not_fused(rep, "rms_norm")


# ------------------------------------------------------------------ 3. stack rope, any table
def stack_rope(x, cos, sin):
    """diffusers apply_rotary_emb(use_real=True, use_real_unbind_dim=-1) (Flux, HunyuanVideo, LTX)."""
    x_real, x_imag = x.reshape(*x.shape[:-1], -1, 2).unbind(-1)
    x_rotated = torch.stack([-x_imag, x_real], dim=-1).flatten(3)
    return (x.float() * cos + x_rotated.float() * sin).to(x.dtype)


@LOWERINGS
@pytest.mark.parametrize("token_range", [False, True], ids=["all_tokens", "token_range"])
def test_stack_rope_with_tables_that_are_not_pair_duplicated(lowering, token_range):
    """cos, sin = randn(L, 1, D): every table entry is read; also through HunyuanVideo's
    `cat([rope(n[:, :a]), n[:, a:]])`."""
    heads, hd, text = 2, 8, 3

    def fn(m, q, cos, sin):
        n = F.rms_norm(q.unflatten(2, (heads, hd)), (hd,), m.w, 1e-6)
        if token_range:
            return torch.cat([stack_rope(n[:, :-text], cos[None], sin[None]), n[:, -text:]], dim=1)
        return stack_rope(n, cos[None], sin[None])
    rep = run(fn, torch.randn(B, L + text * token_range, heads * hd), torch.randn(L, 1, hd),
              torch.randn(L, 1, hd), lowering=lowering, d=hd)
    fused_or_reported(rep, "qk_norm_rope")


# ------------------------------------------------------------------ 4. strided weights
@LOWERINGS
def test_rms_norm_with_a_strided_weight(lowering):
    rep = run(lambda m, x: F.rms_norm(x, (D,), m.W[:, 0], 1e-6), torch.randn(B, L, D), lowering=lowering)
    fused_or_reported(rep, "rms_norm")


@LOWERINGS
def test_qk_norm_with_a_strided_weight_before_a_rope(lowering):
    heads, hd = 2, 8

    def fn(m, q, cos, sin):
        n = q.unflatten(2, (heads, hd))
        n = n * torch.rsqrt(n.pow(2).mean(-1, keepdim=True) + 1e-6) * m.W[:, 0]
        return stack_rope(n, cos[None, :, None], sin[None, :, None])
    cos = torch.randn(L, hd // 2).cos().repeat_interleave(2, -1)
    sin = torch.randn(L, hd // 2).sin().repeat_interleave(2, -1)
    rep = run(fn, torch.randn(B, L, heads * hd), cos, sin, lowering=lowering, d=hd)
    fused_or_reported(rep, "qk_norm_rope")


# ------------------------------------------------------------------ 5. D = 0
ZERO_WIDTH = {
    "rms_norm": lambda m, x, mod: x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * m.w,
    "scale_shift": lambda m, x, mod: x * (1 + mod[:, 1, None]) + mod[:, 0, None],
    "norm_scale_shift": lambda m, x, mod: F.layer_norm(x + x, (0,), eps=1e-6) * (1 + mod[:, 1, None])
    + mod[:, 0, None],
}


@LOWERINGS
@pytest.mark.parametrize("family", sorted(ZERO_WIDTH))
def test_zero_width_compiles(lowering, family):
    """Zero-size dims never crash a compile: left to Inductor (a reported miss) or fused."""
    rep = run(ZERO_WIDTH[family], torch.randn(B, L, 0), torch.randn(B, 6, 0), lowering=lowering, d=0)
    no_aborted_pass(rep)
    fused_or_reported(rep, family)


# ------------------------------------------------------------------ 6. inputs that aborted the pass
def independent_rms_norm(m, y):
    """A site elsewhere in the same graph that must still fuse."""
    return y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + 1e-6) * m.w


def test_residual_rounded_through_an_integer_dtype():
    def fn(m, res, x, mod, y):
        r = (res.float() + x * mod[:, 2, None]).to(torch.int32)
        out = F.layer_norm(r.float(), (D,), eps=1e-6) * (1 + mod[:, 1, None]) + mod[:, 0, None]
        return out, r, independent_rms_norm(m, y)
    rep = run(fn, torch.randn(B, L, D) * 4, torch.randn(B, L, D), modulation(), torch.randn(B, L, D))
    no_aborted_pass(rep)
    assert rep.matches().get("rms_norm", 0) == 1, (str(rep), rep.variants())
    assert rep.matches().get("norm_scale_shift", 0) <= 1  # LN(r.float()) + modulation alone is a site


def test_scale_computed_from_the_residual_sum():
    """`n * (1 + r * 0.5) + shift`, r the residual sum the norm reads: the replacement would
    consume its own output."""
    def fn(m, res, x, mod, y):
        r = res + x * mod[:, 2, None]
        n = F.layer_norm(r, (D,), eps=1e-6)
        return n * (1 + r * 0.5) + mod[:, 0, None], r, independent_rms_norm(m, y)
    rep = run(fn, torch.randn(B, L, D), torch.randn(B, L, D), modulation(), torch.randn(B, L, D))
    no_aborted_pass(rep)
    assert rep.matches().get("rms_norm", 0) == 1, (str(rep), rep.variants())
    assert rep.matches().get("norm_scale_shift", 0) <= 1  # LN(r) + modulation reading r as an input
