"""The CUDA attention lowering's choice and eligibility, on CPU (no kernel runs here):
each kernel's limits from the typed site, the layout rule (no copies), the preference and
the `attention_kernel` option, the missing-library warning, the op's fake."""
from __future__ import annotations

import dataclasses
import logging

import pytest
import torch

import difffuse.lowering.ops  # noqa: F401  (defines difffuse::attention)
from difffuse.fusion_pass.config import parse_options
from difffuse.lowering import attention_kernel
from difffuse.lowering import flash_attention as fa
from difffuse.lowering.sites import AttentionSite, TensorSpec


def spec(shape, stride=None, dtype=torch.bfloat16, device="cuda:0") -> TensorSpec:
    t = torch.empty(shape, device="meta", dtype=dtype)
    s = TensorSpec.of(t)
    return TensorSpec(s.shape, tuple(stride) if stride else s.stride, dtype, device, False)


def blhd(b, l, h, d, **kw) -> TensorSpec:
    """A [B, H, L, D] view of [B, L, H, D] memory (what diffusers hands SDPA)."""
    return spec((b, h, l, d), stride=(l * h * d, d, h * d, 1), **kw)


def site(d=128, dv=None, l=4096, lkv=None, causal=False, **kw) -> AttentionSite:
    dv = dv or d
    lkv = lkv or l
    return AttentionSite(blhd(1, l, 4, d, **kw), blhd(1, lkv, 4, d, **kw), blhd(1, lkv, 4, dv, **kw), None, causal,
                         True)


@pytest.fixture
def gpu(monkeypatch):
    """A pretend SM90 device with both kernels installed and passing their probe; returns
    a dict to change the arch and which kernels import."""
    state = {"major": 9, "missing": set()}
    monkeypatch.setattr(fa, "_major", lambda device: state["major"])
    monkeypatch.setattr(fa, "_import_reason",
                        lambda name: f"{name} is not importable" if name in state["missing"] else None)
    monkeypatch.setattr(fa, "_probe", lambda *a: None)
    monkeypatch.setattr(fa, "_warned_none", False)
    return state


def test_wan_site_goes_to_the_preferred_kernel(gpu):
    assert fa.choose(site()) == (fa.order(9, site())[0], None)
    for name in ("fa3", "fa4"):
        with attention_kernel(name):
            assert fa.choose(site()) == (name, None)


def test_short_keys_on_sm90(gpu):
    """Few keys (Wan's 512 text tokens): FA4's SM90 kernel measured slower than cuDNN, so
    only FA3 is tried; without it the call stays on cuDNN, saying why. An explicit
    attention_kernel="fa4" is honoured."""
    cross = site(l=4096, lkv=512)
    assert fa.choose(cross) == ("fa3", None)
    gpu["missing"] = {"fa3"}
    name, reason = fa.choose(cross)
    assert name is None and "fa4: measured slower than cuDNN with 512 keys on SM9x" in reason
    with attention_kernel("fa4"):
        assert fa.choose(cross) == ("fa4", None)
    assert fa.choose(site(l=4096, lkv=fa.SHORT_KV)) == ("fa4", None)


def test_sm100_takes_fa4_only(gpu):
    gpu["major"] = 10
    with attention_kernel("fa3"):
        name, reason = fa.choose(site())
    assert name is None and "SM9x, not SM10x" in reason
    assert fa.choose(site()) == ("fa4", None)
    assert fa.choose(site(d=256)) == ("fa4", None)
    name, reason = fa.choose(site(d=160))
    assert name is None and "outside FA4's SM100 limits" in reason


@pytest.mark.parametrize("major", [8, 12])
def test_other_arches_stay_on_sdpa(gpu, major):
    gpu["major"] = major
    name, reason = fa.choose(site())
    assert name is None and "not SM" in reason and reason.endswith("(left on SDPA)")


@pytest.mark.parametrize("d, dv, fa4_ok, fa3_ok", [(128, 128, True, True), (64, 64, True, True),
                                                   (256, 256, True, True), (264, 264, False, False),
                                                   (128, 64, True, False), (4, 4, False, False)])
def test_head_dim_limits(gpu, d, dv, fa4_ok, fa3_ok):
    for name, ok in (("fa4", fa4_ok), ("fa3", fa3_ok)):
        with attention_kernel(name):
            got, reason = fa.choose(site(d=d, dv=dv))
        assert (got == name) == ok, reason


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_other_dtypes_stay(gpu, dtype):
    name, reason = fa.choose(site(dtype=dtype))
    assert name is None and "fp16/bf16" in reason


def test_cpu_tensors_stay(gpu):
    name, reason = fa.choose(site(device="cpu"))
    assert name is None and "need CUDA tensors" in reason


@pytest.mark.parametrize("stride, ok", [
    ((4096 * 4 * 128, 128, 4 * 128, 1), True),  # [B, L, H, D] memory, the common case
    ((4 * 4096 * 128, 4096 * 128, 128, 1), True),  # contiguous [B, H, L, D]
    ((4096 * 4 * 128, 128, 4 * 128 + 4, 1), False),  # an L stride of 8 bytes mod 16: would be copied
    ((4096 * 4 * 128, 1, 4, 4 * 4096), False),  # D not innermost
])
def test_layout_rule_no_copies(gpu, stride, ok):
    q = spec((1, 4, 4096, 128), stride=stride)
    s = AttentionSite(q, q, q, None, False, True)
    name, reason = fa.choose(s)
    assert (name is not None) == ok, reason
    if not ok:
        assert "would copy it" in reason


def test_missing_libraries_warn_once_and_stay(gpu, caplog):
    gpu["missing"] = {"fa3", "fa4"}
    with caplog.at_level(logging.WARNING, logger="difffuse"):
        for _ in range(3):
            name, reason = fa.choose(site())
            assert name is None and "not importable" in reason
    warnings = [r for r in caplog.records if "no FlashAttention kernel is installed" in r.getMessage()]
    assert len(warnings) == 1 and "difffuse[cuda]" in warnings[0].getMessage()


def test_one_missing_library_falls_to_the_other(gpu):
    gpu["missing"] = {"fa3"}
    assert fa.choose(site()) == ("fa4", None)
    gpu["missing"] = {"fa4"}
    assert fa.choose(site()) == ("fa3", None)


def test_failed_probe_is_a_reason(gpu, monkeypatch):
    monkeypatch.setattr(fa, "_probe", lambda name, *a: "FlashAttention-3 failed its probe run (x)"
                        if name == "fa3" else None)
    with attention_kernel("fa3"):
        name, reason = fa.choose(site())
    assert name is None and "failed its probe" in reason
    assert fa.choose(site()) == ("fa4", None)


def test_option_validated_and_keyed(monkeypatch):
    monkeypatch.delenv("DIFFFUSE_ATTENTION_KERNEL", raising=False)
    assert parse_options({}).attention_kernel == "auto"
    cfg = parse_options({"attention_kernel": "fa3"})
    assert cfg.attention_kernel == "fa3" and "attention_kernel=fa3" in cfg.key()
    with pytest.raises(ValueError, match="attention_kernel"):
        parse_options({"attention_kernel": "fa9"})
    monkeypatch.setenv("DIFFFUSE_ATTENTION_KERNEL", "fa4")
    assert parse_options({"attention_kernel": "fa3"}).attention_kernel == "fa4"


def test_flash_op_fake_matches_the_reference_contract():
    """difffuse::flash_attention's fake gives what difffuse::attention's does: out
    [B, H, Lq, Dv] over [B, Lq, H, Dv] memory in q's dtype, lse fp32 [B, H, Lq]."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        q = torch.empty(2, 6, 3, 16, dtype=torch.bfloat16).transpose(1, 2)
        k = torch.empty(2, 5, 3, 16, dtype=torch.bfloat16).transpose(1, 2)
        v = torch.empty(2, 5, 3, 8, dtype=torch.bfloat16).transpose(1, 2)
        got = torch.ops.difffuse.flash_attention(q, k, v, None, False, "fa4")
        want = torch.ops.difffuse.attention(q, k, v, None, False)
    for g, w in zip(got, want):
        assert (g.shape, g.stride(), g.dtype) == (w.shape, w.stride(), w.dtype)


def test_dynamic_shapes_specialize_head_dims_only(gpu):
    """dynamic=True makes every dim symbolic: the head dims are specialized (a guard), so
    the limits and the layout rule are decided; batch, heads and lengths stay symbolic."""
    from torch.fx.experimental.proxy_tensor import make_fx

    seen = []

    def f(mem):
        q = mem.transpose(1, 2)
        s = AttentionSite(*(dataclasses.replace(TensorSpec.of(q), device="cuda"),) * 3, None, False, False)
        seen.append((s, fa.choose(s)))
        return q * 2

    gm = make_fx(f, tracing_mode="symbolic")(torch.empty(2, 4096, 12, 128, dtype=torch.bfloat16))
    (s, (name, reason)), = seen
    assert name is not None, reason
    assert all(not isinstance(x, int) for x in s.q.shape[:3])  # B, H, L symbolic
    env = gm.shape_env
    assert any("128" in str(g.expr) for g in env.guards), env.guards  # D == 128 guarded


def test_report_note_names_the_flash_kernel():
    from difffuse.fusion_pass.pass_manager import kernel_note

    g = torch.fx.Graph()
    q, k, v = (g.placeholder(n) for n in "qkv")
    n = g.call_function(torch.ops.difffuse.flash_attention.default, (q, k, v, None, False, "fa4"))
    n.meta["difffuse_replacement"] = ("attention", "x")
    g.output(n)
    assert kernel_note(g) == "kernels: attention -> difffuse::flash_attention[fa4] x1"
