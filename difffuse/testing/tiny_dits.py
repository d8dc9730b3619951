"""Tiny diffusers DiTs beyond Wan (Flux, Qwen-Image, HunyuanVideo, LTX-Video, CogVideoX),
built from configs with random weights, with inputs for one denoising step.

Each builder returns (model, kwargs) so that `model(**kwargs)` runs one step. Widths are
small (2 heads of 16) but keep each model's structure: its rope axes, its norms and its
modulation; `num_layers` sets every block stack (double and single blocks alike).
"""
from __future__ import annotations

import torch

from .tiny_models import to_dtype

HEADS, HEAD_DIM = 2, 16


def _randn(*shape, dtype):
    return torch.randn(*shape, dtype=dtype)


def flux(num_layers: int = 2, dtype=torch.float32, height: int = 4, width: int = 4, text: int = 5,
         batch: int = 1, seed: int = 0):
    """Flux.1 (dev): double-stream blocks with joint attention, single-stream blocks,
    per-head RMSNorm of q/k for both streams, 3-axis interleaved rope on text+image tokens."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    model = FluxTransformer2DModel(
        patch_size=1, in_channels=8, num_layers=num_layers, num_single_layers=num_layers,
        attention_head_dim=HEAD_DIM, num_attention_heads=HEADS, joint_attention_dim=24,
        pooled_projection_dim=12, guidance_embeds=True, axes_dims_rope=(4, 6, 6)).eval()
    to_dtype(model, dtype)
    ids = torch.zeros(height, width, 3)
    ids[..., 1] = torch.arange(height)[:, None]
    ids[..., 2] = torch.arange(width)[None, :]
    kwargs = dict(hidden_states=_randn(batch, height * width, 8, dtype=dtype),
                  encoder_hidden_states=_randn(batch, text, 24, dtype=dtype),
                  pooled_projections=_randn(batch, 12, dtype=dtype),
                  timestep=torch.rand(batch, dtype=dtype), guidance=torch.full((batch,), 3.5, dtype=dtype),
                  img_ids=ids.reshape(-1, 3).to(dtype), txt_ids=torch.zeros(text, 3, dtype=dtype),
                  return_dict=False)
    return model, kwargs


def qwen_image(num_layers: int = 2, dtype=torch.float32, height: int = 4, width: int = 4, text: int = 5,
               batch: int = 1, seed: int = 0):
    """Qwen-Image: dual-stream MMDiT, per-head RMSNorm of q/k per stream, complex rope."""
    from diffusers import QwenImageTransformer2DModel

    torch.manual_seed(seed)
    model = QwenImageTransformer2DModel(
        patch_size=2, in_channels=8, out_channels=2, num_layers=num_layers, attention_head_dim=HEAD_DIM,
        num_attention_heads=HEADS, joint_attention_dim=24, axes_dims_rope=(4, 6, 6)).eval()
    to_dtype(model, dtype)
    kwargs = dict(hidden_states=_randn(batch, height * width, 8, dtype=dtype),
                  encoder_hidden_states=_randn(batch, text, 24, dtype=dtype),
                  encoder_hidden_states_mask=torch.ones(batch, text, dtype=torch.long),
                  timestep=torch.rand(batch, dtype=dtype), img_shapes=[[(1, height, width)]] * batch,
                  return_dict=False)
    return model, kwargs


def hunyuan_video(num_layers: int = 2, dtype=torch.float32, frames: int = 2, height: int = 4, width: int = 4,
                  text: int = 5, batch: int = 1, seed: int = 0):
    """HunyuanVideo: token refiner, dual- then single-stream blocks, per-head RMSNorm of q/k,
    3-axis rope applied to the image tokens only."""
    from diffusers import HunyuanVideoTransformer3DModel

    torch.manual_seed(seed)
    model = HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=HEADS, attention_head_dim=HEAD_DIM,
        num_layers=num_layers, num_single_layers=num_layers, num_refiner_layers=1, patch_size=2,
        patch_size_t=1, text_embed_dim=24, pooled_projection_dim=12, rope_axes_dim=(4, 6, 6)).eval()
    to_dtype(model, dtype)
    kwargs = dict(hidden_states=_randn(batch, 4, frames, height * 2, width * 2, dtype=dtype),
                  timestep=torch.randint(0, 1000, (batch,)),
                  encoder_hidden_states=_randn(batch, text, 24, dtype=dtype),
                  encoder_attention_mask=torch.ones(batch, text, dtype=torch.long),
                  pooled_projections=_randn(batch, 12, dtype=dtype),
                  guidance=torch.full((batch,), 6000.0, dtype=dtype), return_dict=False)
    return model, kwargs


def ltx_video(num_layers: int = 2, dtype=torch.float32, frames: int = 2, height: int = 4, width: int = 4,
              text: int = 5, batch: int = 1, seed: int = 0):
    """LTX-Video: RMSNorm of q/k across heads, 3-axis neox-style (split-half) rope, AdaLN
    single with scale/shift tables, non-affine RMSNorm before the modulation."""
    from diffusers import LTXVideoTransformer3DModel

    torch.manual_seed(seed)
    dim = HEADS * HEAD_DIM
    model = LTXVideoTransformer3DModel(
        in_channels=8, out_channels=8, num_attention_heads=HEADS, attention_head_dim=HEAD_DIM,
        cross_attention_dim=dim, num_layers=num_layers, caption_channels=24).eval()
    to_dtype(model, dtype)
    kwargs = dict(hidden_states=_randn(batch, frames * height * width, 8, dtype=dtype),
                  encoder_hidden_states=_randn(batch, text, 24, dtype=dtype),
                  timestep=torch.randint(0, 1000, (batch,)),
                  encoder_attention_mask=torch.ones(batch, text, dtype=torch.long),
                  num_frames=frames, height=height, width=width, return_dict=False)
    return model, kwargs


def cogvideox(num_layers: int = 2, dtype=torch.float32, frames: int = 2, height: int = 4, width: int = 4,
              text: int = 5, batch: int = 1, seed: int = 0):
    """CogVideoX 1.5-style: LayerNorm of q/k per head, rope on the video tokens only
    (passed in, as the pipeline does), LayerNorm-zero modulation of both streams."""
    from diffusers import CogVideoXTransformer3DModel
    from diffusers.models.embeddings import get_3d_rotary_pos_embed

    torch.manual_seed(seed)
    model = CogVideoXTransformer3DModel(
        num_attention_heads=HEADS, attention_head_dim=HEAD_DIM, in_channels=4, out_channels=4,
        time_embed_dim=16, text_embed_dim=24, num_layers=num_layers, sample_width=width * 2,
        sample_height=height * 2, sample_frames=frames, patch_size=2, max_text_seq_length=text,
        use_rotary_positional_embeddings=True).eval()
    to_dtype(model, dtype)
    cos, sin = get_3d_rotary_pos_embed(HEAD_DIM, ((0, 0), (height, width)), (height, width), frames)
    kwargs = dict(hidden_states=_randn(batch, frames, 4, height * 2, width * 2, dtype=dtype),
                  encoder_hidden_states=_randn(batch, text, 24, dtype=dtype),
                  timestep=torch.randint(0, 1000, (batch,)),
                  image_rotary_emb=(cos.to(dtype), sin.to(dtype)), return_dict=False)
    return model, kwargs


DITS = {
    "flux-tiny": flux,
    "qwen-image-tiny": qwen_image,
    "hunyuan-video-tiny": hunyuan_video,
    "ltx-video-tiny": ltx_video,
    "cogvideox-tiny": cogvideox,
}
