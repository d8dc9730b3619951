"""scale_shift: AdaLN `x*(k+scale)+shift` and gated residuals `res + x*gate`, spelled as
real models spell them, fuse once and match eager; near-misses don't fuse."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from conftest import assert_close, compile_and_run

B, L, D, F = 2, 6, 16, 3


class Site(nn.Module):
    """x = proj(h); `fn(m, h, x, mod)` with `mod` a [B, 6, D] modulation (chunked by fn)."""

    def __init__(self, fn, dim=D):
        super().__init__()
        self.fn = fn
        self.proj = nn.Linear(dim, dim)
        self.table = nn.Parameter(torch.randn(1, 6, dim) / dim ** 0.5)
        self.vec = nn.Parameter(torch.randn(dim))

    def forward(self, h, mod):
        return self.fn(self, h, self.proj(h), mod)


def chunks(m, mod):
    """Wan 2.1: `(table + temb.float()).chunk(6, dim=1)`, each [B, 1, D] in fp32."""
    return (m.table + mod.float()).chunk(6, dim=1)


def per_token(m, mod):
    """Wan 2.2 TI2V: temb [B, L, 6, D] -> chunk(6, dim=2) -> squeeze(2), each [B, L, D]."""
    return [c.squeeze(2) for c in (m.table.unsqueeze(0) + mod.float()).chunk(6, dim=2)]


def per_frame(m, h, x, mod):
    """Per-frame tables [B, F, 1, D] against x unflattened to [B, F, L/F, D]."""
    scale, shift = mod.float().chunk(2, dim=2)
    y = x.unflatten(1, (F, -1)) * (1 + scale) + shift
    return y.flatten(1, 2).to(h.dtype)


VARIANTS = {
    # name: (fn, modulation shape (None: [B, 6, D]), expected variant)
    "adaln_batch": (lambda m, h, x, mod: x * (1 + mod[:, 1, None]) + mod[:, 0, None], None, "c+a*(b+k)/nocast"),
    "adaln_shift_first": (lambda m, h, x, mod: mod[:, 0, None] + x * (1 + mod[:, 1, None]), None,
                          "c+a*(b+k)/nocast"),
    "adaln_channel_k_half": (lambda m, h, x, mod: x * (m.vec + 0.5) + m.vec, None, "c+a*(b+k)/nocast"),
    "wan_adaln_chunks": (lambda m, h, x, mod: (x.float() * (1 + chunks(m, mod)[1]) + chunks(m, mod)[0]).type_as(h),
                         None, "c+a*(b+k)/cast"),
    "wan_ffn_gate": (lambda m, h, x, mod: (h.float() + x.float() * chunks(m, mod)[5]).type_as(h), None, "c+a*b/cast"),
    # bf16 `attn_output * gate_msa(fp32)`: mixed-dtype product, no convert node
    "wan_attn_gate_mixed": (lambda m, h, x, mod: (h.float() + x * chunks(m, mod)[2]).type_as(h), None, "c+a*b/cast"),
    "gate_first": (lambda m, h, x, mod: h + mod[:, 2, None] * x, None, "c+a*b/nocast"),
    "layerscale_channel": (lambda m, h, x, mod: x * m.vec + h, None, "c+a*b/nocast"),
    "ti2v_gate_per_token": (lambda m, h, x, mod: (h.float() + x.float() * per_token(m, mod)[5]).type_as(h),
                            (B, L, 6, D), "c+a*b/cast"),
    "ti2v_adaln_per_token": (lambda m, h, x, mod: (x * (1 + per_token(m, mod)[1]) + per_token(m, mod)[0]).type_as(h),
                             (B, L, 6, D), "c+a*(b+k)/cast"),
    "per_frame": (per_frame, (B, F, 2, D), "c+a*(b+k)/nocast"),  # the cast follows the flatten
}


def run(name, fn, mod_shape, dtype, b=B, l=L, d=D):
    torch.manual_seed(0)
    m = Site(fn, d).to(dtype).eval()
    m.table.data = m.table.data.float()  # modulation tables stay fp32 (Wan's keep-in-fp32)
    h = torch.randn(b, l, d, dtype=dtype)
    mod = torch.randn(*(mod_shape or (b, 6, d)), dtype=dtype if mod_shape is None else torch.float32)
    with torch.no_grad():
        ref = m(h, mod)
    out, rep = compile_and_run(m, h, mod)
    assert out.dtype == ref.dtype
    return out, ref, rep


# every spelling in fp32 and bf16; fp16 for a few representatives (keeps the module fast)
CASES = [(n, d) for n in sorted(VARIANTS) for d in (torch.float32, torch.bfloat16)] + [
    (n, torch.float16) for n in ("adaln_batch", "wan_attn_gate_mixed", "wan_ffn_gate")]


@pytest.mark.parametrize("name,dtype", CASES)
def test_variant_fuses_once(name, dtype):
    fn, mod_shape, variant = VARIANTS[name]
    out, ref, rep = run(name, fn, mod_shape, dtype)
    assert rep.matches() == {"scale_shift": 1}, (name, rep.variants())
    if dtype == torch.float32:  # `.float()` / `.type_as(h)` are no-ops: no convert node
        variant = variant.replace("/cast", "/nocast")
    assert rep.variants() == {f"scale_shift:{variant}": 1}
    assert not rep.misses, str(rep)
    assert_close(out.float(), ref.float(), dtype)


def test_upcast_inputs_are_read_directly():
    """The op reads the bf16 h and ff, not fp32 copies (the ops compute in fp32 anyway)."""
    import difffuse.patterns.scale_shift as ss

    seen = []
    orig = ss.ScaleShiftPattern.check

    def spy(self, match, variant):
        site = orig(self, match, variant)
        seen.append(site)
        return site

    ss.ScaleShiftPattern.check = spy
    try:
        fn, shape, _ = VARIANTS["wan_ffn_gate"]
        run("wan_ffn_gate", fn, shape, torch.bfloat16)
    finally:
        ss.ScaleShiftPattern.check = orig
    site = next(s for s in seen if isinstance(s, dict))
    assert site["a"].meta["val"].dtype == site["c"].meta["val"].dtype == torch.bfloat16
    assert site["b"].meta["val"].dtype == torch.float32 and site["k"] == 0.0


def test_odd_shapes():
    fn, _, _ = VARIANTS["adaln_batch"]
    out, ref, rep = run("odd", fn, None, torch.float32, b=3, l=7, d=13)
    assert rep.matches() == {"scale_shift": 1}
    assert_close(out, ref)


def test_k_read_from_match():
    """Two modulations with k = 1 and k = 2 both fuse and stay exact."""
    fn = lambda m, h, x, mod: x * (1 + mod[:, 1, None]) + mod[:, 0, None] + h * (2 + mod[:, 3, None])  # noqa: E731
    out, ref, rep = run("two_k", fn, None, torch.float32)
    assert rep.matches() == {"scale_shift": 2}, rep.variants()
    assert_close(out, ref)


NEAR_MISSES = {
    "sub_not_add": lambda m, h, x, mod: mod[:, 0, None] - x * (1 + mod[:, 1, None]),
    "add_inside_mul": lambda m, h, x, mod: (mod[:, 0, None] + x) * (1 + mod[:, 1, None]),
    "k_is_tensor": lambda m, h, x, mod: x * (m.k_t + mod[:, 1, None]) + mod[:, 0, None],
    "per_row_scale": lambda m, h, x, mod: x * (1 + m.col) + mod[:, 0, None],  # [L, 1]: not a modulation
    "generic_fma": lambda m, h, x, mod: h + x * torch.sigmoid(h),  # full-size factor, not a table chunk
    "gelu_like": lambda m, h, x, mod: h + x * (1 + torch.tanh(h)),
    "affine_not_gate": lambda m, h, x, mod: x * m.vec + m.vec,  # norm-affine tail: broadcast c
}


@pytest.mark.parametrize("name", sorted(NEAR_MISSES))
def test_near_miss_does_not_match(name):
    torch.manual_seed(0)
    m = Site(NEAR_MISSES[name]).eval()
    m.k_t = torch.rand(B, 1, D)
    m.col = torch.randn(L, 1)
    h, mod = torch.randn(B, L, D), torch.randn(B, 6, D)
    with torch.no_grad():
        ref = m(h, mod)
    out, rep = compile_and_run(m, h, mod)
    assert rep.matches().get("scale_shift", 0) == 0, rep.variants()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_unsupported_broadcast_reported_with_shape():
    torch.manual_seed(0)
    m = Site(NEAR_MISSES["per_row_scale"]).eval()
    m.col = torch.randn(L, 1)
    _, rep = compile_and_run(m, torch.randn(B, L, D), torch.randn(B, 6, D))
    reasons = [x.reason for x in rep.misses if x.family == "scale_shift"]
    assert len(reasons) == 1 and f"({L}, 1)" in reasons[0], str(rep)
