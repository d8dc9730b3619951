"""Tiny diffusers Wan pipelines from configs (random weights, no downloads): T2V, I2V, TI2V.

Text encoders are left out: the pipelines are called with `prompt_embeds`
(and `negative_prompt_embeds` for classifier-free guidance); `call` runs one that way.
"""
from __future__ import annotations

import torch

TEXT_DIM = 32
LAYERS = 2  # transformer blocks of every tiny pipeline


def _transformer(in_channels=16, out_channels=16, **extra):
    from diffusers import WanTransformer3DModel

    cfg = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=in_channels,
               out_channels=out_channels, text_dim=TEXT_DIM, freq_dim=32, ffn_dim=64, num_layers=LAYERS,
               cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=64)
    cfg.update(extra)
    return WanTransformer3DModel(**cfg).eval()


def _vae(z_dim=16, **extra):
    from diffusers import AutoencoderKLWan

    cfg = dict(base_dim=3, z_dim=z_dim, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
               temperal_downsample=[False, True, True])
    cfg.update(extra)
    if z_dim != 16:
        cfg.update(latents_mean=[0.0] * z_dim, latents_std=[1.0] * z_dim)
    return AutoencoderKLWan(**cfg).eval()


def _scheduler():
    from diffusers import UniPCMultistepScheduler

    return UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)


def wan_t2v_pipeline(seed: int = 0):
    """WanPipeline (Wan 2.1 T2V) with a tiny transformer and VAE."""
    from diffusers import WanPipeline

    torch.manual_seed(seed)
    return WanPipeline(tokenizer=None, text_encoder=None, vae=_vae(), scheduler=_scheduler(),
                       transformer=_transformer())


def wan_ti2v_pipeline(seed: int = 0):
    """WanPipeline with expand_timesteps=True (Wan 2.2 TI2V): per-token timesteps, 48-ch VAE."""
    from diffusers import WanPipeline

    torch.manual_seed(seed)
    vae = _vae(z_dim=48, is_residual=True, patch_size=2, scale_factor_spatial=16, in_channels=12,
               out_channels=12, decoder_base_dim=4)
    return WanPipeline(tokenizer=None, text_encoder=None, vae=vae, scheduler=_scheduler(),
                       transformer=_transformer(in_channels=48, out_channels=48), expand_timesteps=True)


def wan_i2v_pipeline(seed: int = 0):
    """WanImageToVideoPipeline (Wan 2.1 I2V): tiny CLIP vision encoder + image cross-attention."""
    from diffusers import WanImageToVideoPipeline
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    try:  # transformers >= 5 without torchvision: the PIL processor, without a warning
        from transformers import CLIPImageProcessorPil as CLIPImageProcessor
    except ImportError:
        from transformers import CLIPImageProcessor

    torch.manual_seed(seed)
    enc = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=16, projection_dim=16, num_hidden_layers=2, num_attention_heads=2, image_size=32,
        intermediate_size=32, patch_size=8)).eval()
    proc = CLIPImageProcessor(crop_size=32, size={"shortest_edge": 32})
    transformer = _transformer(in_channels=36, out_channels=16, image_dim=16, added_kv_proj_dim=TEXT_DIM)
    return WanImageToVideoPipeline(tokenizer=None, text_encoder=None, vae=_vae(), scheduler=_scheduler(),
                                   transformer=transformer, image_encoder=enc, image_processor=proc)


def prompt_embeds(batch: int = 1, tokens: int = 512, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, tokens, TEXT_DIM, generator=g), torch.randn(batch, tokens, TEXT_DIM, generator=g)


def call(pipe, kind: str, h: int = 32, w: int = 32, frames: int = 9, steps: int = 2, device="cpu",
         guidance: float = 5.0):
    """Run a tiny pipeline of `kind` ("t2v", "i2v", "ti2v") under no_grad with the random
    prompt embeddings (I2V: a random 32x32 image), seeded; returns the first video's frames
    as a numpy array."""
    pe, ne = (t.to(device) for t in prompt_embeds())
    kw = dict(prompt_embeds=pe, negative_prompt_embeds=ne, height=h, width=w, num_frames=frames,
              num_inference_steps=steps, guidance_scale=guidance, output_type="np",
              generator=torch.Generator().manual_seed(0))
    if kind == "i2v":
        import numpy as np
        from PIL import Image

        kw["image"] = Image.fromarray((np.random.default_rng(0).random((h, w, 3)) * 255).astype("uint8"))
    with torch.no_grad():
        return pipe(**kw).frames[0]


def to_dtype_pipeline(pipe, dtype):
    """The transformer in `dtype` with diffusers' fp32 keep-modules; the VAE stays fp32."""
    from .tiny_models import to_dtype

    to_dtype(pipe.transformer, dtype)
    return pipe


PIPELINES = {"t2v": wan_t2v_pipeline, "i2v": wan_i2v_pipeline, "ti2v": wan_ti2v_pipeline}
# the tiny model (difffuse.testing.tiny_models / expected) whose structure each pipeline's transformer has
MODEL_OF = {"t2v": "wan-t2v-tiny", "i2v": "wan-i2v-tiny", "ti2v": "wan-ti2v-tiny"}
