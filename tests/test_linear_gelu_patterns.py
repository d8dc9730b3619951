"""linear_gelu: Linear + tanh-GELU fuses into one op (tanh-GELU exactly); erf-GELU and
other near-misses don't."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from conftest import assert_close, compile_and_run


class FF(nn.Module):
    def __init__(self, act, d=24, inner=40):
        super().__init__()
        self.up, self.down, self.act = nn.Linear(d, inner), nn.Linear(inner, d), act

    def forward(self, x):
        return self.down(self.act(self.up(x)))


def custom_tanh_gelu(c):
    return lambda h: 0.5 * h * (1 + torch.tanh(math.sqrt(2 / math.pi) * (h + c * h * h * h)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(3, 7, 24), (5, 24)], ids=["3d-view", "2d"])
def test_tanh_gelu_fuses(dtype, shape):
    m = FF(lambda h: F.gelu(h, approximate="tanh")).to(dtype).eval()
    x = torch.randn(*shape, dtype=dtype)
    with torch.no_grad():
        ref = m(x)
    out, rep = compile_and_run(m, x)
    assert rep.matches() == {"linear_gelu": 1}, rep.variants()
    assert out.dtype == dtype
    assert_close(out.float(), ref.float(), dtype)


def test_diffusers_feedforward():
    from diffusers.models.attention import FeedForward

    m = nn.Sequential(FeedForward(24, inner_dim=32, activation_fn="gelu-approximate"),
                      FeedForward(24, inner_dim=16, activation_fn="gelu-approximate")).eval()
    x = torch.randn(2, 5, 24)
    with torch.no_grad():
        ref = m(x)
    out, rep = compile_and_run(m, x)
    assert rep.matches() == {"linear_gelu": 2}
    assert_close(out, ref)


def test_handwritten_tanh_gelu_is_a_reported_miss():
    """`0.5*h*(1+tanh(k*(h + c*h*h*h)))` multiplies in another order than F.gelu's
    decomposition: not fused (yet), and the report says where."""
    m = FF(custom_tanh_gelu(0.044715)).eval()
    x = torch.randn(2, 5, 24)
    out, rep = compile_and_run(m, x)
    assert rep.matches() == {}
    assert [mi.family for mi in rep.misses] == ["linear_gelu"] and "torch.tanh" in rep.misses[0].source
    assert_close(out, m(x))


NEAR_MISSES = {
    "erf_gelu": F.gelu,
    "other_constant": custom_tanh_gelu(0.05),
    "tanh_only": torch.tanh,
    "silu": F.silu,
}


@pytest.mark.parametrize("name", sorted(NEAR_MISSES))
def test_near_miss(name):
    m = FF(NEAR_MISSES[name]).eval()
    x = torch.randn(2, 5, 24)
    with torch.no_grad():
        ref = m(x)
    out, rep = compile_and_run(m, x)
    assert rep.matches().get("linear_gelu", 0) == 0
    assert_close(out, ref)


def test_preactivation_with_other_users_is_not_fused():
    class TwoUse(FF):
        def forward(self, x):
            h = self.up(x)
            return self.down(F.gelu(h, approximate="tanh")), h

    m = TwoUse(None).eval()
    x = torch.randn(2, 5, 24)
    with torch.no_grad():
        ref = m(x)
    out, rep = compile_and_run(m, x)
    assert rep.matches().get("linear_gelu", 0) == 0
    assert len(rep.misses) == 1 and rep.misses[0].family == "linear_gelu"
    assert_close(out[0], ref[0])


def test_gelu_of_non_linear_is_no_site():
    m = nn.Sequential(nn.Linear(8, 8)).eval()
    fn = lambda x: F.gelu(m(x) * 2, approximate="tanh")  # noqa: E731
    out, rep = compile_and_run(fn, torch.randn(2, 8))
    assert rep.matches() == {} and rep.misses == []


@pytest.mark.parametrize("order", ["mm_first", "bias_first"])
def test_unfused_bias_add_is_put_back(order):
    """Inductor's CUDA post-grad pass splits a Linear's addmm into mm + bias add (seen on an
    H100 with the tiny Wan pipeline's fp32 FFN: the site went unfused); canonicalize puts
    the addmm back where a tanh-GELU reads it. On the CPU Inductor keeps the addmm, so the
    split graph is built here and given to the canonicalization directly."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from difffuse.fusion_pass.canonicalize import fuse_bias_add

    w, b = torch.randn(32, 24), torch.randn(32)
    mm, add = torch.ops.aten.mm.default, torch.ops.aten.add.Tensor

    def fn(x):
        h = add(mm(x, w.t()), b) if order == "mm_first" else add(b, mm(x, w.t()))
        return torch.ops.aten.gelu.default(h, approximate="tanh")

    x = torch.randn(12, 24)
    from torch._inductor.decomposition import select_decomp_table

    gm = make_fx(fn, decomposition_table=select_decomp_table())(x)
    assert fuse_bias_add(gm.graph) == 1
    targets = [n.target for n in gm.graph.nodes]
    assert torch.ops.aten.addmm.default in targets and mm not in targets
    gm.recompile()
    assert_close(gm(x), fn(x))


def test_bias_add_without_gelu_left_split():
    """mm + bias feeding anything but a tanh-GELU stays as Inductor wrote it."""
    from difffuse.fusion_pass.canonicalize import fuse_bias_add
    from torch.fx.experimental.proxy_tensor import make_fx

    w, b = torch.randn(32, 24), torch.randn(32)
    gm = make_fx(lambda x, r: torch.ops.aten.add.Tensor(torch.ops.aten.mm.default(x, w.t()), b) + r)(
        torch.randn(12, 24), torch.randn(12, 32))
    assert fuse_bias_add(gm.graph) == 0
