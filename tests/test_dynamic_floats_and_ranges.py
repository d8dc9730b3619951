"""dynamic=True regressions found by a sweep over diffusers DiTs the tests do not name:
an RMSNorm written `+ self.eps` feeding a modulation (LTX2, Lumina2: Dynamo lifts eps to a
0-d tensor input) may not fuse as norm_scale_shift, but must then be a reported miss, not a
silent split into rms_norm + scale_shift; a q/k LayerNorm whose rope covers only the
image tokens, written in place (CogView4, `q[:, :, T:] = rope(q[:, :, T:])`), fuses with
symbolic token ranges, and the compiled graph serves a second length."""
from __future__ import annotations

import torch
import torch.nn as nn

import difffuse

from conftest import assert_close, compile_and_run


class RMSMod(nn.Module):
    """diffusers' RMSNorm spelling, then AdaLN modulation."""

    def __init__(self, d=32, eps=1e-6):
        super().__init__()
        self.weight, self.eps, self.mod = nn.Parameter(torch.randn(d)), eps, nn.Linear(d, 2 * d)

    def forward(self, x, emb):
        scale, shift = self.mod(emb).unsqueeze(1).chunk(2, -1)
        v = x.float().pow(2).mean(-1, keepdim=True)
        return (x * torch.rsqrt(v + self.eps)) * self.weight * (1 + scale) + shift


def test_rms_norm_modulation_with_a_lifted_eps_is_a_reported_miss():
    torch.manual_seed(0)
    m = RMSMod().eval()
    x, emb = torch.randn(1, 8, 32), torch.randn(1, 32)
    with torch.no_grad():
        ref = m(x, emb)
    out, rep = compile_and_run(m, x, emb, dynamic=True)
    assert_close(out, ref)
    assert "norm_scale_shift" not in rep.matches()
    misses = [mm for mm in rep.misses if mm.family == "norm_scale_shift"]
    assert len(misses) == 1 and "Dynamo lifted" in misses[0].reason, rep.misses
    _, static = compile_and_run(m, x, emb)  # a constant eps: one fused op
    assert static.matches().get("norm_scale_shift") == 1 and not static.misses


class InPlaceImageRope(nn.Module):
    """CogView4: per-head LayerNorm of q, rope (rotate_half) on the image tokens after T text tokens."""

    def __init__(self, heads=2, d=16):
        super().__init__()
        self.heads, self.norm = heads, nn.LayerNorm(d, elementwise_affine=False, eps=1e-5)
        self.to_q = nn.Linear(heads * d, heads * d)  # its width stays a constant under dynamic=True

    def forward(self, x, cos, sin, text):
        q = self.norm(self.to_q(x).unflatten(-1, (self.heads, -1)).transpose(1, 2))  # [B, H, L, D]
        x = q[:, :, text.shape[0]:]
        x1, x2 = x.chunk(2, -1)
        q[:, :, text.shape[0]:] = x * cos + torch.cat([-x2, x1], -1) * sin
        return q


def test_in_place_token_range_rope_under_dynamic_shapes():
    torch.manual_seed(0)
    m = InPlaceImageRope().eval()
    torch._dynamo.reset()
    difffuse.reset_report()
    compiled = torch.compile(m, backend="difffuse", options={"lowering": "reference"}, dynamic=True)
    for image in (12, 20):  # the second length runs the graph compiled for the first
        x, text = torch.randn(2, 5 + image, 32), torch.zeros(5)
        ang = torch.rand(image, 16) * 6
        with torch.no_grad():
            ref, out = m(x, ang.cos(), ang.sin(), text), compiled(x, ang.cos(), ang.sin(), text)
        assert_close(out, ref)
    rep = difffuse.report()
    assert rep.matches() == {"qk_norm_rope": 1} and not rep.misses, (str(rep), rep.misses)
