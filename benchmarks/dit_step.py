"""One denoising step of a non-Wan DiT (random weights, bf16, realistic widths and token
counts, fewer blocks than the real model): eager vs Inductor regional (with and without
attention routed by hand) vs difffuse regional (without and with attention routing), modes
alternated. Same protocol, modes (`benchmarks/harness.py`) and columns as wan_step.

    python -m benchmarks.dit_step --model flux|qwen-image|hunyuan-video|ltx-video|cogvideox
                                  [--layers N] [--rounds 3] [--steps 3] [--csv PATH]
"""
from __future__ import annotations

import argparse

import torch
from torch import nn

from benchmarks import harness

BF = torch.bfloat16


def _randn(*shape):
    return torch.randn(*shape, device="cuda", dtype=BF)


def flux(layers):
    """Flux.1-dev widths, 1024x1024 (4096 image tokens), 512 text tokens."""
    from diffusers import FluxTransformer2DModel

    m = FluxTransformer2DModel(in_channels=64, num_layers=layers, num_single_layers=2 * layers,
                               attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
                               pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56))
    ids = torch.zeros(64, 64, 3, device="cuda")
    ids[..., 1] = torch.arange(64, device="cuda")[:, None]
    ids[..., 2] = torch.arange(64, device="cuda")[None, :]
    kw = dict(hidden_states=_randn(1, 4096, 64), encoder_hidden_states=_randn(1, 512, 4096),
              pooled_projections=_randn(1, 768), timestep=torch.full((1,), 0.5, device="cuda", dtype=BF),
              guidance=torch.full((1,), 3.5, device="cuda", dtype=BF), img_ids=ids.reshape(-1, 3),
              txt_ids=torch.zeros(512, 3, device="cuda"), return_dict=False)
    return m, kw, 4096 + 512


def qwen_image(layers):
    """Qwen-Image widths, 1024x1024 (4096 image tokens), 256 text tokens."""
    from diffusers import QwenImageTransformer2DModel

    m = QwenImageTransformer2DModel(patch_size=2, in_channels=64, out_channels=16, num_layers=layers,
                                    attention_head_dim=128, num_attention_heads=24, joint_attention_dim=3584,
                                    axes_dims_rope=(16, 56, 56))
    kw = dict(hidden_states=_randn(1, 4096, 64), encoder_hidden_states=_randn(1, 256, 3584),
              encoder_hidden_states_mask=torch.ones(1, 256, device="cuda", dtype=torch.long),
              timestep=torch.full((1,), 0.5, device="cuda", dtype=BF), img_shapes=[[(1, 64, 64)]],
              return_dict=False)
    return m, kw, 4096 + 256


def hunyuan_video(layers):
    """HunyuanVideo widths, 544x960x33 frames (18360 video tokens), 256 text tokens."""
    from diffusers import HunyuanVideoTransformer3DModel

    m = HunyuanVideoTransformer3DModel(in_channels=16, out_channels=16, num_attention_heads=24,
                                       attention_head_dim=128, num_layers=layers, num_single_layers=2 * layers,
                                       num_refiner_layers=2, patch_size=2, patch_size_t=1, text_embed_dim=4096,
                                       pooled_projection_dim=768, rope_axes_dim=(16, 56, 56))
    kw = dict(hidden_states=_randn(1, 16, 9, 68, 120), timestep=torch.full((1,), 500, device="cuda"),
              encoder_hidden_states=_randn(1, 256, 4096),
              encoder_attention_mask=torch.ones(1, 256, device="cuda", dtype=torch.long),
              pooled_projections=_randn(1, 768), guidance=torch.full((1,), 6000.0, device="cuda", dtype=BF),
              return_dict=False)
    return m, kw, 18360 + 256


def ltx_video(layers):
    """LTX-Video widths, 768x512x121 frames (6144 video tokens), 128 text tokens."""
    from diffusers import LTXVideoTransformer3DModel

    m = LTXVideoTransformer3DModel(in_channels=128, out_channels=128, num_attention_heads=32, attention_head_dim=64,
                                   cross_attention_dim=2048, num_layers=layers, caption_channels=4096)
    kw = dict(hidden_states=_randn(1, 6144, 128), encoder_hidden_states=_randn(1, 128, 4096),
              timestep=torch.full((1,), 500, device="cuda"),
              encoder_attention_mask=torch.ones(1, 128, device="cuda", dtype=torch.long),
              num_frames=16, height=16, width=24, return_dict=False)
    return m, kw, 6144


def cogvideox(layers):
    """CogVideoX-5B widths with rope, 480x720x49 frames (17550 video tokens), 226 text tokens."""
    from diffusers import CogVideoXTransformer3DModel
    from diffusers.models.embeddings import get_3d_rotary_pos_embed

    m = CogVideoXTransformer3DModel(num_attention_heads=48, attention_head_dim=64, in_channels=16, out_channels=16,
                                    time_embed_dim=512, text_embed_dim=4096, num_layers=layers, sample_width=90,
                                    sample_height=60, sample_frames=49, patch_size=2, max_text_seq_length=226,
                                    use_rotary_positional_embeddings=True)
    cos, sin = get_3d_rotary_pos_embed(64, ((0, 0), (30, 45)), (30, 45), 13, device="cuda")
    kw = dict(hidden_states=_randn(1, 13, 16, 60, 90), encoder_hidden_states=_randn(1, 226, 4096),
              timestep=torch.full((1,), 500, device="cuda"), image_rotary_emb=(cos.to(BF), sin.to(BF)),
              return_dict=False)
    return m, kw, 17550 + 226


MODELS = {"flux": (flux, 4), "qwen-image": (qwen_image, 8), "hunyuan-video": (hunyuan_video, 4),
          "ltx-video": (ltx_video, 8), "cogvideox": (cogvideox, 8)}


def build(name, layers):
    from difffuse.testing.tiny_models import to_dtype

    fn, default = MODELS[name]
    prev = torch.get_default_dtype()
    torch.set_default_dtype(BF)
    try:
        with torch.device("cuda"):
            model, kwargs, tokens = fn(layers or default)
    finally:
        torch.set_default_dtype(prev)
    return to_dtype(model, BF), kwargs, tokens


def block_lists(model) -> dict:
    """The repeated-block ModuleLists (what compile_repeated_blocks compiles)."""
    names = set(getattr(model, "_repeated_blocks", ()) or ())  # CogVideoX declares none: every block list
    return {n: ml for n, ml in model.named_children()
            if isinstance(ml, nn.ModuleList) and len(ml) and (not names or type(ml[0]).__name__ in names)}


def use(model, lists):
    for n, ml in lists.items():
        setattr(model, n, ml)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", choices=list(MODELS), default="flux")
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--no-peer", action="store_true", help="skip the hand-routed Inductor mode")
    harness.add_csv_arg(ap)
    a = ap.parse_args()
    torch.manual_seed(0)
    model, kwargs, tokens = build(a.model, a.layers)
    eager = block_lists(model)
    specs = {m.name: m for m in harness.modes(peer=not a.no_peer)}
    modes = {name: {n: harness.compiled(ml, m) for n, ml in eager.items()} for name, m in specs.items()}
    print(harness.header())
    print(f"{a.model}: " + ", ".join(f"{len(ml)} {n}" for n, ml in eager.items()) + f", {tokens} tokens, bf16, "
          "regional compile")
    res = harness.alternate(model, kwargs, specs, lambda mode: use(model, modes[mode]), a.rounds, a.steps)
    rows = [{"model": a.model, **row} for row in harness.step_rows(res)]
    print()
    print(harness.table(rows, list(rows[0]), csv=a.csv))
    harness.print_top(res, 8)
    for mode in (m for m in modes if specs[m].backend == "difffuse"):
        d = res[mode]
        print(f"\n{mode} matches (per compiled block graph): {d.get('matches')}, "
              f"misses {sorted({r[:80] for r in d['reasons']})}, notes {d.get('notes')}")


if __name__ == "__main__":
    main()
