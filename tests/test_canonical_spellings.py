"""Spellings that collapse before matching (canonicalize.py, issue 28): `addcmul`, either
operand order of the modulation's add and multiply, `1 + s` / `s + 1`, scale-only and
shift-only modulation, one norm modulated twice, and Python floats that Dynamo lifts to
graph inputs under `dynamic=True`. Each fuses with the same variant as its canonical
spelling and matches eager; the near-misses compute what eager computes and do not fuse."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import difffuse
from conftest import assert_close, compile_and_run
from difffuse.patterns import available_families

B, L, D = 2, 6, 16


class Block(nn.Module):
    """x = proj(h); `fn(m, h, x, mods)` with mods the six [B, 1, D] chunks of a modulation
    (in the model's dtype, as ComfyUI casts its modulation to x's)."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn
        self.proj = nn.Linear(D, D)
        self.table = nn.Parameter(torch.randn(1, 6, D) / D ** 0.5)
        self.ln = nn.LayerNorm(D, eps=1e-6, elementwise_affine=False)
        self.rms = nn.RMSNorm(D, eps=1e-6)
        self.col = nn.Parameter(torch.randn(L, 1))
        self.wide = nn.Parameter(torch.randn(2, 1, 1, D))
        self.scale_constant = 1.0
        self.eps = 1e-6

    def forward(self, h, temb):
        mods = (self.table.to(h.dtype) + temb).chunk(6, dim=1)
        return self.fn(self, h, self.proj(h), mods)


def hand_rms(m, x):
    """RMSNorm with `+ self.eps` (sglang's forward_native): eps is a graph input under dynamic=True."""
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + m.eps) * m.rms.weight


SITES = {
    # name: (fn, {family: matches}, {family:variant: count} or None)
    "addcmul_modulation": (lambda m, h, x, s: torch.addcmul(s[0], m.ln(x), 1 + s[1]),
                           {"norm_scale_shift": 1}, {"norm_scale_shift:none/-/ln/noaffine/mod": 1}),
    "addcmul_gate": (lambda m, h, x, s: torch.addcmul(h, x, s[2]), {"scale_shift": 1}, {"scale_shift:c+a*b/nocast": 1}),
    "addcmul_gate_value_2": (lambda m, h, x, s: torch.addcmul(h, x, s[2], value=2), {"scale_shift": 1}, None),
    "addcmul_comfyui_block": (lambda m, h, x, s: torch.addcmul(h, m.proj(torch.addcmul(s[0], m.ln(x), 1 + s[1])), s[2]),
                              {"norm_scale_shift": 1, "scale_shift": 1}, None),
    "scale_first_flux2": (lambda m, h, x, s: (1 + s[1]) * m.ln(x) + s[0],
                          {"norm_scale_shift": 1}, {"norm_scale_shift:none/-/ln/noaffine/mod": 1}),
    "norm_scale_shift_first": (lambda m, h, x, s: s[0] + m.ln(x) * (1 + s[1]),
                               {"norm_scale_shift": 1}, {"norm_scale_shift:none/-/ln/noaffine/mod": 1}),
    "x_s_plus_shift": (lambda m, h, x, s: x * (1 + s[1]) + s[0], {"scale_shift": 1},
                       {"scale_shift:c+a*(b+k)/nocast": 1}),
    "shift_plus_s_x": (lambda m, h, x, s: s[0] + (1 + s[1]) * x, {"scale_shift": 1},
                       {"scale_shift:c+a*(b+k)/nocast": 1}),
    "s_plus_1": (lambda m, h, x, s: x * (s[1] + 1) + s[0], {"scale_shift": 1}, {"scale_shift:c+a*(b+k)/nocast": 1}),
    "torch_add_1_s": (lambda m, h, x, s: x * torch.add(1, s[1]) + s[0], {"scale_shift": 1},
                      {"scale_shift:c+a*(b+k)/nocast": 1}),
    "gate_first": (lambda m, h, x, s: h + s[2] * x, {"scale_shift": 1}, {"scale_shift:c+a*b/nocast": 1}),
    "scale_only_rms_lumina": (lambda m, h, x, s: m.rms(x) * (1 + s[1]), {"norm_scale_shift": 1},
                              {"norm_scale_shift:none/-/rms/w/mod": 1}),
    "scale_only_ln_cast": (lambda m, h, x, s: (m.ln(x.float()) * (1 + s[1])).type_as(x), {"norm_scale_shift": 1}, None),
    "scale_only_plain": (lambda m, h, x, s: x * (1 + s[1]), {"scale_shift": 1}, {"scale_shift:c+a*(b+k)/nocast": 1}),
    "shift_only_ln": (lambda m, h, x, s: m.ln(x) + s[0], {"norm_scale_shift": 1},
                      {"norm_scale_shift:none/-/ln/noaffine/mod": 1}),
    "residual_scale_only": (lambda m, h, x, s: (lambda r: (m.ln(r) * (1 + s[1]), r))(h + x * s[2]),
                            {"norm_scale_shift": 1}, {"norm_scale_shift:gate/direct/ln/noaffine/mod": 1}),
    "twice_modulated_sd35": (lambda m, h, x, s: (lambda n: (n * (1 + s[1]) + s[0], n * (1 + s[4]) + s[3]))(m.ln(x)),
                             {"norm_scale_shift": 2}, {"norm_scale_shift:none/-/ln/noaffine/mod": 2}),
    "twice_modulated_rms": (lambda m, h, x, s: (lambda n: (n * (1 + s[1]) + s[0], n * (1 + s[4])))(m.rms(x)),
                            {"norm_scale_shift": 2}, {"norm_scale_shift:none/-/rms/w/mod": 2}),
}


def run(fn, dtype=torch.float32, dynamic=None, options=None, seed=0):
    torch.manual_seed(seed)
    m = Block(fn).to(dtype).eval()
    m.table.data = m.table.data.float()
    h = torch.randn(B, L, D, dtype=dtype)
    temb = torch.randn(B, 6, D, dtype=dtype)
    with torch.no_grad():
        ref = m(h, temb)
    out, rep = compile_and_run(m, h, temb, dynamic=dynamic, options=options)
    return m, (h, temb), ref, out, rep


def close(out, ref, dtype=torch.float32):
    outs, refs = torch.utils._pytree.tree_leaves(out), torch.utils._pytree.tree_leaves(ref)
    assert len(outs) == len(refs)
    for o, r in zip(outs, refs):
        assert o.dtype == r.dtype and o.shape == r.shape
        assert_close(o.float(), r.float(), dtype)


CASES = [(n, d) for n in sorted(SITES) for d in (torch.float32, torch.bfloat16)]


@pytest.mark.parametrize("name,dtype", CASES)
def test_spelling_fuses_as_its_canonical_form(name, dtype):
    fn, matches, variants = SITES[name]
    _, _, ref, out, rep = run(fn, dtype)
    assert {f: n for f, n in rep.matches().items() if f in matches} == matches, (name, rep.variants(), str(rep))
    if variants and dtype == torch.float32:
        assert {v: n for v, n in rep.variants().items() if v.split(":")[0] in matches} == variants
    assert not [x for x in rep.misses if x.family in ("scale_shift", "norm_scale_shift", "rms_norm")], str(rep)
    close(out, ref, dtype)


def test_spellings_compute_the_same_graph():
    """`(1+s)*n + t`, `t + n*(1+s)`, `addcmul(t, n, 1+s)`, `n*(s+1) + t`: one variant each."""
    seen = set()
    for fn in (lambda m, h, x, s: (1 + s[1]) * m.ln(x) + s[0], lambda m, h, x, s: s[0] + m.ln(x) * (1 + s[1]),
               lambda m, h, x, s: torch.addcmul(s[0], m.ln(x), 1 + s[1]),
               lambda m, h, x, s: m.ln(x) * (s[1] + 1) + s[0]):
        seen |= set(run(fn)[-1].variants())
    assert seen == {"norm_scale_shift:none/-/ln/noaffine/mod"}, seen


def test_addcmul_value_is_kept():
    """addcmul(h, x, g, value=2) fuses as `h + (x*2)*g`: the value is an operand, not dropped."""
    _, _, ref, out, rep = run(SITES["addcmul_gate_value_2"][0])
    close(out, ref)
    h = run(lambda m, h, x, s: torch.addcmul(h, x, s[2]))[3]
    assert not torch.allclose(out, h)  # the value-1 result differs: the 2 is computed


# ------------------------------------------------------------------ variant counts
def test_variant_counts_went_down():
    """Before the canonicalisation: rms_norm 384 (192 + 192 tensor-parallel), norm_scale_shift
    334, scale_shift 8; the operand orders, `.float()` placements, the mixed-dtype product
    and (norm_scale_shift) the optional casts no longer need variants of their own."""
    counts = {n: len(f.variants()) for n, f in available_families().items()}
    assert counts["rms_norm"] == 72 and counts["norm_scale_shift"] == 65 and counts["scale_shift"] == 4, counts


# ------------------------------------------------------------------ Python floats under dynamic=True
def sglang_modulation(m, h, x, s):
    """sglang's ScaleShift: `x * (scale_constant + scale) + shift`, scale_constant = 1.0."""
    return m.ln(x) * (m.scale_constant + s[1]) + s[0]


def sglang_scale_shift_plain(m, h, x, s):
    return x * (m.scale_constant + s[1]) + s[0]


@pytest.mark.parametrize("fn,family", [(sglang_modulation, "norm_scale_shift"),
                                       (sglang_scale_shift_plain, "scale_shift"),
                                       (lambda m, h, x, s: hand_rms(m, x), "rms_norm")],
                         ids=["norm_scale_shift", "scale_shift", "rms_eps"])
def test_python_float_lifted_by_dynamo_fuses_and_follows_its_value(fn, family):
    """Under dynamic=True `self.scale_constant` / `self.eps` are 0-d tensor inputs whose value
    Dynamo does not guard: the site fuses with the tensor passed through (the modulation's
    `scale + k` computed in the graph, the norm's `mean + eps` between variance and
    rsqrt_mul), and a changed value is followed without a recompile."""
    m, args, ref, out, rep = run(fn, dynamic=True)
    assert rep.matches().get(family, 0) == 1, (str(rep), rep.variants())
    assert not rep.misses, str(rep)
    close(out, ref)
    graphs = len(rep.graphs)
    compiled = torch.compile(m, backend="difffuse", options={"lowering": "reference"}, dynamic=True)
    torch._dynamo.reset()
    difffuse.reset_report()
    with torch.no_grad():
        compiled(*args)
        m.scale_constant, m.eps = 0.25, 0.5
        out, ref = compiled(*args), m(*args)
    assert len(difffuse.report().graphs) == graphs  # no recompile: the values are graph inputs
    close(out, ref)


def test_tensor_eps_reported_where_the_lowering_cannot_take_it():
    """The CUDA lowering has no variance/rsqrt_mul: the RMSNorm with a lifted eps is a miss
    that says why (not "eps is a tensor", not silent), and the output is eager's."""
    _, _, ref, out, rep = run(lambda m, h, x, s: hand_rms(m, x), dynamic=True, options={"lowering": "cuda"})
    assert rep.matches().get("rms_norm", 0) == 0
    reasons = [x.reason for x in rep.misses if x.family == "rms_norm"]
    assert len(reasons) == 1 and "Dynamo lifted" in reasons[0] and "no variance/rsqrt_mul" in reasons[0], str(rep)
    close(out, ref)


def test_static_python_float_is_a_constant():
    """Without dynamic=True the same floats are constants in the graph: plain k and eps."""
    _, _, ref, out, rep = run(sglang_modulation)
    assert rep.variants() == {"norm_scale_shift:none/-/ln/noaffine/mod": 1}, rep.variants()
    close(out, ref)


# ------------------------------------------------------------------ near-misses
NEAR_MISSES = {
    # name: (fn, the families that must not match)
    "sub_not_add": (lambda m, h, x, s: s[0] - x * (1 + s[1]), ("scale_shift",)),
    "sub_not_add_after_norm": (lambda m, h, x, s: s[0] - m.ln(x) * (1 + s[1]), ("norm_scale_shift",)),
    "modulation_before_norm": (lambda m, h, x, s: m.ln(x * (1 + s[1]) + s[0]), ("norm_scale_shift",)),
    # a shift that widens the output ([2, B, L, D]): no modulation of the norm's shape
    "shift_widens_output": (lambda m, h, x, s: m.ln(x) * (1 + s[1]) + m.wide, ("norm_scale_shift", "scale_shift")),
    "shift_per_row": (lambda m, h, x, s: x * (1 + s[1]) + m.col, ("scale_shift",)),
    "scale_per_row": (lambda m, h, x, s: x * (1 + m.col), ("scale_shift",)),
    "gelu_like_scale_only": (lambda m, h, x, s: (0.5 * x) * (1 + torch.tanh(x)), ("scale_shift",)),
    "affine_bias_not_shift": (lambda m, h, x, s: m.ln(x) + m.rms.weight, ("norm_scale_shift",)),
    "k_full_tensor": (lambda m, h, x, s: m.ln(x) * (h + s[1]) + s[0], ("norm_scale_shift", "scale_shift")),
}


@pytest.mark.parametrize("name", sorted(NEAR_MISSES))
def test_near_miss_does_not_match(name):
    fn, families = NEAR_MISSES[name]
    _, _, ref, out, rep = run(fn)
    assert all(rep.matches().get(f, 0) == 0 for f in families), (name, rep.variants())
    close(out, ref)


def test_near_misses_are_reported_with_their_reason():
    rep = run(NEAR_MISSES["shift_per_row"][0])[-1]
    assert any(f"({L}, 1)" in x.reason for x in rep.misses if x.family == "scale_shift"), str(rep)
    rep = run(NEAR_MISSES["sub_not_add_after_norm"][0])[-1]
    assert any("goes on into sub" in x.reason for x in rep.misses if x.family == "norm_scale_shift"), str(rep)
    rep = run(NEAR_MISSES["shift_widens_output"][0])[-1]
    assert any("broadcast past" in x.reason for x in rep.misses if x.family == "norm_scale_shift"), str(rep)
    rep = run(NEAR_MISSES["scale_per_row"][0])[-1]
    assert [x.family for x in rep.misses] == [], str(rep)  # a per-row factor is no modulation: not a site


def test_rms_norm_of_two_tensors_says_so():
    """`(x + 1) * rsqrt(mean(x²) + eps)` normalises no tensor: the miss says what differs
    (before, only a variant of its own gave a reason; now the graph is read)."""
    rep = run(lambda m, h, x, s: (x + 1) * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))[-1]
    assert rep.matches().get("rms_norm", 0) == 0
    assert [x.reason for x in rep.misses if x.family == "rms_norm"] and all(
        "not one tensor normalised" in x.reason for x in rep.misses if x.family == "rms_norm"), str(rep)


def test_completions_leave_no_trace(monkeypatch):
    """Where nothing fuses, the identities put in for matching are taken out again: the
    graph Inductor compiles is the one the modulation families did not run on."""
    from collections import Counter

    from difffuse.fusion_pass import pass_manager

    graphs = []
    original = pass_manager.DifffusePass.__call__

    def recording(self, graph):
        original(self, graph)
        graphs.append(Counter(str(n.target) for n in graph.nodes if n.op == "call_function"))

    monkeypatch.setattr(pass_manager.DifffusePass, "__call__", recording)
    # a GELU-like scale-only product, a twice-read norm and a per-row factor: none fuses
    fn = lambda m, h, x, s: ((0.5 * x) * (1 + torch.tanh(x)),  # noqa: E731
                             (lambda n: (n * (1 + m.wide) + s[0], n * (2 + m.wide)))(m.ln(x)))
    for patterns in (["norm_scale_shift", "scale_shift"], ["linear_gelu"]):
        _, _, ref, out, rep = run(fn, options={"patterns": patterns})
        assert not rep.matches(), rep.variants()
        close(out, ref)
    assert graphs[0] == graphs[1] and "aten.full.default" not in graphs[0], graphs
