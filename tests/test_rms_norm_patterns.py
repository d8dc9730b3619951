"""rms_norm: every spelling real code uses fuses once, matches eager; near-misses don't."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from conftest import assert_close, compile_and_run


class Lambda(nn.Module):
    def __init__(self, fn, dim=24, weight=True):
        super().__init__()
        self.fn = fn
        self.proj = nn.Linear(dim, dim)
        self.weight = nn.Parameter(torch.randn(dim)) if weight else None

    def forward(self, x):
        return self.fn(self, self.proj(x))


def diffusers_rmsnorm(m, h):
    """diffusers.models.normalization.RMSNorm.forward (weight cast before the multiply)."""
    dtype = h.dtype
    var = h.to(torch.float32).pow(2).mean(-1, keepdim=True)
    h = h * torch.rsqrt(var + 1e-6)
    if m.weight.dtype in (torch.float16, torch.bfloat16):
        h = h.to(m.weight.dtype)
    else:
        h = h.to(dtype)
    return h * m.weight


VARIANTS = {
    "pow_mean": lambda m, h: h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6) * m.weight,
    "square": lambda m, h: h * torch.rsqrt(torch.square(h).mean(dim=-1, keepdim=True) + 1e-5) * m.weight,
    "x_times_x": lambda m, h: h * torch.rsqrt((h * h).mean(-1, keepdim=True) + 1e-6) * m.weight,
    "sum_div": lambda m, h: h * torch.rsqrt((h * h).sum(-1, keepdim=True) / h.shape[-1] + 1e-6) * m.weight,
    "rsqrt_first": lambda m, h: torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6) * h * m.weight,
    "float_cast": lambda m, h: (h.float() * torch.rsqrt(h.float().pow(2).mean(-1, keepdim=True) + 1e-6)
                                ).to(h.dtype) * m.weight,
    "f_rms_norm": lambda m, h: F.rms_norm(h, (h.shape[-1],), m.weight, eps=1e-6),
    "f_rms_norm_noweight": lambda m, h: F.rms_norm(h, (h.shape[-1],), None, eps=1e-5),
    "diffusers": diffusers_rmsnorm,
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_variant_fuses_once(name, dtype):
    torch.manual_seed(0)
    m = Lambda(VARIANTS[name]).to(dtype).eval()
    x = torch.randn(2, 5, 24, dtype=dtype) * 3
    with torch.no_grad():
        ref = m(x)
    out, rep = compile_and_run(m, x)
    assert rep.matches() == {"rms_norm": 1}, (name, rep.variants())
    assert not rep.misses
    assert out.dtype == ref.dtype
    assert_close(out.float(), ref.float(), dtype)


def test_nn_rmsnorm_eps_read_from_match():
    """eps is read from the match: two norms with different eps both fuse and stay exact."""
    m = nn.Sequential(nn.RMSNorm(16, eps=1e-5), nn.Linear(16, 16), nn.RMSNorm(16, eps=0.5)).eval()
    x = torch.randn(3, 16)
    with torch.no_grad():
        ref = m(x)
    out, rep = compile_and_run(m, x)
    assert rep.matches() == {"rms_norm": 2}
    assert_close(out, ref)


def test_odd_shape_4d():
    m = nn.RMSNorm(7, eps=1e-6).eval()
    x = torch.randn(2, 3, 5, 7)
    out, rep = compile_and_run(m, x)
    assert rep.matches() == {"rms_norm": 1}
    assert_close(out, m(x))


NEAR_MISSES = {
    "wrong_dim": lambda m, h: h * torch.rsqrt(h.pow(2).mean(1, keepdim=True) + 1e-6) * m.weight,
    "variance_not_meansq": lambda m, h: h * torch.rsqrt(h.var(-1, keepdim=True, unbiased=False) + 1e-6) * m.weight,
    "eps_outside_rsqrt": lambda m, h: h * (torch.rsqrt(h.pow(2).mean(-1, keepdim=True)) + 1e-6) * m.weight,
    "sum_div_wrong_n": lambda m, h: h * torch.rsqrt((h * h).sum(-1, keepdim=True) / 7 + 1e-6),
    "normalises_other_tensor": lambda m, h: (h + 1) * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6),
    "eps_is_tensor": lambda m, h: h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + m.eps_t) * m.weight,
}


@pytest.mark.parametrize("name", sorted(NEAR_MISSES))
def test_near_miss_does_not_match(name):
    torch.manual_seed(0)
    m = Lambda(NEAR_MISSES[name]).eval()
    m.col = torch.randn(5, 1)
    m.eps_t = torch.rand(2, 5, 1) + 1e-3
    x = torch.randn(2, 5, 24) * 3
    with torch.no_grad():
        ref = m(x)
    out, rep = compile_and_run(m, x)
    assert rep.matches().get("rms_norm", 0) == 0, rep.variants()
    torch.testing.assert_close(out, ref, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("exponent", [2, 3], ids=["square", "cube"])
def test_cube_not_square_rejected_by_the_exponent_check(exponent):
    """`h * rsqrt(mean(h**e) + eps) * w`: with e = 2 the pow/mean variant fuses, so with
    e = 3 the structure is that variant's and only the exponent check can turn it away;
    the miss names the exponent. h is kept positive so that the cube's mean is too."""
    torch.manual_seed(0)
    m = Lambda(lambda m, h: h * torch.rsqrt(h.pow(exponent).mean(-1, keepdim=True) + 1e-6) * m.weight).eval()
    with torch.no_grad():
        m.proj.bias += 8
    x = torch.randn(2, 5, 24)
    with torch.no_grad():
        ref = m(x)
    assert (m.proj(x) > 0).all()
    out, rep = compile_and_run(m, x)
    if exponent == 2:
        assert rep.variants() == {"rms_norm:pow/mean/w": 1} and not rep.misses, str(rep)
    else:
        assert rep.matches() == {}, rep.variants()
        assert [(x.family, x.reason) for x in rep.misses] == [("rms_norm", "mean of x**3, not of x**2")], str(rep)
    assert_close(out, ref)


def test_weight_over_other_dim_is_not_absorbed():
    """A [L, 1] 'weight' is not an RMSNorm weight: only the bare norm fuses, the multiply stays."""
    m = Lambda(lambda m, h: (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)) * m.col).eval()
    m.col = torch.randn(5, 1)
    x = torch.randn(2, 5, 24)
    with torch.no_grad():
        ref = m(x)
    out, rep = compile_and_run(m, x)
    assert rep.variants() == {"rms_norm:pow/mean/none": 1}
    assert_close(out, ref)
