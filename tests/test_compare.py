"""`python -m difffuse compare`: the metrics on known inputs, the tiny-model loop (difffuse's
reference lowering against eager, and a lossy option set), a tiny pipeline's frames, the CLI."""
from __future__ import annotations

import math
import sys

import pytest
import torch

from difffuse.compare import CompareError, OptionSet, compare, quantize
from difffuse.compare_metrics import cosine, frame_metrics, psnr, rel_err, ssim

pytest.importorskip("diffusers")


def _frame(seed=0, h=48, w=40, c=3):
    return torch.rand(h, w, c, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_rel_err_and_cosine_known_values():
    ref = torch.tensor([3.0, 4.0])
    assert rel_err(ref, ref) == 0 and cosine(ref, ref) == pytest.approx(1.0, abs=1e-15)
    assert rel_err(torch.tensor([3.0, 4.5]), ref) == pytest.approx(0.1)  # |(0, .5)| / 5
    assert cosine(torch.tensor([-4.0, 3.0]), ref) == pytest.approx(0.0, abs=1e-15)
    assert cosine(-ref, ref) == pytest.approx(-1.0)
    assert rel_err(torch.zeros(2), torch.zeros(2)) == 0 and math.isinf(rel_err(ref, torch.zeros(2)))


def test_identical_frames_ssim_one_psnr_inf():
    f = _frame()
    assert math.isinf(psnr(f, f)) and ssim(f, f) == pytest.approx(1.0, abs=1e-12)
    m = frame_metrics(torch.stack([f, f]), torch.stack([f, f]))
    assert m["count"] == 2 and math.isinf(m["psnr_min"]) and m["ssim_min"] == pytest.approx(1.0, abs=1e-12)


def test_psnr_known_noise_levels():
    f = _frame() * 0.8  # in [0, 0.8]: no clipping below
    assert psnr(f + 0.1, f) == pytest.approx(20.0, abs=1e-9)  # MSE 0.01 exactly
    assert psnr((f + 0.1) * 255, f * 255, data_range=255.0) == pytest.approx(20.0, abs=1e-9)
    big = _frame(1, 256, 256)
    noise = 0.01 * torch.randn(big.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    assert psnr(big + noise, big) == pytest.approx(40.0, abs=0.05)  # 20·log10(1/σ), σ = 0.01


def test_ssim_known_values():
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    a, b = torch.full((20, 20), 0.3, dtype=torch.float64), torch.full((20, 20), 0.7, dtype=torch.float64)
    # flat frames: no variance, so SSIM is the luminance term alone
    assert ssim(a, b) == pytest.approx((2 * 0.3 * 0.7 + c1) / (0.3 ** 2 + 0.7 ** 2 + c1), rel=1e-12)
    f, g = _frame(3, 16, 16, 1)[..., 0], _frame(4, 16, 16, 1)[..., 0]
    # against a direct evaluation of every 11 x 11 window (Gaussian weights, sigma 1.5)
    r = torch.arange(11, dtype=torch.float64) - 5
    w1 = torch.exp(-r ** 2 / (2 * 1.5 ** 2))
    w = torch.outer(w1, w1) / w1.sum() ** 2
    vals = []
    for i in range(16 - 10):
        for j in range(16 - 10):
            x, y = f[i:i + 11, j:j + 11], g[i:i + 11, j:j + 11]
            mx, my = (w * x).sum(), (w * y).sum()
            vx, vy = (w * x * x).sum() - mx ** 2, (w * y * y).sum() - my ** 2
            cxy = (w * x * y).sum() - mx * my
            vals.append(((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2)))
    assert ssim(f, g) == pytest.approx(float(torch.stack(vals).mean()), rel=1e-10)
    big = _frame(5, 64, 64)
    noisy = [big + s * torch.randn(big.shape, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
             for s in (0.01, 0.05, 0.2)]
    scores = [ssim(n, big) for n in noisy]
    assert 1 > scores[0] > scores[1] > scores[2] > 0
    assert ssim(noisy[1], big) == pytest.approx(ssim(big, noisy[1]), rel=1e-12)  # symmetric


@pytest.fixture(scope="module")
def tiny_reference():
    """wan-t2v-tiny, 3 steps: eager against difffuse's reference lowering (one compile)."""
    return compare(OptionSet(), OptionSet("difffuse"), model="wan-t2v-tiny", steps=3, device="cpu", layers=1)


@pytest.mark.slow  # one compile of a 1-block Wan transformer (10-50 s on a CPU)
def test_tiny_model_eager_vs_difffuse_reference(tiny_reference):
    r = tiny_reference
    assert r["b"].options == {"lowering": "reference"}  # on CPU, not "auto" (which rewrites nothing)
    assert len(r["steps"]) == 3
    for s in r["steps"]:
        assert 0 < s["latent_rel_err"] < 1e-5 and s["out_rel_err"] < 1e-5  # fp32 rounding, not 0: ops differ
        assert s["latent_cos"] > 1 - 1e-10 and s["out_cos"] > 1 - 1e-10


def test_tiny_model_lossy_option_set_is_measured():
    r = compare(OptionSet(dtype="float32"), OptionSet(dtype="bfloat16"), model="wan-t2v-tiny", steps=3,
                device="cpu", layers=1)
    last = r["steps"][-1]
    assert 1e-3 < last["latent_rel_err"] < 0.2 and 0.98 < last["latent_cos"] < 1 - 1e-7
    assert last["out_rel_err"] > 1e-3


@pytest.mark.parametrize("name", ["wan-i2v-tiny", "flux-tiny"])
def test_tiny_models_with_condition_channels_or_float_timesteps(name):
    # I2V reads cat([latent, image condition]); Flux takes a float timestep in [0, 1]
    r = compare(OptionSet(), OptionSet(), model=name, steps=2, device="cpu", layers=1)
    assert [s["latent_rel_err"] for s in r["steps"]] == [0.0, 0.0]


def test_tiny_pipeline_frames():
    call = dict(height=32, width=32, num_frames=5)
    same = compare(OptionSet(), OptionSet(), pipeline="t2v", steps=2, device="cpu", call=call)
    assert [s["latent_rel_err"] for s in same["steps"]] == [0.0, 0.0]
    f = same["frames"]
    assert f["count"] == 5 and (f["height"], f["width"]) == (32, 32)
    assert math.isinf(f["psnr_min"]) and f["ssim_min"] == pytest.approx(1.0, abs=1e-12)
    lossy = compare(OptionSet(), OptionSet(dtype="bfloat16"), pipeline="t2v", steps=2, device="cpu", call=call)
    assert lossy["steps"][-1]["latent_rel_err"] > 1e-4
    assert math.isfinite(lossy["frames"]["psnr_min"]) and lossy["frames"]["ssim_min"] <= 1.0


def test_quantisation_without_torchao_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchao", None)  # import torchao raises ImportError
    monkeypatch.setitem(sys.modules, "torchao.quantization", None)
    with pytest.raises(CompareError, match=r"needs torchao.*pip install torchao"):
        quantize(torch.nn.Linear(16, 16), "torchao-fp8-row")
    with pytest.raises(CompareError, match="quantisation 'int3'"):
        OptionSet(quant="int3").resolved("cpu")


def test_cli_prints_the_table(capsys, monkeypatch):
    from difffuse.__main__ import main

    assert main(["compare", "--model", "wan-t2v-tiny", "--layers", "1", "--steps", "2",
                 "--b-backend", "none", "--b-dtype", "bfloat16"]) == 0
    out = capsys.readouterr().out
    assert "A (reference): eager, float32" in out and "B:             eager, bfloat16" in out
    assert "latent rel err" in out and len([ln for ln in out.splitlines() if ln.strip().startswith("1 ")]) == 1
    assert main(["compare", "--b-options", "{lowering: 1}"]) == 2
    assert "--b-options: not JSON" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "torchao", None)
    monkeypatch.setitem(sys.modules, "torchao.quantization", None)
    assert main(["compare", "--layers", "1", "--steps", "1", "--b-backend", "none",
                 "--b-quant", "torchao-fp8-row"]) == 2
    assert "needs torchao" in capsys.readouterr().err
