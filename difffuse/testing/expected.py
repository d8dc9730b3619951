"""Expected fusions of each tiny model, as functions of its number of blocks `n`: the one
place that states them (the tests compare against these).

`expected(name, n)` gives the matches per family of a whole-model compile with the
reference lowering; `expected(name, n, regional=True)` those of compile_repeated_blocks
(one compiled block graph, whatever n); `expected_sites(name, n)` the eager sites per kind
that `difffuse.testing.sites` counts (norm / modulation / rope, dead ones left out);
`attention_calls(name, n)` the SDPA calls rewritten and left; `expected_misses` the
reported misses; `plain_norms(name)` the LayerNorms that are no site at all. The per-block
numbers come from each model's structure (diffusers 0.42.1 sources), stated in each
function; where a residual sum ends up (read by the next block's norm and fused into its
norm_scale_shift, or left as a scale_shift) is what the report shows, checked at two block
counts. `n` sets every block stack (Flux's, HunyuanVideo's double and single alike);
HunyuanVideo's token refiner keeps its one block.
"""
from __future__ import annotations

from typing import Callable

import torch


def _wan(n: int, regional: bool, image: bool) -> tuple[dict, dict]:
    """Wan 2.1 T2V / I2V, Wan 2.2 TI2V (per-token modulation), SkyReels-V2 diffusion forcing
    (per-frame modulation): one structure. Per block: self-attention q and k (RMSNorm
    across heads + interleaved rope) -> 2 qk_norm_rope; cross-attention q and k norms
    (and I2V's image-key norm_added_k) -> 2 (3) rms_norm; norm1 (LN -> *(1+scale)+shift),
    norm2 (h + attn*gate -> affine LN), norm3 (h + attn -> LN -> *(1+c_scale)+c_shift) -> 3
    norm_scale_shift; the FFN is a Linear + tanh-GELU. The FFN's gated residual is a
    scale_shift at a block boundary (regional); in a whole-model compile it feeds the next
    block's norm1 (or norm_out, whose modulation adds one norm_scale_shift). The text
    embedder's gelu_tanh projection is one more Linear + tanh-GELU. I2V's image embedder
    LayerNorms read no residual and are not modulated: plain, no site."""
    rms = 3 if image else 2
    if regional:
        matches = {"qk_norm_rope": 2, "rms_norm": rms, "norm_scale_shift": 3, "linear_gelu": 1, "scale_shift": 1}
    else:
        matches = {"qk_norm_rope": 2 * n, "rms_norm": rms * n, "norm_scale_shift": 3 * n + 1, "linear_gelu": n + 1}
    # norms per block: norm1-3, attn1.norm_q/k, attn2.norm_q/k (+ norm_added_k); + norm_out
    return matches, {"norm": (5 + rms) * n + 1, "modulation": 2 * n + 1, "rope": 2 * n}


def wan_t2v(n: int, regional: bool = False):
    return _wan(n, regional, image=False)


def wan_i2v(n: int, regional: bool = False):
    return _wan(n, regional, image=True)


def flux(n: int, regional: bool = False):
    """Flux.1: n double-stream blocks: norm1 / norm1_context (AdaLN-Zero) and norm2 /
    norm2_context (h + attn*gate -> LN -> modulation) -> 4 norm_scale_shift; per-head
    RMSNorm of q, k, added q, added k and one joint rope on q and on k -> 2 qk_norm_rope
    (each covers the image and the text norm); FFN and context FFN tanh-GELU -> 2
    linear_gelu. n single-stream blocks: norm (AdaLN-Zero single) -> 1 norm_scale_shift;
    q/k norm + rope -> 2 qk_norm_rope; proj_mlp tanh-GELU -> 1 linear_gelu; its gated
    residual `residual + gate * proj_out(..)` is split back into text and image tokens, so
    no norm reads the sum: 1 scale_shift. norm_out: 1 norm_scale_shift. The last double
    block's two FFN residuals are concatenated into the single stream: 2 scale_shift."""
    if regional:
        raise ValueError("flux: regional counts are not derived")
    return ({"qk_norm_rope": 4 * n, "norm_scale_shift": 5 * n + 1, "scale_shift": n + 2, "linear_gelu": 3 * n},
            {"norm": 11 * n + 1, "modulation": 5 * n + 1, "rope": 4 * n})


def qwen_image(n: int, regional: bool = False):
    """Qwen-Image: per block img_norm1 / txt_norm1 (LN -> modulation) and img_norm2 /
    txt_norm2 (h + attn*gate -> LN -> modulation) -> 4 norm_scale_shift; per-head RMSNorm
    of q, k, added q, added k, each with the complex rope of its stream -> 4 qk_norm_rope;
    img and txt FFN tanh-GELU -> 2 linear_gelu. The last block's text stream after its
    attention is dead (the model returns the image tokens): its txt_norm2 and txt FFN are
    not in the graph (-1 norm_scale_shift, -1 linear_gelu; the dead norm and modulation
    are not sites). Outside: txt_norm (RMSNorm of the prompt) -> 1 rms_norm; norm_out -> 1
    norm_scale_shift."""
    if regional:
        raise ValueError("qwen-image: regional counts are not derived")
    return ({"qk_norm_rope": 4 * n, "norm_scale_shift": 4 * n, "rms_norm": 1, "linear_gelu": 2 * n - 1},
            {"norm": 8 * n + 1, "modulation": 4 * n, "rope": 4 * n})


def hunyuan_video(n: int, regional: bool = False):
    """HunyuanVideo: n dual-stream blocks as Flux's (4 norm_scale_shift, 2 linear_gelu, the
    last one's two FFN residuals left as scale_shift) but the rope is on the image tokens
    only: q/k norms + rope -> 2 qk_norm_rope, the text q/k norms (norm_added_q/k) -> 2
    rms_norm; n single-stream blocks as Flux's (1 norm_scale_shift, 2 qk_norm_rope on the
    image token range, 1 linear_gelu, 1 scale_shift); norm_out -> 1 norm_scale_shift; the
    token refiner's one block: norm2 (h + attn*gate -> affine LN) -> 1 norm_scale_shift,
    its norm1 reads the input projection (plain LayerNorm, no site)."""
    if regional:
        raise ValueError("hunyuan-video: regional counts are not derived")
    return ({"qk_norm_rope": 4 * n, "norm_scale_shift": 5 * n + 2, "rms_norm": 2 * n, "scale_shift": n + 2,
             "linear_gelu": 3 * n},
            {"norm": 11 * n + 2, "modulation": 5 * n + 1, "rope": 4 * n})


def ltx_video(n: int, regional: bool = False):
    """LTX-Video: per block norm1 and norm2 (non-affine RMSNorm -> modulation; norm2 reads
    `h + attn2`) -> 2 norm_scale_shift; self-attention q/k RMSNorm across heads + split-half
    rope -> 2 qk_norm_rope; cross-attention q/k norms -> 2 rms_norm; the FFN tanh-GELU -> 1
    linear_gelu; the self-attention's gated residual is followed by the cross-attention's
    add, so no norm reads it: 1 scale_shift (the FFN's feeds the next norm1 / norm_out).
    Outside: norm_out -> 1 norm_scale_shift; the caption projection's tanh-GELU -> 1
    linear_gelu."""
    if regional:
        raise ValueError("ltx-video: regional counts are not derived")
    return ({"qk_norm_rope": 2 * n, "norm_scale_shift": 2 * n + 1, "rms_norm": 2 * n, "scale_shift": n,
             "linear_gelu": n + 1},
            {"norm": 6 * n + 1, "modulation": 2 * n + 1, "rope": 2 * n})


def cogvideox(n: int, regional: bool = False):
    """CogVideoX: per block norm1 and norm2 (CogVideoXLayerNormZero: one LayerNorm called on
    the video and on the text stream, each modulated) -> 4 norm_scale_shift; per-head
    LayerNorm of q/k + rope on the video tokens -> 2 qk_norm_rope; FFN tanh-GELU -> 1
    linear_gelu. Outside: norm_final (reads the last residual sum, affine LN) and norm_out
    (LN -> modulation) -> 2 norm_scale_shift."""
    if regional:
        raise ValueError("cogvideox: regional counts are not derived")
    return ({"qk_norm_rope": 2 * n, "norm_scale_shift": 4 * n + 2, "linear_gelu": n},
            {"norm": 6 * n + 2, "modulation": 4 * n + 1, "rope": 2 * n})


EXPECTED: dict[str, Callable] = {
    "wan-t2v-tiny": wan_t2v,
    "wan-i2v-tiny": wan_i2v,
    "wan-ti2v-tiny": wan_t2v,  # per-token modulation: the same sites, the same matches
    "wan-df-tiny": wan_t2v,  # per-frame modulation (SkyReels-V2 diffusion forcing): likewise
    "flux-tiny": flux,
    "qwen-image-tiny": qwen_image,
    "hunyuan-video-tiny": hunyuan_video,
    "ltx-video-tiny": ltx_video,
    "cogvideox-tiny": cogvideox,
}


# Fusions a dtype loses today, per (model, dtype): family -> extra matches (a function of n).
# Gaps to close, stated so that closing one fails the test that pins it (update it then).
KNOWN_GAPS: dict = {
    # (model, dtype, regional) -> {family: extra matches(n)} for a dtype whose graph fuses
    # differently from fp32's; none today (bf16 HunyuanVideo's image-stream residuals sat
    # behind LayerNorm's layout clone and its cast until canonicalize dropped that clone).
}


def attention_calls(name: str, n: int, regional: bool = False) -> tuple[int, int]:
    """(rewritten, left because masked) SDPA calls of a tiny model with n blocks per stack.

    Wan T2V / TI2V: self + text cross-attention per block (2n); I2V adds the image
    cross-attention (3n). Flux: one joint attention per double- and per single-stream block
    (2n). Qwen-Image: one joint attention per block, masked when the text mask is passed
    (diffusers turns it into an additive [B, 1, 1, L] mask), unmasked without it.
    HunyuanVideo: the token refiner's block (1, a [B, H, L, L] mask) and every double- and
    single-stream block get the text mask (2n + 1, all left). LTX: self-attention (n) and
    the masked cross-attention (n left). CogVideoX: one joint attention per block (n).
    Regional (one compiled block graph): Wan's per-block calls."""
    if regional:
        if not name.startswith("wan-"):
            raise ValueError(f"{name}: regional counts are not derived")
        n = 1
    return {"wan-t2v-tiny": (2 * n, 0), "wan-ti2v-tiny": (2 * n, 0), "wan-df-tiny": (2 * n, 0),
            "wan-i2v-tiny": (3 * n, 0), "flux-tiny": (2 * n, 0), "qwen-image-tiny": (0, n),
            "qwen-image-nomask-tiny": (n, 0), "hunyuan-video-tiny": (0, 2 * n + 1), "ltx-video-tiny": (n, n),
            "cogvideox-tiny": (n, 0)}[name]


def expected(name: str, n: int, regional: bool = False, dtype: torch.dtype = torch.float32) -> dict:
    """Matches per family (families with none left out, as `Report.matches()` gives them)."""
    matches = dict(EXPECTED[name](n, regional)[0])
    matches["attention"] = attention_calls(name, n, regional)[0]
    for family, extra in KNOWN_GAPS.get((name, dtype, regional), {}).items():
        matches[family] = matches.get(family, 0) + extra(n)
    return {k: v for k, v in matches.items() if v}


def expected_misses(name: str, n: int, regional: bool = False) -> dict:
    """Reported misses per family: the masked attention calls (no exact flash kernel takes
    a mask); every other site fuses."""
    left = attention_calls(name, n, regional)[1]
    return {"attention": left} if left else {}


def miss_counts(report) -> dict:
    """Reported misses per family, as `expected_misses` states them."""
    out: dict = {}
    for m in report.misses:
        out[m.family] = out.get(m.family, 0) + 1
    return out


def expected_sites(name: str, n: int) -> dict:
    """Eager sites per kind (norm, modulation, rope) of a whole model of n blocks."""
    return dict(EXPECTED[name](n)[1])


# LayerNorms no family is for (no residual before, no modulation after, no rope): not sites;
# module path -> calls, whatever n (they sit outside the block stacks). Stated with the
# model's function above: Wan I2V's image-embedder norms, HunyuanVideo's token-refiner norm1.
PLAIN_NORMS: dict[str, dict[str, int]] = {
    "wan-i2v-tiny": {"condition_embedder.image_embedder.norm1": 1, "condition_embedder.image_embedder.norm2": 1},
    "hunyuan-video-tiny": {"context_embedder.token_refiner.refiner_blocks.0.norm1": 1},
}


def plain_norms(name: str) -> dict:
    """The eager counter's `plain` LayerNorms of a tiny model (module path -> calls)."""
    return dict(PLAIN_NORMS.get(name, {}))


# ---------------------------------------------------------------------------- wild models
# difffuse.testing.wild_models: DiTs written as other code bases write them (issue 28). The
# counts state what difffuse must do once every spelling collapses to the families' forms
# (the issue's bar): each Wan code base fuses like diffusers' Wan; a rope with no norm in
# front (Allegro, or a norm the graph breaks away from) fuses on its own and counts under
# qk_norm_rope.
WAN_CODE_BASES = ("wan-sglang", "wan-comfyui", "wan-comfyui-ropesum", "wan-diffsynth", "wan-lightx2v",
                  "wan-lightx2v-real")
PLAIN_BLOCKS = ("plain-chunk", "plain-slice", "plain-interleaved", "plain-moduledict", "lumina-scale-only",
                "flux2-scale-first", "kandinsky5-bf16")
# models whose own code breaks the graph between the q/k norms and the rope
GRAPH_BREAK_MODELS = ("wan-official", "plain-graph-break")


def wild(name: str, n: int) -> dict:
    """Matches per family of a whole-model compile (reference lowering) of the wild model
    `name` with n blocks (families with none left out).

    Wan, as sglang / ComfyUI / DiffSynth / LightX2V write it: per block the self-attention q
    and k (RMSNorm across heads + rope) -> 2 qk_norm_rope; the cross-attention q / k norms ->
    2 rms_norm; norm1 (LN -> modulation), the cross-attention norm (h + attn*gate -> affine
    LN; sglang's with its zero shift / scale), the FFN norm (h + attn -> LN -> modulation)
    -> 3 norm_scale_shift; FFN Linear + tanh-GELU -> 1 linear_gelu; self- and cross-attention
    -> 2 attention. The FFN's gated residual feeds the next norm1 or the head's modulated
    norm (+1 norm_scale_shift); the text embedding's Linear + tanh-GELU: +1 linear_gelu.
    Exactly diffusers' Wan (`wan_t2v`): at 2 blocks qk_norm_rope 4, norm_scale_shift 7,
    rms_norm 4.

    Plain blocks (adaLN-Zero: norm1 -> modulation -> self-attention with per-head q/k RMSNorm
    + rope; norm2 (affine LN on the residual) -> cross-attention with q/k RMSNorm; norm3 ->
    modulation -> tanh-GELU MLP; a modulated final norm): the same, without the text
    embedding's GELU (linear_gelu n). Lumina2's scale-only modulation and FLUX.2's `(1 +
    scale) * norm(x) + shift` are modulations like any other. Kandinsky 5's fp32 q/k norms
    cast back to bf16 and roped in fp32 fuse with their rope: the op rounds once, at the end
    (the fp32-math rule every fused op is held to; diffusers' Wan rounds its bf16 norm output
    before the rope too). SD3.5's twice-modulated norm1
    (no norm2): each modulation of the one LayerNorm output is a norm_scale_shift (the norm
    computed again for the second: 2), norm3 and the final norm 1 each: 3n + 1. Allegro: no
    q/k norms, so no rms_norm; each q and k rope (three 1-D ropes on thirds of head_dim)
    fuses on its own: 2 qk_norm_rope per block.

    Graph breaks: the frames Dynamo resumes after a break are compiled once and their code
    reused by the next block (same code, guards pass), and the frame with the block loop
    runs its loop eagerly; counts are those of the compiled graphs, whatever n:
    - `wan-official`, n >= 1: block frame up to the self-attention (norm1 -> modulation: 1
      norm_scale_shift, no residual: the residual is the frame's input); q / k / v and their
      norms (2 rms_norm); `rope_apply` after `grid_sizes.tolist()`, compiled once and reused
      for q and k: its complex128 rope is no site of its own (no norm in this graph) and stays,
      reported: each `x_i` it computes is appended to a list made before the graph break, so the
      graph also returns the fp64 value to Python (0 rope); the attention and
      `o` (1 attention); the rest of the block (norm3 and norm2 -> 2 norm_scale_shift, the
      cross-attention's q / k norms 2 rms_norm, its attention, the FFN's linear_gelu, the
      FFN gated residual returned by the frame: 1 scale_shift); the head (1 norm_scale_shift);
      the text embedding runs in the eager loop frame (no linear_gelu for it).
    - `plain-graph-break`, n = 1: block frame up to the attention (1 norm_scale_shift), q /
      k / v and norms up to the overflow check's `.item()` (2 rms_norm), the rope of q and k
      fused on its own with the attention and `to_out` (2 rope: the norm is in the frame before the break; 1 attention), the
      rest of the block (2 norm_scale_shift, 2 rms_norm, 1 attention, 1 linear_gelu, 1
      scale_shift), the final `modulate()` of an eager norm compiled as its own frame (1
      scale_shift). Each further block recompiles the frame resumed after `.item()` only
      (+2 rope, +1 attention per block).
    """
    if name in WAN_CODE_BASES:
        return {"qk_norm_rope": 2 * n, "rms_norm": 2 * n, "norm_scale_shift": 3 * n + 1, "linear_gelu": n + 1,
                "attention": 2 * n}
    if name in PLAIN_BLOCKS:
        return {"qk_norm_rope": 2 * n, "rms_norm": 2 * n, "norm_scale_shift": 3 * n + 1, "linear_gelu": n,
                "attention": 2 * n}
    if name == "sd35-twice":  # the first gated residual feeds the second, no norm: a scale_shift
        return {"qk_norm_rope": 2 * n, "rms_norm": 2 * n, "norm_scale_shift": 3 * n + 1, "scale_shift": n,
                "linear_gelu": n, "attention": 2 * n}
    if name == "allegro-axes":
        # one rope per axis (rotate_half within each third of head_dim) for q and k, no norm in front
        return {"rope": 6 * n, "norm_scale_shift": 3 * n + 1, "linear_gelu": n, "attention": 2 * n}
    if name == "wan-official":
        return {"rms_norm": 4, "norm_scale_shift": 4, "scale_shift": 1, "linear_gelu": 1,
                "attention": 2}
    if name == "plain-graph-break":
        return {"rope": 2 * n, "rms_norm": 4, "norm_scale_shift": 3, "scale_shift": 2, "linear_gelu": 1,
                "attention": n + 1}
    raise KeyError(name)


def wild_sites(name: str, n: int) -> dict:
    """Eager sites per kind (`difffuse.testing.sites`) of a wild model with n blocks: per
    block 7 norms (norm1, the cross-attention norm, the FFN norm, two q/k norms in each
    attention), 2 modulations, 2 ropes (q and k); + the modulated final norm. SD3.5's block
    has no cross-attention norm and modulates norm1 twice (6 norms, 3 modulations);
    Allegro's has no q/k norms (3 norms)."""
    if name == "sd35-twice":
        return {"norm": 6 * n + 1, "modulation": 3 * n + 1, "rope": 2 * n}
    if name == "allegro-axes":
        return {"norm": 3 * n + 1, "modulation": 2 * n + 1, "rope": 2 * n}
    return {"norm": 7 * n + 1, "modulation": 2 * n + 1, "rope": 2 * n}
