"""norm_scale_shift: residual (+ gate) → LayerNorm/RMSNorm → modulation, spelled as Wan's
block spells it (diffusers transformer_wan.py), fuses once with both outputs and matches
eager (r rounded where the model rounds it); near-misses don't fuse."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from conftest import assert_close, compile_and_run

B, L, D = 2, 6, 16


class FP32LayerNorm(nn.LayerNorm):
    """diffusers.models.normalization.FP32LayerNorm.forward."""

    def forward(self, x):
        w = self.weight.float() if self.weight is not None else None
        b = self.bias.float() if self.bias is not None else None
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps).to(x.dtype)


class Block(nn.Module):
    """x = proj(h); `fn(m, h, x, mod)`; norms kept in fp32 like Wan's keep-in-fp32 modules."""

    def __init__(self, fn, dim=D):
        super().__init__()
        self.fn = fn
        self.proj = nn.Linear(dim, dim)
        self.table = nn.Parameter(torch.randn(1, 6, dim) / dim ** 0.5)
        self.ln = FP32LayerNorm(dim, eps=1e-6, elementwise_affine=False)
        self.ln_affine = FP32LayerNorm(dim, eps=1e-6, elementwise_affine=True)
        self.ln_native = nn.LayerNorm(dim, eps=1e-5)
        self.rms = nn.RMSNorm(dim, eps=1e-6)
        self.vec = nn.Parameter(torch.randn(dim))

    def forward(self, h, mod):
        return self.fn(self, h, self.proj(h), mod)

    def cast(self, dtype):
        self.to(dtype)
        for p in (self.table, self.ln_affine.weight, self.ln_affine.bias):
            p.data = p.data.float()
        return self.eval()


def chunks(m, mod):
    """Wan 2.1 modulation: `(table + temb.float()).chunk(6, dim=1)`, each [B, 1, D] fp32."""
    return (m.table + mod.float()).chunk(6, dim=1)


def per_token(m, mod):
    """Wan 2.2 TI2V: temb [B, L, 6, D] -> chunk(6, dim=2) -> squeeze(2), each [B, L, D]."""
    return [c.squeeze(2) for c in (m.table.unsqueeze(0) + mod.float()).chunk(6, dim=2)]


def wan_norm2(m, h, x, mod):
    h = (h.float() + x * chunks(m, mod)[2]).type_as(h)
    return m.ln_affine(h.float()).type_as(h), h


def wan_norm3(m, h, x, mod, mods=chunks):
    s = mods(m, mod)
    h = h + x
    return (m.ln(h.float()) * (1 + s[4]) + s[3]).type_as(h), h


def wan_ffn_norm_out(m, h, x, mod):
    s = chunks(m, mod)
    h = (h.float() + x.float() * s[5]).type_as(h)
    return (m.ln(h.float()) * (1 + s[1]) + s[0]).type_as(h)


def native_ln(m, h, x, mod):
    h = h + x
    return m.ln_native(h) * (1 + mod[:, 1, None]) + mod[:, 0, None], h


def rms_residual(m, h, x, mod):
    h = h + x
    return m.rms(h) * (1 + mod[:, 1, None]) + mod[:, 0, None], h


VARIANTS = {
    # name: (fn, modulation shape, variant in fp32, variant in bf16/fp16)
    "wan_norm1": (lambda m, h, x, mod: (m.ln(h.float()) * (1 + chunks(m, mod)[1]) + chunks(m, mod)[0]).type_as(h),
                  None, "none/-/ln/noaffine/mod", "none/-/ln/noaffine/mod"),
    "wan_norm2": (wan_norm2, None, "gate/direct/ln/wb/nomod", "gate/roundtrip/ln/wb/nomod"),
    "wan_norm3": (wan_norm3, None, "one/direct/ln/noaffine/mod", "one/cast/ln/noaffine/mod"),
    "wan_ffn_norm_out": (wan_ffn_norm_out, None, "gate/direct/ln/noaffine/mod",
                         "gate/roundtrip/ln/noaffine/mod"),
    "ti2v_norm3_per_token": (lambda m, h, x, mod: wan_norm3(m, h, x, mod, per_token), (B, L, 6, D),
                             "one/direct/ln/noaffine/mod", "one/cast/ln/noaffine/mod"),
    "nn_layernorm": (native_ln, None, "one/direct/ln/wb/mod", "one/cast/ln/wb/mod"),
    "rms_residual": (rms_residual, None, "one/direct/rms/w/mod", "one/cast/rms/w/mod"),
    "gate_first": (lambda m, h, x, mod: m.ln_affine(h + mod[:, 2, None] * x), None,
                   "gate/direct/ln/wb/nomod", "gate/cast/ln/wb/nomod"),
}


def run(fn, mod_shape, dtype, b=B, l=L, d=D):
    torch.manual_seed(0)
    m = Block(fn, d).cast(dtype)
    h = torch.randn(b, l, d, dtype=dtype) * 2
    mod = torch.randn(*(mod_shape or (b, 6, d)), dtype=dtype if mod_shape is None else torch.float32)
    with torch.no_grad():
        ref = m(h, mod)
    out, rep = compile_and_run(m, h, mod)
    return out, ref, rep


def assert_outputs_close(out, ref, dtype):
    out, ref = (out, ref) if isinstance(out, tuple) else ((out,), (ref,))
    for o, r in zip(out, ref):
        assert o.dtype == r.dtype and o.shape == r.shape
        assert_close(o.float(), r.float(), dtype)


CASES = [(n, d) for n in sorted(VARIANTS) for d in (torch.float32, torch.bfloat16)] + [
    (n, torch.float16) for n in ("wan_norm2", "wan_norm3")]


@pytest.mark.parametrize("name,dtype", CASES)
def test_variant_fuses_once(name, dtype):
    fn, mod_shape, v32, vlow = VARIANTS[name]
    out, ref, rep = run(fn, mod_shape, dtype)
    assert rep.matches() == {"norm_scale_shift": 1}, (name, rep.variants())
    assert rep.variants() == {f"norm_scale_shift:{v32 if dtype == torch.float32 else vlow}": 1}
    assert not rep.misses, str(rep)
    assert_outputs_close(out, ref, dtype)


def test_residual_rounded_before_the_norm():
    """bf16 norm2: r is rounded to bf16 by `.type_as(h)` and the norm reads the rounded r,
    so the compiled residual equals eager's bit for bit and the norm output is close."""
    out, ref, rep = run(wan_norm2, None, torch.bfloat16)
    assert rep.matches() == {"norm_scale_shift": 1}
    assert torch.equal(out[1], ref[1])
    assert_close(out[0].float(), ref[0].float(), torch.bfloat16)


def test_odd_shapes_and_eps():
    def fn(m, h, x, mod):
        h = h + x
        return (F.layer_norm(h, (h.shape[-1],), eps=0.25) * (1 + mod[:, 1, None]) + mod[:, 0, None]), h
    out, ref, rep = run(fn, None, torch.float32, b=3, l=7, d=13)
    assert rep.matches() == {"norm_scale_shift": 1}, rep.variants()
    assert_outputs_close(out, ref, torch.float32)


def _ln_dim1(m, h, x, mod):
    r = h + x
    var, mean = torch.var_mean(r, dim=1, keepdim=True, correction=0)
    return (r - mean) * torch.rsqrt(var + 1e-6) * (1 + mod[:, 1, None]) + mod[:, 0, None], r


def _eps_outside(m, h, x, mod):
    r = h + x
    var, mean = torch.var_mean(r, dim=-1, keepdim=True, correction=0)
    return (r - mean) * (torch.rsqrt(var) + 1e-6) * (1 + mod[:, 1, None]) + mod[:, 0, None], r


def _r_narrowed(m, h, x, mod):
    r = h.float() + x * chunks(m, mod)[2]  # r in fp32 is the residual the caller keeps ...
    return m.ln_affine(r.to(torch.bfloat16).float()), r  # ... but the norm reads it rounded to bf16


NEAR_MISSES = {
    "ln_over_dim_1": _ln_dim1,
    "eps_outside_rsqrt": _eps_outside,
    "r_narrowed_for_norm": _r_narrowed,
    "modulation_before_norm": lambda m, h, x, mod: m.ln_affine(
        per_token(m, mod)[0] + x * (1 + per_token(m, mod)[1])),
    "bare_layernorm": lambda m, h, x, mod: m.ln_affine(x),
    "broadcast_residual": lambda m, h, x, mod: m.ln_affine(x + m.vec),
    "unbiased_variance": lambda m, h, x, mod: (lambda r: (r - r.mean(-1, keepdim=True)) * torch.rsqrt(
        torch.var_mean(r, -1, keepdim=True, correction=1)[0] + 1e-6))(h + x),
}


@pytest.mark.parametrize("name", sorted(NEAR_MISSES))
def test_near_miss_does_not_match(name):
    mod_shape = (B, L, 6, D) if name == "modulation_before_norm" else None
    out, ref, rep = run(NEAR_MISSES[name], mod_shape, torch.float32)
    assert rep.matches().get("norm_scale_shift", 0) == 0, rep.variants()
    # Inductor itself drops the bf16 round trip of r_narrowed_for_norm: compare at bf16 tolerance there
    assert_outputs_close(out, ref, torch.bfloat16 if name == "r_narrowed_for_norm" else torch.float32)


def _rms_residual_pow(exponent):
    def fn(m, h, x, mod):
        r = h + x
        n = r * torch.rsqrt(r.pow(exponent).mean(-1, keepdim=True) + 1e-6) * m.rms.weight
        return n * (1 + mod[:, 1, None]) + mod[:, 0, None], r
    return fn


@pytest.mark.parametrize("only_nss", [False, True], ids=["all_families", "norm_scale_shift_only"])
@pytest.mark.parametrize("exponent", [2, 3], ids=["square", "cube"])
def test_cube_not_square_rejected_by_the_exponent_check(exponent, only_nss):
    """residual -> `r * rsqrt(mean(r**e) + eps) * w` -> modulation: with e = 2 it fuses as the
    one/direct/rms/w/mod variant, so with e = 3 the structure is that variant's and only the
    exponent check turns it away (with norm_scale_shift alone nothing else could). All
    families on: the RMS core is rms_norm's anchor and its miss names the exponent; the
    modulation left over fuses as a plain scale_shift. mean(r**3) is kept positive (no NaN)."""
    torch.manual_seed(0)
    m = Block(_rms_residual_pow(exponent)).eval()
    h, mod = torch.randn(B, L, D) + 8, torch.randn(B, 6, D)
    with torch.no_grad():
        ref = m(h, mod)
    assert (ref[1].pow(3).mean(-1) > 0).all()
    out, rep = compile_and_run(m, h, mod, options={"patterns": ["norm_scale_shift"]} if only_nss else None)
    if exponent == 2:
        assert rep.variants() == {"norm_scale_shift:one/direct/rms/w/mod": 1} and not rep.misses, str(rep)
    else:
        assert rep.matches().get("norm_scale_shift", 0) == 0 and rep.matches().get("rms_norm", 0) == 0, \
            rep.variants()
        misses = [(x.family, x.reason) for x in rep.misses]
        assert misses == ([] if only_nss else [("rms_norm", "mean of x**3, not of x**2")]), str(rep)
    assert_outputs_close(out, ref, torch.float32)


def test_ln_over_other_dim_reported_as_miss():
    _, _, rep = run(_ln_dim1, None, torch.float32)
    reasons = [x.reason for x in rep.misses if x.family == "norm_scale_shift"]
    assert len(reasons) == 1 and "dims [1]" in reasons[0], str(rep)


def test_weight_over_other_dim_is_not_absorbed():
    """An [L, 1] 'weight' is no LN weight: only residual + LN fuse, the multiply stays."""
    def fn(m, h, x, mod):
        r = h + x
        return F.layer_norm(r, (D,), eps=1e-6) * m.col + m.vec, r
    torch.manual_seed(0)
    m = Block(fn).eval()
    m.col = nn.Parameter(torch.randn(L, 1))
    h, mod = torch.randn(B, L, D), torch.randn(B, 6, D)
    with torch.no_grad():
        ref = m(h, mod)
    out, rep = compile_and_run(m, h, mod)
    assert rep.variants() == {"norm_scale_shift:one/direct/ln/noaffine/nomod": 1}
    assert_outputs_close(out, ref, torch.float32)


# ----------------------------------------------------------------- `(1 + scale)[:, None, :]`
class IndexedModulation(nn.Module):
    """AdaLayerNormContinuous / CogVideoX: the `+ 1` before the [:, None, :] index."""

    def __init__(self, k_tensor: bool = False):
        super().__init__()
        self.ln = nn.LayerNorm(D, eps=1e-6, elementwise_affine=False)
        self.k_tensor = k_tensor

    def forward(self, x, emb):
        scale, shift = emb.chunk(2, dim=1)
        k = emb[:, :D] if self.k_tensor else 1
        return self.ln(x) * (k + scale)[:, None, :] + shift[:, None, :]


@pytest.mark.parametrize("k_tensor", [False, True], ids=["literal_1", "tensor_k"])
def test_indexed_modulation(k_tensor):
    """The unsqueeze is hoisted before a literal `+ 1` (exact) and the modulation fuses;
    with a tensor in place of the 1 it is not a modulation and nothing is rewritten."""
    torch.manual_seed(0)
    x, emb = torch.randn(B, L, D), torch.randn(B, 2 * D)
    m = IndexedModulation(k_tensor).eval()
    with torch.no_grad():
        ref = m(x, emb)
    out, rep = compile_and_run(m, x, emb)
    mods = [v for v in rep.variants() if v.startswith("norm_scale_shift:") and "/mod" in v]
    assert (mods == []) == k_tensor, rep.variants()
    assert_close(out, ref)
