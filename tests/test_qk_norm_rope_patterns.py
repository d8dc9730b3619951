"""qk_norm_rope: RMSNorm of q/k + rope, in every rope spelling diffusers uses, fuses into one
op per q and per k and matches eager; near-misses don't fuse; the tiny Wan T2V fuses the
self-attention q and k of every block."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from conftest import assert_close, compile_and_run

B, L, H, D = 2, 7, 3, 8  # odd sequence and head counts


# ----------------------------------------------------------------- the spellings (diffusers math)
def diffusers_rms(x, w, eps=1e-6):
    """diffusers.models.normalization.RMSNorm.forward."""
    dtype = x.dtype
    var = x.to(torch.float32).pow(2).mean(-1, keepdim=True)
    x = x * torch.rsqrt(var + eps)
    x = x.to(w.dtype) if w.dtype in (torch.float16, torch.bfloat16) else x.to(dtype)
    return x * w


def rope_wan(h, freqs_cos, freqs_sin):
    """diffusers WanAttnProcessor's apply_rotary_emb."""
    x1, x2 = h.unflatten(-1, (-1, 2)).unbind(-1)
    cos = freqs_cos[..., 0::2]
    sin = freqs_sin[..., 1::2]
    out = torch.empty_like(h)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(h)


def rope_real(x, freqs, unbind_dim=-1):
    """diffusers.models.embeddings.apply_rotary_emb(use_real=True, sequence_dim=1)."""
    cos, sin = freqs
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    if unbind_dim == -1:  # Flux, HunyuanVideo
        x_real, x_imag = x.reshape(*x.shape[:-1], -1, 2).unbind(-1)
        x_rotated = torch.stack([-x_imag, x_real], dim=-1).flatten(3)
    else:  # CogView4, Cosmos (neox halves)
        x_real, x_imag = x.reshape(*x.shape[:-1], 2, -1).unbind(-2)
        x_rotated = torch.cat([-x_imag, x_real], dim=-1)
    return (x.float() * cos + x_rotated.float() * sin).to(x.dtype)


def rope_complex(x, freqs_cis):
    """diffusers apply_rotary_emb_qwen(use_real=False)."""
    x_rotated = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    x_out = torch.view_as_real(x_rotated * freqs_cis.unsqueeze(1)).flatten(3)
    return x_out.type_as(x)


ROPES = {
    "wan_scatter": lambda m, q, t: rope_wan(q, t[0][None, :, None], t[1][None, :, None]),
    "stack": lambda m, q, t: rope_real(q, t[:2], -1),
    "neox": lambda m, q, t: rope_real(q, t[:2], -2),
    "complex": lambda m, q, t: rope_complex(q, t[2]),
}
# the recogniser's name for each spelling: pairing / how the op reads the tables
VARIANT = {"wan_scatter": "interleaved/half", "stack": "interleaved/direct", "neox": "halves/direct",
           "complex": "interleaved/half"}


def tables(seq=L, d=D):
    """cos/sin full-width (pair-duplicated) fp32 tables built in fp64, and the complex one."""
    freqs = torch.outer(torch.arange(seq, dtype=torch.float64), 1.0 / 10000 ** (torch.arange(0, d, 2) / d))
    cos = freqs.cos().repeat_interleave(2, -1).float()
    sin = freqs.sin().repeat_interleave(2, -1).float()
    return cos, sin, torch.polar(torch.ones_like(freqs), freqs).to(torch.complex64)


class DiffusersRMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(dim)), eps

    def forward(self, x):
        return diffusers_rms(x, self.weight, self.eps)


class Attn(nn.Module):
    """q/k projections -> RMSNorm (across heads like Wan, or per head like Flux) -> rope ->
    [B, H, L, D] for attention. `rope(m, q, tables)` and `norm(m, q, w)` are swappable."""

    def __init__(self, rope, across=True, norm=None, heads=H, head_dim=D, dtype=torch.float32):
        super().__init__()
        self.rope, self.across, self.heads = rope, across, heads
        dim = heads * head_dim
        self.to_q, self.to_k = nn.Linear(dim, dim), nn.Linear(dim, dim)
        if across:  # Wan: torch.nn.RMSNorm over heads * head_dim
            self.norm_q, self.norm_k = nn.RMSNorm(dim, eps=1e-6), nn.RMSNorm(dim, eps=1e-5)
        else:  # Flux: diffusers RMSNorm over head_dim
            self.norm_q, self.norm_k = DiffusersRMSNorm(head_dim), DiffusersRMSNorm(head_dim)
        with torch.no_grad():
            for n in (self.norm_q, self.norm_k):
                n.weight.normal_()
        self.norm = norm
        self.to(dtype)

    def _qk(self, h, proj, norm, t):
        x = proj(h)
        if self.norm is not None:
            x = self.norm(self, x, norm)
        elif self.across:
            x = norm(x).unflatten(2, (self.heads, -1))
        else:
            x = norm(x.unflatten(2, (self.heads, -1)))
        return self.rope(self, x, t).transpose(1, 2)

    def forward(self, h, cos, sin, freqs_cis):
        t = (cos, sin, freqs_cis)
        return self._qk(h, self.to_q, self.norm_q, t), self._qk(h, self.to_k, self.norm_k, t)


def run(m, dtype=torch.float32, seq=L, d=D, heads=H, **kw):
    torch.manual_seed(1)
    args = (torch.randn(B, seq, heads * d, dtype=dtype), *tables(seq, d))
    with torch.no_grad():
        ref = m(*args)
    out, rep = compile_and_run(m, *args, **kw)
    return ref, out, rep


# ----------------------------------------------------------------- every form fuses, q and k
CASES = [(r, a, torch.float32) for r in ROPES for a in (True, False)] + \
        [(r, a, torch.bfloat16) for r, a in (("wan_scatter", True), ("stack", False), ("neox", False),
                                             ("complex", False))]


@pytest.mark.parametrize("rope,across,dtype", CASES,
                         ids=[f"{r}-{'across' if a else 'per_head'}-{str(d)[6:]}" for r, a, d in CASES])
def test_form_fuses_q_and_k(rope, across, dtype):
    torch.manual_seed(0)
    m = Attn(ROPES[rope], across=across, dtype=dtype).eval()
    ref, out, rep = run(m, dtype)
    assert rep.variants() == {f"qk_norm_rope:{VARIANT[rope]}": 2}, rep.variants()  # norms consumed too
    assert rep.misses == [], rep.misses
    for o, r in zip(out, ref):
        assert o.dtype == r.dtype and o.shape == r.shape == (B, H, L, D)
        assert_close(o.float(), r.float(), dtype)


def test_wan_form_dynamic_shapes_and_no_weight():
    """Symbolic batch/sequence; F.rms_norm without a weight is still the norm."""
    m = Attn(ROPES["wan_scatter"],
             norm=lambda m, x, n: F.rms_norm(x, (x.shape[-1],), None, 1e-6).unflatten(2, (m.heads, -1))).eval()
    ref, out, rep = run(m, dynamic=True)
    assert rep.variants() == {"qk_norm_rope:interleaved/half": 2}
    for o, r in zip(out, ref):
        assert_close(o, r)


def test_odd_heads_long_head_dim():
    m = Attn(ROPES["stack"], across=False, heads=5, head_dim=6).eval()
    ref, out, rep = run(m, heads=5, d=6, seq=3)
    assert rep.matches() == {"qk_norm_rope": 2}
    for o, r in zip(out, ref):
        assert_close(o, r)


def rope_ltx(x, freqs):
    """diffusers LTX apply_rotary_emb: rope over the flat [B, S, H*D] q (norm across heads)."""
    cos, sin = freqs
    x_real, x_imag = x.unflatten(2, (-1, 2)).unbind(-1)
    x_rotated = torch.stack([-x_imag, x_real], dim=-1).flatten(2)
    return (x.float() * cos + x_rotated.float() * sin).to(x.dtype)


def test_ltx_flat_rope_fuses_exactly():
    """LTX ropes q before the head split: fused as one row of H*D (the op's per-head path
    with head_dim = H*D); the values stay exact."""
    m = Attn(lambda m, q, t: rope_ltx(q, (t[0].repeat(1, H)[None], t[1].repeat(1, H)[None])),
             norm=lambda m, x, n: n(x)).eval()
    ref, out, rep = run(m)
    assert rep.variants() == {"qk_norm_rope:interleaved/direct": 2}
    for o, r in zip(out, ref):
        assert_close(o, r)


# ----------------------------------------------------------------- near-misses
def rope_wan_swapped(h, freqs_cos, freqs_sin):
    """sin where cos belongs: a different rotation, not a rope of these tables."""
    x1, x2 = h.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = freqs_cos[..., 0::2], freqs_sin[..., 1::2]
    out = torch.empty_like(h)
    out[..., 0::2] = x1 * sin - x2 * cos
    out[..., 1::2] = x1 * cos + x2 * sin
    return out


def rope_wan_offset(h, freqs_cos, freqs_sin):
    """cos read at the odd positions: not Wan's pair rotation of the table."""
    x1, x2 = h.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = freqs_cos[..., 1::2], freqs_sin[..., 1::2]
    out = torch.empty_like(h)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out


def norm_dim1(m, x, n):
    """'RMSNorm' over the sequence dim, not the last."""
    return (x * torch.rsqrt(x.pow(2).mean(1, keepdim=True) + 1e-6) * n.weight).unflatten(2, (m.heads, -1))


def partial_rope(m, q, t):
    """odd head_dim 9: rope on the first 8 dims only (a slice between norm and rope)."""
    return torch.cat([rope_real(q[..., :8], (t[0][:, :8], t[1][:, :8]), -1), q[..., 8:]], dim=-1)


# Not textbook ropes, but every output channel is still "x[j]*A_j + x[pair(j)]*B_j" with
# table entries A_j, B_j: the op reads exactly those entries, so these fuse, exactly.
OTHER_TABLE_READINGS = {
    "sin_cos_swapped": lambda m, q, t: rope_wan_swapped(q, t[0][None, :, None], t[1][None, :, None]),
    "cos_odd_offset": lambda m, q, t: rope_wan_offset(q, t[0][None, :, None], t[1][None, :, None]),
}


@pytest.mark.parametrize("name", sorted(OTHER_TABLE_READINGS))
def test_other_table_readings_fuse_exactly(name):
    torch.manual_seed(0)
    m = Attn(OTHER_TABLE_READINGS[name]).eval()
    ref, out, rep = run(m)
    assert rep.matches() == {"qk_norm_rope": 2}, rep.variants()
    assert rep.variants() == {"qk_norm_rope:interleaved/gathered": 2}, rep.variants()
    for o, r in zip(out, ref):
        torch.testing.assert_close(o, r, rtol=1e-5, atol=1e-5)


NEAR_MISSES = {
    # name: (module kwargs, rope spots left in the graph per q/k, rms_norm matches)
    "cos_sin_different_tables": (dict(rope=lambda m, q, t: rope_real(q, (t[0], t[1][:1]))),
                                 2, 2),
    "norm_over_non_last_dim": (dict(rope=ROPES["wan_scatter"], norm=norm_dim1), 2, 0),
    # a scale between norm and rope: the rope reads a product, not a norm (a `rope` site)
    "norm_then_scale_then_rope": (dict(rope=ROPES["stack"], across=False,
                                       norm=lambda m, x, n: n(x.unflatten(2, (m.heads, -1))) * 0.5), 0, 2),
    # the rope reads a GELU, not the norm: a rope of its own (the `rope` family's, below)
    "norm_then_gelu_then_rope": (dict(rope=ROPES["complex"],
                                      norm=lambda m, x, n: F.gelu(n(x)).unflatten(2, (m.heads, -1))), 0, 2),
    "norm_output_used_twice": (dict(rope=lambda m, q, t: ROPES["stack"](m, q, t) + q, across=False), 2, 2),
    "odd_head_dim_partial_rope": (dict(rope=partial_rope, across=False, head_dim=9), 2, 2),
}


@pytest.mark.parametrize("name", sorted(NEAR_MISSES))
def test_near_miss_does_not_fuse(name):
    kwargs, rope_misses, rms = NEAR_MISSES[name]
    torch.manual_seed(0)
    m = Attn(**kwargs).eval()
    ref, out, rep = run(m, d=kwargs.get("head_dim", D))
    assert rep.matches().get("qk_norm_rope", 0) == 0, rep.variants()
    assert rep.matches().get("rms_norm", 0) == rms, rep.variants()  # the norm alone still fuses
    misses = [x for x in rep.misses if x.family == "qk_norm_rope"]
    assert len(misses) == rope_misses, rep.misses  # the rope is reported, with its reason
    # each rope is fused on its own (the reference lowering takes every `rope` site) or reported
    assert rep.matches().get("rope", 0) + len(misses) + sum(x.family == "rope" for x in rep.misses) == 2, str(rep)
    for o, r in zip(out, ref):
        torch.testing.assert_close(o, r, rtol=1e-5, atol=1e-5)


def test_miss_reasons_name_the_problem():
    m = Attn(NEAR_MISSES["cos_sin_different_tables"][0]["rope"]).eval()
    _, _, rep = run(m)
    reasons = {x.reason for x in rep.misses if x.family == "qk_norm_rope"}
    assert reasons and all("different position dims" in r for r in reasons), reasons


# ----------------------------------------------------------------- tiny Wan T2V
def test_tiny_wan_t2v_self_attention_fuses():
    pytest.importorskip("diffusers")
    from difffuse.testing.tiny_models import wan_t2v

    model, kwargs = wan_t2v(num_layers=2)
    with torch.no_grad():
        ref = model(**kwargs)[0]
    out, rep = compile_and_run(model, options={"inductor": False}, **kwargs)  # the rewrite, run eagerly
    assert rep.variants()["qk_norm_rope:interleaved/half"] == 4  # q and k of each of the 2 blocks
    assert rep.matches()["qk_norm_rope"] == 4
    assert [x for x in rep.misses if x.family == "qk_norm_rope"] == []
    torch.testing.assert_close(out[0], ref, rtol=5e-5, atol=5e-5)


# ----------------------------------------------------------------- joint streams and token ranges
T = 4  # text tokens


class JointAttn(nn.Module):
    """Flux's joint attention: text and image q (and k) each get their own per-head RMSNorm,
    are concatenated along the tokens (text first) and roped together. `join(txt, img)` is
    swappable for the near-misses."""

    def __init__(self, rope, eps_txt=1e-6, join=None, dtype=torch.float32):
        super().__init__()
        dim = H * D
        self.to_q, self.add_q = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.norm_q, self.norm_added_q = DiffusersRMSNorm(D), DiffusersRMSNorm(D, eps=eps_txt)
        with torch.no_grad():
            self.norm_q.weight.normal_()
            self.norm_added_q.weight.normal_()
        self.rope, self.join = rope, join or (lambda a, b: torch.cat([a, b], dim=1))
        self.to(dtype)

    def forward(self, img, txt, cos, sin, freqs_cis):
        q = self.norm_q(self.to_q(img).unflatten(2, (H, -1)))
        tq = self.norm_added_q(self.add_q(txt).unflatten(2, (H, -1)))
        return self.rope(self, self.join(tq, q), (cos, sin, freqs_cis)).transpose(1, 2)


def run_joint(m, dtype=torch.float32):
    torch.manual_seed(2)
    args = (torch.randn(B, L, H * D, dtype=dtype), torch.randn(B, T, H * D, dtype=dtype), *tables(L + T))
    with torch.no_grad():
        ref = m(*args)
    out, rep = compile_and_run(m, *args)
    return ref, out, rep


@pytest.mark.parametrize("rope,dtype", [("stack", torch.float32), ("stack", torch.bfloat16),
                                        ("neox", torch.float32), ("complex", torch.float32)])
def test_joint_streams_fuse_into_one_site(rope, dtype):
    """Two norms (own weights, own eps) + one rope over their concatenation -> one match,
    no rms_norm left over, equal to eager."""
    m = JointAttn(ROPES[rope], eps_txt=1e-5, dtype=dtype).eval()
    ref, out, rep = run_joint(m, dtype)
    assert rep.matches() == {"qk_norm_rope": 1}, rep.variants()
    assert rep.misses == []
    assert_close(out, ref)


@pytest.mark.parametrize("name,join", [
    ("text stream scaled after its norm", lambda a, b: torch.cat([a * 1.5, b], dim=1)),
    ("image stream not a norm output", lambda a, b: torch.cat([a, b.sigmoid()], dim=1)),
])
def test_joint_near_misses_do_not_fuse(name, join):
    m = JointAttn(ROPES["stack"], join=join).eval()
    ref, out, rep = run_joint(m)
    assert rep.matches().get("qk_norm_rope", 0) == 0, (name, rep.variants())
    assert_close(out, ref)


class PartialRopeAttn(nn.Module):
    """HunyuanVideo's single-stream block: one per-head RMSNorm over image+text tokens, the
    rope on the image tokens only (first `L`), the text tokens passed through."""

    def __init__(self, rope, split=None, dtype=torch.float32):
        super().__init__()
        self.to_q = nn.Linear(H * D, H * D)
        self.norm_q = DiffusersRMSNorm(D)
        with torch.no_grad():
            self.norm_q.weight.normal_()
        self.rope = rope
        self.split = split or (lambda q, r: torch.cat([r(q[:, :-T]), q[:, -T:]], dim=1))
        self.to(dtype)

    def forward(self, h, cos, sin, freqs_cis):
        q = self.norm_q(self.to_q(h).unflatten(2, (H, -1)))
        return self.split(q, lambda x: self.rope(self, x, (cos, sin, freqs_cis))).transpose(1, 2)


def run_partial(m, dtype=torch.float32):
    torch.manual_seed(3)
    args = (torch.randn(B, L + T, H * D, dtype=dtype), *tables(L))
    with torch.no_grad():
        ref = m(*args)
    out, rep = compile_and_run(m, *args)
    return ref, out, rep


@pytest.mark.parametrize("rope,dtype,first", [("stack", torch.float32, True), ("stack", torch.bfloat16, True),
                                              ("neox", torch.float32, False), ("complex", torch.float32, True)])
def test_rope_on_a_token_range_fuses(rope, dtype, first):
    """rope(n[:, :L]) ++ n[:, L:] (or text first) -> one op over all tokens, identity table rows."""
    split = None if first else (lambda q, r: torch.cat([q[:, :T], r(q[:, T:])], dim=1))
    m = PartialRopeAttn(ROPES[rope], split=split, dtype=dtype).eval()
    ref, out, rep = run_partial(m, dtype)
    assert rep.matches() == {"qk_norm_rope": 1}, rep.variants()
    assert rep.misses == []
    assert_close(out, ref)


@pytest.mark.parametrize("name,split", [
    ("ranges overlap", lambda q, r: torch.cat([r(q[:, :-T]), q[:, -T - 1:-1]], dim=1)),
    ("rest of another tensor", lambda q, r: torch.cat([r(q[:, :-T]), (q * 2)[:, -T:]], dim=1)),
])
def test_token_range_near_misses_do_not_fuse(name, split):
    m = PartialRopeAttn(ROPES["stack"], split=split).eval()
    ref, out, rep = run_partial(m)
    assert not any(k.endswith("token_range") for k in rep.variants()), (name, rep.variants())
    assert_close(out, ref)


class WholeWidthRope(nn.Module):
    """LTX-Video: RMSNorm over the whole q width, then a rope over that width (no head dim)."""

    def __init__(self, dim):
        super().__init__()
        self.to_q, self.norm_q = nn.Linear(dim, dim), nn.RMSNorm(dim, eps=1e-6)
        with torch.no_grad():
            self.norm_q.weight.normal_()

    def forward(self, h, cos, sin):
        x = self.norm_q(self.to_q(h))
        re, im = x.unflatten(2, (-1, 2)).unbind(-1)
        rot = torch.stack([-im, re], dim=-1).flatten(2)
        return (x.float() * cos + rot.float() * sin).to(x.dtype)


@pytest.mark.parametrize("lowering", ["reference", "cuda"], ids=["reference", "triton"])
def test_whole_width_rope_is_one_head(lowering):
    """[B, L, D] q/k: one head of width D (not L heads), so L * D may exceed the kernels' row
    limit; the CUDA lowering (interpreted on a CPU) takes it."""
    from conftest import DEVICE

    seq, d = 600, 16  # seq * d > 8192
    m = WholeWidthRope(d).to(DEVICE).eval()
    torch.manual_seed(4)
    cos, sin, _ = tables(seq, d)
    args = (torch.randn(1, seq, d, device=DEVICE), cos[None].to(DEVICE), sin[None].to(DEVICE))
    with torch.no_grad():
        ref = m(*args)
    out, rep = compile_and_run(m, *args, options={"lowering": lowering})
    assert rep.matches() == {"qk_norm_rope": 1}, (str(rep), rep.variants())
    assert_close(out, ref)


class LayerNormInPlaceRope(nn.Module):
    """CogVideoX: q/k transposed to [B, H, L, D], LayerNorm per head (weight and bias), then
    the rope written in place on the video tokens: `q[:, :, T:] = rope(q[:, :, T:])`.
    `write(q, r)` is the in-place write (swappable for the near-misses)."""

    def __init__(self, dtype=torch.float32, write=None, norm=None, dynamic_bias=False):
        super().__init__()
        self.to_q = nn.Linear(H * D, H * D)
        self.norm_q = norm or nn.LayerNorm(D, eps=1e-6)
        with torch.no_grad():
            for p in self.norm_q.parameters():
                p.normal_()
        self.write = write or self._write
        self.to(dtype)

    @staticmethod
    def _write(q, r):
        q[:, :, T:] = r(q[:, :, T:])

    def forward(self, h, cos, sin):
        q = self.to_q(h).view(B, -1, H, D).transpose(1, 2)
        q = self.norm_q(q)
        self.write(q, lambda x: rope_heads_first(x, cos, sin))
        return q * 2


def rope_heads_first(x, cos, sin):
    """diffusers apply_rotary_emb(use_real=True) on [B, H, L, D] (sequence_dim=2: CogVideoX)."""
    cos, sin = cos[None, None], sin[None, None]
    x_real, x_imag = x.reshape(*x.shape[:-1], -1, 2).unbind(-1)
    x_rotated = torch.stack([-x_imag, x_real], dim=-1).flatten(3)
    return (x.float() * cos + x_rotated.float() * sin).to(x.dtype)


def run_in_place(m, dtype=torch.float32, **kw):
    torch.manual_seed(5)
    cos, sin, _ = tables(L)
    args = (torch.randn(B, L + T, H * D, dtype=dtype) + 1.5, cos.to(dtype), sin.to(dtype))
    with torch.no_grad():
        ref = m(*args)
    out, rep = compile_and_run(m, *args, **kw)
    return ref, out, rep


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_layernorm_in_place_rope_fuses(dtype):
    """One op over all tokens (identity rows for the text), LayerNorm with bias, one head
    per token (heads before tokens); closer to fp64 than Inductor's own code."""
    m = LayerNormInPlaceRope(dtype).eval()
    ref, out, rep = run_in_place(m, dtype)
    assert rep.matches() == {"qk_norm_rope": 1}, (str(rep), rep.variants())
    assert rep.variants() == {"qk_norm_rope:interleaved/direct/token_range": 1}, rep.variants()
    assert rep.misses == []
    assert_close(out, ref)


def test_layernorm_in_place_rope_dynamic_shapes():
    m = LayerNormInPlaceRope().eval()
    ref, out, rep = run_in_place(m, dynamic=True)
    assert rep.matches() == {"qk_norm_rope": 1}, str(rep)
    assert_close(out, ref)


def _write_elsewhere(q, r):
    q[:, :, T:] = r(q[:, :, T - 1:-1])


def _write_rounded(q, r):
    q[:, :, T:] = r(q[:, :, T:].half()).to(q.dtype) if q.dtype == torch.float32 else r(q[:, :, T:])


class ModulatedLN(nn.Module):
    """LayerNorm whose "weight" is computed (a modulation), not a parameter."""

    def __init__(self):
        super().__init__()
        self.ln = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        self.s = nn.Linear(1, 1)

    def forward(self, x):
        return self.ln(x) * (self.s.weight.view(1) * torch.ones(D))


@pytest.mark.parametrize("name", ["write to another range", "rope of a rounded q", "computed affine",
                                  "LayerNorm over two dims"])
def test_layernorm_in_place_near_misses_do_not_fuse(name):
    kw = {"write to another range": dict(write=_write_elsewhere),
          "rope of a rounded q": dict(write=_write_rounded),
          "computed affine": dict(norm=ModulatedLN()),
          "LayerNorm over two dims": dict(norm=nn.LayerNorm((L + T, D)))}[name]
    m = LayerNormInPlaceRope(**kw).eval()
    ref, out, rep = run_in_place(m)
    assert "qk_norm_rope" not in rep.matches(), (name, str(rep), rep.variants())
    # Inductor drops the fp16 round trip eager makes (emulate_precision_casts is off)
    assert_close(out, ref, torch.bfloat16 if name == "rope of a rounded q" else None)
