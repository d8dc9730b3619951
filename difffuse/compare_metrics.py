"""The numbers `python -m difffuse compare` prints, with no downloaded weights: relative
error and cosine of two tensors, PSNR and SSIM of two frames (float64 throughout).

SSIM is Wang et al. 2004: a Gaussian window (11 taps, sigma 1.5; a frame smaller than 11
pixels gets the largest odd window that fits), K1 = 0.01, K2 = 0.03, population statistics,
the window's "valid" positions only, averaged over positions and channels. That equals
scikit-image's `structural_similarity(..., gaussian_weights=True, sigma=1.5,
use_sample_covariance=False, data_range=...)`.
"""
from __future__ import annotations

import math

import torch


def _flat(t) -> torch.Tensor:
    return torch.as_tensor(t).detach().reshape(-1).to("cpu", torch.float64)


def rel_err(x, ref) -> float:
    """‖x − ref‖ / ‖ref‖ (0 when both are zero, inf when only ref is)."""
    x, ref = _flat(x), _flat(ref)
    num, den = float(torch.linalg.vector_norm(x - ref)), float(torch.linalg.vector_norm(ref))
    return num / den if den else (0.0 if num == 0 else math.inf)


def cosine(x, ref) -> float:
    """Cosine similarity of the flattened tensors (1.0 for two zero tensors)."""
    x, ref = _flat(x), _flat(ref)
    nx, nr = float(torch.linalg.vector_norm(x)), float(torch.linalg.vector_norm(ref))
    if nx == 0 or nr == 0:
        return 1.0 if nx == nr else 0.0
    return float(x @ ref) / (nx * nr)


def psnr(x, ref, data_range: float = 1.0) -> float:
    """10·log10(data_range² / MSE) in dB; inf for identical frames. data_range is the peak
    value: 1.0 for frames in [0, 1] (diffusers' output_type="np"), 255 for uint8 frames."""
    mse = float(((_flat(x) - _flat(ref)) ** 2).mean())
    return math.inf if mse == 0 else 10.0 * math.log10(data_range ** 2 / mse)


def _gauss(win: int, sigma: float) -> torch.Tensor:
    r = torch.arange(win, dtype=torch.float64) - (win - 1) / 2
    g = torch.exp(-(r ** 2) / (2 * sigma ** 2))
    return g / g.sum()


def ssim(x, ref, data_range: float = 1.0, win: int = 11, sigma: float = 1.5) -> float:
    """SSIM of one frame, H x W or H x W x C (channels last), against ref."""
    x, ref = (torch.as_tensor(t).detach().to("cpu", torch.float64) for t in (x, ref))
    if x.shape != ref.shape or x.dim() not in (2, 3):
        raise ValueError(f"ssim: frames must have the same H x W[ x C] shape, got {tuple(x.shape)} "
                         f"and {tuple(ref.shape)}")
    if x.dim() == 2:
        x, ref = x[..., None], ref[..., None]
    h, w = x.shape[:2]
    win = min(win, h, w)
    win -= 1 - win % 2  # odd
    g = _gauss(win, sigma)
    kh, kw = g.view(1, 1, win, 1), g.view(1, 1, 1, win)

    def filt(t):  # [C, 1, H, W] -> valid Gaussian-weighted means
        return torch.nn.functional.conv2d(torch.nn.functional.conv2d(t, kh), kw)

    a, b = x.permute(2, 0, 1)[:, None], ref.permute(2, 0, 1)[:, None]
    mu_a, mu_b = filt(a), filt(b)
    var_a = filt(a * a) - mu_a ** 2
    var_b = filt(b * b) - mu_b ** 2
    cov = filt(a * b) - mu_a * mu_b
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    return float(s.mean())


def frame_metrics(frames, ref, data_range: float = 1.0) -> dict:
    """Per-frame PSNR and SSIM of frames (F x H x W x C) against ref, with mean and worst."""
    frames, ref = torch.as_tensor(frames), torch.as_tensor(ref)
    if frames.shape != ref.shape:
        raise ValueError(f"frames {tuple(frames.shape)} and reference {tuple(ref.shape)} differ in shape")
    p = [psnr(f, r, data_range) for f, r in zip(frames, ref)]
    s = [ssim(f, r, data_range) for f, r in zip(frames, ref)]
    return {"count": len(p), "height": int(frames.shape[1]), "width": int(frames.shape[2]),
            "psnr": p, "ssim": s, "psnr_mean": sum(p) / len(p), "psnr_min": min(p),
            "ssim_mean": sum(s) / len(s), "ssim_min": min(s)}
