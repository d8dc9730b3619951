"""Tiny diffusers models from configs with random weights, and inputs for one step.

Each builder returns (model, kwargs) so that `model(**kwargs)` runs one denoising step.
Shapes are small enough for CPU compile tests; head_dim 12 keeps Wan's 3-axis rope.
"""
from __future__ import annotations

from typing import Callable

import torch

WAN_BASE = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4,
                out_channels=4, text_dim=16, freq_dim=16, ffn_dim=32, cross_attn_norm=True,
                qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=32)


def to_dtype(model, dtype):
    """Cast like diffusers' from_pretrained(torch_dtype=...): `_keep_in_fp32_modules` stay fp32."""
    from diffusers.utils import logging as dlogging

    level = dlogging.get_verbosity()
    dlogging.set_verbosity_error()  # .to(dtype) warns about the keep-in-fp32 modules we restore below
    try:
        model.to(dtype)
    finally:
        dlogging.set_verbosity(level)
    keep = getattr(model, "_keep_in_fp32_modules", None) or []
    if dtype != torch.float32:
        for name, module in model.named_modules():
            if any(k in name.split(".") for k in keep):
                module.to(torch.float32)
        for name, param in model.named_parameters():
            if any(k in name.split(".") for k in keep):
                param.data = param.data.float()
    return model.eval()


def wan_t2v(num_layers: int = 2, dtype=torch.float32, frames: int = 3, height: int = 8, width: int = 8,
            batch: int = 1, seed: int = 0):
    """Wan 2.1 text-to-video transformer."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    model = WanTransformer3DModel(num_layers=num_layers, **WAN_BASE).eval()
    to_dtype(model, dtype)
    kwargs = dict(hidden_states=torch.randn(batch, 4, frames, height, width, dtype=dtype),
                  timestep=torch.randint(0, 1000, (batch,)),
                  encoder_hidden_states=torch.randn(batch, 7, 16, dtype=dtype), return_dict=False)
    return model, kwargs


def wan_i2v(num_layers: int = 2, dtype=torch.float32, frames: int = 3, height: int = 8, width: int = 8,
            batch: int = 1, seed: int = 0):
    """Wan 2.1 image-to-video transformer: image cross-attention (added_kv_proj_dim).
    The attention splits image/text tokens at `shape[1] - 512`, so text has 512 tokens."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    cfg = dict(WAN_BASE, image_dim=20, added_kv_proj_dim=24, in_channels=8)
    model = WanTransformer3DModel(num_layers=num_layers, **cfg).eval()
    to_dtype(model, dtype)
    kwargs = dict(hidden_states=torch.randn(batch, 8, frames, height, width, dtype=dtype),
                  timestep=torch.randint(0, 1000, (batch,)),
                  encoder_hidden_states=torch.randn(batch, 512, 16, dtype=dtype),
                  encoder_hidden_states_image=torch.randn(batch, 5, 20, dtype=dtype), return_dict=False)
    return model, kwargs


def wan_ti2v(num_layers: int = 2, dtype=torch.float32, frames: int = 3, height: int = 8, width: int = 8,
             batch: int = 1, seed: int = 0):
    """Wan 2.2 TI2V: per-token timesteps, so the modulation is per token ([B, L, 6, D])."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    model = WanTransformer3DModel(num_layers=num_layers, **WAN_BASE).eval()
    to_dtype(model, dtype)
    seq = frames * (height // 2) * (width // 2)
    kwargs = dict(hidden_states=torch.randn(batch, 4, frames, height, width, dtype=dtype),
                  timestep=torch.randint(0, 1000, (batch, seq)),
                  encoder_hidden_states=torch.randn(batch, 7, 16, dtype=dtype), return_dict=False)
    return model, kwargs


def wan_df(num_layers: int = 2, dtype=torch.float32, frames: int = 3, height: int = 8, width: int = 8,
           batch: int = 1, seed: int = 0):
    """Wan with per-frame modulation: SkyReels-V2 diffusion forcing (diffusers'
    `SkyReelsV2Transformer3DModel`, called as its diffusion-forcing pipeline calls it:
    `enable_diffusion_forcing=True`, one timestep per latent frame `[B, F]`, `fps`).
    The per-frame modulation is repeated over each frame's tokens to `[B, 6, L, D]`; the
    DF checkpoints set `inject_sample_info` (an fps embedding added to the modulation)."""
    from diffusers import SkyReelsV2Transformer3DModel

    torch.manual_seed(seed)
    model = SkyReelsV2Transformer3DModel(num_layers=num_layers, inject_sample_info=True, **WAN_BASE).eval()
    to_dtype(model, dtype)
    # the pipeline's own fps_embeds: [0 if fps == 16 else 1] * batch (a list, turned into a tensor inside)
    kwargs = dict(hidden_states=torch.randn(batch, 4, frames, height, width, dtype=dtype),
                  timestep=torch.randint(0, 1000, (batch, frames)),
                  encoder_hidden_states=torch.randn(batch, 7, 16, dtype=dtype),
                  enable_diffusion_forcing=True, fps=[1] * batch, return_dict=False)
    return model, kwargs


MODELS: dict[str, Callable] = {
    "wan-t2v-tiny": wan_t2v,
    "wan-i2v-tiny": wan_i2v,
    "wan-ti2v-tiny": wan_ti2v,
    "wan-df-tiny": wan_df,
}
