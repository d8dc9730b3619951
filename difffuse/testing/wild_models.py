"""Tiny random-weight DiTs written the way other code bases write them (issue 28).

difffuse must fuse a model as its authors wrote it, not only diffusers' spellings. Each
builder here returns (model, kwargs) so that `model(**kwargs)` runs one denoising step,
like `tiny_models` / `tiny_dits`; plain torch only (no diffusers, no einops). The code is
our own, written in the *style* of each code base (how it names modules, where it casts,
how it spells the rope, the modulation and the gated residual), after reading its
sources:

Wan, six ways (2 blocks by default; 2 heads x 16, 2x4x4 latent -> 8 tokens, 5 text tokens):
- `wan-sglang`: sglang multimodal_gen's Wan (python/sglang/multimodal_gen/runtime/...):
  its CustomOps on their native path: RMSNorm.forward_native (fp32 variance, weight,
  cast back), FP32LayerNorm, a ScaleShift op `x * (scale_constant + scale) + shift` with
  `scale_constant = 1.0` an attribute, ScaleResidualLayerNormScaleShift (the cross-attention
  norm gets zero shift / scale tensors), ReplicatedLinear returning (out, bias), the rope
  `x[..., ::2], x[..., 1::2]` -> `stack((x1*cos - x2*sin, x2*cos + x1*sin), -1).flatten(-2)`
  on half-width cos/sin tables.
- `wan-comfyui`: ComfyUI's comfy/ldm/wan/model.py: `torch.addcmul(shift, norm(x), 1 + scale)`,
  `torch.addcmul(x, y, gate)`, rope from a table of 2x2 rotation matrices built from
  position ids (comfy/ldm/flux/math.py) applied with `addcmul_`; `wan-comfyui-ropesum`:
  the same model with the rope spelled `f[..., 0] * x_[..., 0] + f[..., 1] * x_[..., 1]`.
- `wan-official`: Wan-Video/Wan2.1 wan/modules/model.py: WanRMSNorm / WanLayerNorm
  (`.float()` ... `.type_as(x)`), `norm(x).float() * (1 + e[1]) + e[0]` on chunks of
  `modulation + e`, complex128 rope in a per-sample loop over `grid_sizes.tolist()` (a
  graph break between each q/k norm and its rope), list inputs, `seq_len` padding.
- `wan-diffsynth`: DiffSynth-Studio's diffsynth/models/wan_video_dit.py: complex128 rope
  without the loop, `modulate(x, shift, scale)`, GateModule `x + gate * residual`.
- `wan-lightx2v` / `wan-lightx2v-real`: LightX2V's split of weights and inference: weight
  holders with `.apply()` (no `forward`), 2-D `[tokens, dim]` activations, `torch.addmm`
  Linears (`out=` into a fresh buffer), in-place `add_` residuals, tanh-GELU FFN, a
  complex fp32 rope / a real rope through `empty_like` + strided slice writes.

Other spellings the issue lists, on one plain block (`PlainDiT`: adaLN-Zero as in DiT, q/k
RMSNorm per head, rope on the self-attention, cross-attention with q/k norm and no rope,
tanh-GELU MLP), each model differing from it in the one spelling it is for:
- `plain-chunk`, `plain-slice`, `plain-interleaved`: a new user's three ropes
  (`rotate_half` with `x.chunk(2, -1)`; with `x[..., :d // 2]` slices; interleaved pairs
  through `unflatten(-1, (-1, 2)).unbind(-1)` + `stack`, half tables `cos[..., 0::2]`);
- `lumina-scale-only`: RMSNorm and scale-only modulation `norm(x) * (1 + scale)`, tanh
  gates (Lumina2 / Z-Image);
- `flux2-scale-first`: `(1 + scale) * norm(x) + shift` (FLUX.2);
- `sd35-twice`: one LayerNorm output modulated twice (SD3.5's AdaLayerNormZeroX), the
  second modulation feeding the cross-attention;
- `kandinsky5-bf16`: rope `(rope * x).sum(-1)` over 2x2 matrices, rounded to bf16 (the
  model runs in bf16);
- `allegro-axes`: no q/k norm, three 1-D ropes on thirds of head_dim (tables gathered with
  `F.embedding`), computed in fp32;
- `plain-graph-break`: an overflow check (`.item()`) between the q/k norms and the rope;
- `plain-moduledict`: blocks in an `nn.ModuleDict` with keys `'2-1'`, `'2-2'` (and diffusers'
  own rope spelling: only the keys are wild).

`WILD_MODELS` maps each name to its builder: `builder(num_layers=2, dtype=torch.float32,
batch=1, seed=0, **sizes)`; `WAN_STYLE` lists the six Wan code bases' entries. Expected
fusions are in `expected.wild(name, n)`.
"""
from __future__ import annotations

import math
import warnings
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

DIM, HEADS, FFN, TEXT_DIM, FREQ_DIM, IN_CH = 32, 2, 64, 16, 16, 4
PATCH = (1, 2, 2)


def _video(batch, frames, height, width, dtype):
    return torch.randn(batch, IN_CH, frames, height, width, dtype=dtype)


def _timestep(batch):
    return torch.randint(0, 1000, (batch,)).float()


# ============================================================================ sglang
# python/sglang/multimodal_gen/runtime/{layers,models/dits/wanvideo.py}: CustomOps whose
# forward picks forward_cuda / forward_native; on a CPU the native path runs.
class _CustomOp(nn.Module):
    def forward(self, *args, **kwargs):
        return self.forward_native(*args, **kwargs)


class SglRMSNorm(_CustomOp):
    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps
        self.hidden_size = hidden_size

    def forward_native(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        if not x.is_contiguous():
            x = x.contiguous()
        orig_dtype = x.dtype
        x = x.to(torch.float32)
        if residual is not None:
            x = x + residual.to(torch.float32)
            residual = x.to(orig_dtype)
        variance = x.pow(2).mean(dim=-1, keepdim=True)
        x = x * torch.rsqrt(variance + self.variance_epsilon)
        x = (x * self.weight).to(orig_dtype)
        return x if residual is None else (x, residual)


class SglFP32LayerNorm(nn.LayerNorm):
    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        origin_dtype = inputs.dtype
        return F.layer_norm(inputs.float(), self.normalized_shape,
                            self.weight.float() if self.weight is not None else None,
                            self.bias.float() if self.bias is not None else None, self.eps).to(origin_dtype)


class SglScaleShift(_CustomOp):
    """`x * (scale_constant + scale) + shift`: the constant is an attribute (a Python float)."""

    def __init__(self, scale_constant: float = 1.0) -> None:
        super().__init__()
        self.scale_constant = scale_constant

    def forward_native(self, x, shift, scale):
        return x * (self.scale_constant + scale) + shift


class SglLayerNormScaleShift(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6, elementwise_affine: bool = False) -> None:
        super().__init__()
        self.norm = SglFP32LayerNorm(hidden_size, elementwise_affine=elementwise_affine, eps=eps)
        self.scale_shift = SglScaleShift()

    def forward(self, x, shift, scale):
        return self.scale_shift(self.norm(x), shift, scale)


class SglScaleResidualLayerNormScaleShift(nn.Module):
    """residual + x * gate (or + x where gate is the int 1), LayerNorm, scale / shift;
    returns (modulated, residual_output)."""

    def __init__(self, hidden_size: int, eps: float = 1e-6, elementwise_affine: bool = False) -> None:
        super().__init__()
        self.norm = SglFP32LayerNorm(hidden_size, elementwise_affine=elementwise_affine, eps=eps)
        self.scale_shift = SglScaleShift()

    def forward(self, residual, x, gate, shift, scale):
        if isinstance(gate, int):
            assert gate == 1
            residual_output = residual + x
        else:
            residual_output = residual + x * gate
        normalized = self.norm(residual_output)
        return self.scale_shift(normalized, shift, scale), residual_output


class SglScaleResidual(nn.Module):
    def forward(self, residual, x, gate):
        return residual + x * gate


class ReplicatedLinear(nn.Linear):
    """sglang's linear layers return (output, output_bias)."""

    def forward(self, x):
        return F.linear(x, self.weight, self.bias), None


class SglMLP(nn.Module):
    def __init__(self, input_dim: int, mlp_hidden_dim: int, output_dim: int | None = None) -> None:
        super().__init__()
        self.fc_in = ReplicatedLinear(input_dim, mlp_hidden_dim)
        self.act = nn.GELU(approximate="tanh")
        self.fc_out = ReplicatedLinear(mlp_hidden_dim, output_dim or input_dim)

    def forward(self, x):
        x, _ = self.fc_in(x)
        x = self.act(x)
        x, _ = self.fc_out(x)
        return x


def sgl_apply_rotary_emb(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, is_neox_style: bool) -> torch.Tensor:
    """x: [B, L, H, D]; cos, sin: [L, D/2]."""
    cos = cos.unsqueeze(-2).to(x.dtype)
    sin = sin.unsqueeze(-2).to(x.dtype)
    if is_neox_style:
        x1, x2 = torch.chunk(x, 2, dim=-1)
    else:
        x1 = x[..., ::2]
        x2 = x[..., 1::2]
    o1 = x1 * cos - x2 * sin
    o2 = x2 * cos + x1 * sin
    if is_neox_style:
        return torch.cat((o1, o2), dim=-1)
    return torch.stack((o1, o2), dim=-1).flatten(-2)


class SglNDRotaryEmbedding(nn.Module):
    """cos / sin tables [F*H*W, D/2] for a (F, H, W) grid, one band of frequencies per axis."""

    def __init__(self, rope_dim_list: list[int], rope_theta: float = 10000.0) -> None:
        super().__init__()
        self.rope_dim_list = rope_dim_list
        self.rope_theta = rope_theta

    def forward_from_grid(self, grid_size: tuple[int, int, int], device=None):
        bands = []
        for axis, (n, dim) in enumerate(zip(grid_size, self.rope_dim_list)):
            inv = 1.0 / (self.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float64, device=device) / dim))
            pos = torch.arange(n, dtype=torch.float64, device=device)
            ang = torch.outer(pos, inv)
            shape = [1, 1, 1, -1]
            shape[axis] = n
            bands.append(ang.view(*shape).expand(*grid_size, -1))
        freqs = torch.cat(bands, dim=-1).flatten(0, 2)
        return freqs.cos().float(), freqs.sin().float()


class SglAttention(nn.Module):
    """USPAttention on one device: q, k, v [B, L, H, D] -> SDPA -> [B, L, H, D]."""

    def forward(self, q, k, v):
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return out.transpose(1, 2)


class SglWanT2VCrossAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.to_q = ReplicatedLinear(dim, dim)
        self.to_k = ReplicatedLinear(dim, dim)
        self.to_v = ReplicatedLinear(dim, dim)
        self.to_out = ReplicatedLinear(dim, dim)
        self.norm_q = SglRMSNorm(dim, eps=eps)
        self.norm_k = SglRMSNorm(dim, eps=eps)
        self.attn = SglAttention()

    def forward(self, x, context):
        b, n, d = x.size(0), self.num_heads, self.head_dim
        q = self.norm_q(self.to_q(x)[0]).view(b, -1, n, d)
        k = self.norm_k(self.to_k(context)[0]).view(b, -1, n, d)
        v = self.to_v(context)[0].view(b, -1, n, d)
        x = self.attn(q, k, v)
        x = x.flatten(2)
        x, _ = self.to_out(x)
        return x


class SglWanTransformerBlock(nn.Module):
    def __init__(self, dim: int, ffn_dim: int, num_heads: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.norm1 = SglLayerNormScaleShift(dim, eps=eps, elementwise_affine=False)
        self.to_q = ReplicatedLinear(dim, dim)
        self.to_k = ReplicatedLinear(dim, dim)
        self.to_v = ReplicatedLinear(dim, dim)
        self.to_out = ReplicatedLinear(dim, dim)
        self.attn1 = SglAttention()
        self.num_attention_heads = num_heads
        self.norm_q = SglRMSNorm(dim, eps=eps)  # rms_norm_across_heads
        self.norm_k = SglRMSNorm(dim, eps=eps)
        self.self_attn_residual_norm = SglScaleResidualLayerNormScaleShift(dim, eps=eps, elementwise_affine=True)
        self.attn2 = SglWanT2VCrossAttention(dim, num_heads, eps=eps)
        self.cross_attn_residual_norm = SglScaleResidualLayerNormScaleShift(dim, eps=eps, elementwise_affine=False)
        self.ffn = SglMLP(dim, ffn_dim)
        self.mlp_residual = SglScaleResidual()
        self.scale_shift_table = nn.Parameter(torch.randn(1, 6, dim) / dim ** 0.5)

    def forward(self, hidden_states, encoder_hidden_states, temb, freqs_cis):
        orig_dtype = hidden_states.dtype
        e = self.scale_shift_table + temb.float()
        shift_msa, scale_msa, gate_msa, c_shift_msa, c_scale_msa, c_gate_msa = e.chunk(6, dim=1)

        # 1. self-attention
        norm_hidden_states = self.norm1(hidden_states, shift_msa, scale_msa).to(orig_dtype)
        query, _ = self.to_q(norm_hidden_states)
        key, _ = self.to_k(norm_hidden_states)
        value, _ = self.to_v(norm_hidden_states)
        query = self.norm_q(query)
        key = self.norm_k(key)
        query = query.unflatten(2, (self.num_attention_heads, -1))
        key = key.unflatten(2, (self.num_attention_heads, -1))
        value = value.unflatten(2, (self.num_attention_heads, -1))
        cos, sin = freqs_cis
        query, key = (sgl_apply_rotary_emb(query, cos, sin, is_neox_style=False),
                      sgl_apply_rotary_emb(key, cos, sin, is_neox_style=False))
        attn_output = self.attn1(query, key, value).flatten(2)
        attn_output, _ = self.to_out(attn_output)

        null_shift = null_scale = torch.zeros((1,), device=hidden_states.device, dtype=hidden_states.dtype)
        norm_hidden_states, hidden_states = self.self_attn_residual_norm(
            hidden_states, attn_output, gate_msa, null_shift, null_scale)
        norm_hidden_states, hidden_states = norm_hidden_states.to(orig_dtype), hidden_states.to(orig_dtype)

        # 2. cross-attention
        attn_output = self.attn2(norm_hidden_states, context=encoder_hidden_states)
        norm_hidden_states, hidden_states = self.cross_attn_residual_norm(
            hidden_states, attn_output, 1, c_shift_msa, c_scale_msa)
        norm_hidden_states, hidden_states = norm_hidden_states.to(orig_dtype), hidden_states.to(orig_dtype)

        # 3. feed-forward
        ff_output = self.ffn(norm_hidden_states)
        hidden_states = self.mlp_residual(hidden_states, ff_output, c_gate_msa)
        return hidden_states.to(orig_dtype)


class SglTimestepEmbedder(nn.Module):
    def __init__(self, hidden_size: int, frequency_embedding_size: int = FREQ_DIM) -> None:
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(nn.Linear(frequency_embedding_size, hidden_size), nn.SiLU(),
                                 nn.Linear(hidden_size, hidden_size))

    @staticmethod
    def timestep_embedding(t, dim, max_period=10000):
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t[:, None].float() * freqs[None]
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)

    def forward(self, t):
        t_freq = self.timestep_embedding(t, self.frequency_embedding_size).to(self.mlp[0].weight.dtype)
        return self.mlp(t_freq)


class SglWanTransformer3DModel(nn.Module):
    def __init__(self, num_layers: int = 2, dim: int = DIM, num_heads: int = HEADS, ffn_dim: int = FFN,
                 eps: float = 1e-6) -> None:
        super().__init__()
        self.hidden_size, self.num_attention_heads = dim, num_heads
        self.patch_size = PATCH
        self.patch_embedding = nn.Conv3d(IN_CH, dim, kernel_size=PATCH, stride=PATCH)
        self.time_embedder = SglTimestepEmbedder(dim)
        self.time_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.text_embedder = SglMLP(TEXT_DIM, dim, dim)
        d = dim // num_heads
        self.rotary_emb = SglNDRotaryEmbedding([d - 4 * (d // 6), 2 * (d // 6), 2 * (d // 6)])
        self.blocks = nn.ModuleList([SglWanTransformerBlock(dim, ffn_dim, num_heads, eps) for _ in range(num_layers)])
        self.norm_out = SglLayerNormScaleShift(dim, eps=eps, elementwise_affine=False)
        self.proj_out = nn.Linear(dim, IN_CH * math.prod(PATCH))
        self.scale_shift_table = nn.Parameter(torch.randn(1, 2, dim) / dim ** 0.5)

    def forward(self, hidden_states, encoder_hidden_states, timestep):
        b, _, f, h, w = hidden_states.shape
        p_t, p_h, p_w = self.patch_size
        grid = (f // p_t, h // p_h, w // p_w)
        freqs_cis = self.rotary_emb.forward_from_grid(grid, device=hidden_states.device)
        hidden_states = self.patch_embedding(hidden_states).flatten(2).transpose(1, 2)
        temb = self.time_embedder(timestep)
        timestep_proj = self.time_modulation(temb).unflatten(1, (6, -1))
        encoder_hidden_states = self.text_embedder(encoder_hidden_states)
        for block in self.blocks:
            hidden_states = block(hidden_states, encoder_hidden_states, timestep_proj, freqs_cis)
        shift, scale = (self.scale_shift_table + temb.unsqueeze(1)).chunk(2, dim=1)
        hidden_states = self.norm_out(hidden_states, shift, scale)
        hidden_states = self.proj_out(hidden_states)
        out = hidden_states.reshape(b, *grid, p_t, p_h, p_w, -1).permute(0, 7, 1, 4, 2, 5, 3, 6)
        return out.flatten(6, 7).flatten(4, 5).flatten(2, 3)


def wan_sglang(num_layers: int = 2, dtype=torch.float32, batch: int = 1, seed: int = 0,
               frames: int = 2, height: int = 4, width: int = 4, text: int = 5):
    torch.manual_seed(seed)
    model = SglWanTransformer3DModel(num_layers).to(dtype).eval()
    return model, dict(hidden_states=_video(batch, frames, height, width, dtype),
                       encoder_hidden_states=torch.randn(batch, text, TEXT_DIM, dtype=dtype),
                       timestep=_timestep(batch))


# ============================================================================ ComfyUI
# comfy/ldm/wan/model.py, comfy/ldm/flux/{math,layers}.py. ComfyUI's `operations` are
# torch.nn's classes with weight init disabled; here the plain torch.nn ones.
class _ComfyOps:
    Linear = nn.Linear
    LayerNorm = nn.LayerNorm
    RMSNorm = nn.RMSNorm
    Conv3d = nn.Conv3d


def comfy_rope(pos: torch.Tensor, dim: int, theta: int) -> torch.Tensor:
    """[..., n] positions -> [..., n, dim/2, 2, 2] rotation matrices."""
    assert dim % 2 == 0
    scale = torch.linspace(0, (dim - 2) / dim, steps=dim // 2, dtype=torch.float64, device=pos.device)
    omega = 1.0 / (theta ** scale)
    out = torch.einsum("...n,d->...nd", pos.to(dtype=torch.float64), omega)
    out = torch.stack([torch.cos(out), -torch.sin(out), torch.sin(out), torch.cos(out)], dim=-1)
    out = out.reshape(*out.shape[:-1], 2, 2)
    return out.to(dtype=torch.float32)


class ComfyEmbedND(nn.Module):
    def __init__(self, dim: int, theta: int, axes_dim: list) -> None:
        super().__init__()
        self.dim, self.theta, self.axes_dim = dim, theta, axes_dim

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        n_axes = ids.shape[-1]
        emb = torch.cat([comfy_rope(ids[..., i], self.axes_dim[i], self.theta) for i in range(n_axes)], dim=-3)
        return emb.unsqueeze(1)


def comfy_apply_rope1(x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    x_ = x.to(dtype=freqs_cis.dtype).reshape(*x.shape[:-1], -1, 1, 2)
    x_out = freqs_cis[..., 0] * x_[..., 0]
    x_out.addcmul_(freqs_cis[..., 1], x_[..., 1])
    return x_out.reshape(*x.shape).type_as(x)


def comfy_apply_rope(xq: torch.Tensor, xk: torch.Tensor, freqs_cis: torch.Tensor):
    xq_ = xq.to(dtype=freqs_cis.dtype).reshape(*xq.shape[:-1], -1, 1, 2)
    xk_ = xk.to(dtype=freqs_cis.dtype).reshape(*xk.shape[:-1], -1, 1, 2)
    xq_out = freqs_cis[..., 0] * xq_[..., 0] + freqs_cis[..., 1] * xq_[..., 1]
    xk_out = freqs_cis[..., 0] * xk_[..., 0] + freqs_cis[..., 1] * xk_[..., 1]
    return xq_out.reshape(*xq.shape).type_as(xq), xk_out.reshape(*xk.shape).type_as(xk)


def comfy_optimized_attention(q, k, v, heads):
    b, _, dim_head = q.shape
    dim_head //= heads
    q, k, v = map(lambda t: t.view(b, -1, heads, dim_head).transpose(1, 2), (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False)
    return out.transpose(1, 2).reshape(b, -1, heads * dim_head)


def comfy_sinusoidal_embedding_1d(dim, position):
    half = dim // 2
    position = position.type(torch.float32)
    sinusoid = torch.outer(position, torch.pow(10000, -torch.arange(half).to(position).div(half)))
    return torch.cat([torch.cos(sinusoid), torch.sin(sinusoid)], dim=1)


def comfy_repeat_e(e, x):
    repeats = 1
    if e.size(1) > 1:
        repeats = x.size(1) // e.size(1)
    if repeats == 1:
        return e
    return torch.repeat_interleave(e, repeats, dim=1)


class ComfyWanSelfAttention(nn.Module):
    def __init__(self, dim, num_heads, qk_norm=True, eps=1e-6, rope_sum=False, operations=_ComfyOps):
        super().__init__()
        self.dim, self.num_heads, self.head_dim = dim, num_heads, dim // num_heads
        self.rope_sum = rope_sum
        self.q = operations.Linear(dim, dim)
        self.k = operations.Linear(dim, dim)
        self.v = operations.Linear(dim, dim)
        self.o = operations.Linear(dim, dim)
        self.norm_q = operations.RMSNorm(dim, eps=eps, elementwise_affine=True) if qk_norm else nn.Identity()
        self.norm_k = operations.RMSNorm(dim, eps=eps, elementwise_affine=True) if qk_norm else nn.Identity()

    def forward(self, x, freqs):
        b, s, n, d = *x.shape[:2], self.num_heads, self.head_dim
        if self.rope_sum:
            q = self.norm_q(self.q(x)).view(b, s, n, d)
            k = self.norm_k(self.k(x)).view(b, s, n, d)
            q, k = comfy_apply_rope(q, k, freqs)
        else:
            def qkv_fn_q(x):
                q = self.norm_q(self.q(x)).view(b, s, n, d)
                return comfy_apply_rope1(q, freqs)

            def qkv_fn_k(x):
                k = self.norm_k(self.k(x)).view(b, s, n, d)
                return comfy_apply_rope1(k, freqs)

            q = qkv_fn_q(x)
            k = qkv_fn_k(x)
        x = comfy_optimized_attention(q.view(b, s, n * d), k.view(b, s, n * d), self.v(x).view(b, s, n * d),
                                      heads=self.num_heads)
        return self.o(x)


class ComfyWanT2VCrossAttention(ComfyWanSelfAttention):
    def forward(self, x, context, **kwargs):
        q = self.norm_q(self.q(x))
        k = self.norm_k(self.k(context))
        v = self.v(context)
        x = comfy_optimized_attention(q, k, v, heads=self.num_heads)
        return self.o(x)


class ComfyWanAttentionBlock(nn.Module):
    def __init__(self, dim, ffn_dim, num_heads, eps=1e-6, rope_sum=False, operations=_ComfyOps):
        super().__init__()
        self.norm1 = operations.LayerNorm(dim, eps, elementwise_affine=False)
        self.self_attn = ComfyWanSelfAttention(dim, num_heads, eps=eps, rope_sum=rope_sum, operations=operations)
        self.norm3 = operations.LayerNorm(dim, eps, elementwise_affine=True)
        self.cross_attn = ComfyWanT2VCrossAttention(dim, num_heads, eps=eps, operations=operations)
        self.norm2 = operations.LayerNorm(dim, eps, elementwise_affine=False)
        self.ffn = nn.Sequential(operations.Linear(dim, ffn_dim), nn.GELU(approximate="tanh"),
                                 operations.Linear(ffn_dim, dim))
        self.modulation = nn.Parameter(torch.randn(1, 6, dim) / dim ** 0.5)

    def forward(self, x, e, freqs, context):
        e = (self.modulation.to(dtype=x.dtype, device=x.device) + e).chunk(6, dim=1)
        x = x.contiguous()  # otherwise implicit in LayerNorm
        y = self.self_attn(torch.addcmul(comfy_repeat_e(e[0], x), self.norm1(x), 1 + comfy_repeat_e(e[1], x)), freqs)
        x = torch.addcmul(x, y, comfy_repeat_e(e[2], x))
        del y
        x = x + self.cross_attn(self.norm3(x), context)
        y = self.ffn(torch.addcmul(comfy_repeat_e(e[3], x), self.norm2(x), 1 + comfy_repeat_e(e[4], x)))
        x = torch.addcmul(x, y, comfy_repeat_e(e[5], x))
        return x


class ComfyHead(nn.Module):
    def __init__(self, dim, out_dim, patch_size, eps=1e-6, operations=_ComfyOps):
        super().__init__()
        self.norm = operations.LayerNorm(dim, eps, elementwise_affine=False)
        self.head = operations.Linear(dim, math.prod(patch_size) * out_dim)
        self.modulation = nn.Parameter(torch.randn(1, 2, dim) / dim ** 0.5)

    def forward(self, x, e):
        e = (self.modulation.to(dtype=x.dtype, device=x.device) + e.unsqueeze(1)).chunk(2, dim=1)
        return self.head(torch.addcmul(comfy_repeat_e(e[0], x), self.norm(x), 1 + comfy_repeat_e(e[1], x)))


class ComfyWanModel(nn.Module):
    def __init__(self, num_layers=2, dim=DIM, ffn_dim=FFN, num_heads=HEADS, eps=1e-6, rope_sum=False,
                 operations=_ComfyOps):
        super().__init__()
        self.dim, self.freq_dim, self.patch_size, self.out_dim = dim, FREQ_DIM, PATCH, IN_CH
        self.patch_embedding = operations.Conv3d(IN_CH, dim, kernel_size=PATCH, stride=PATCH)
        self.text_embedding = nn.Sequential(operations.Linear(TEXT_DIM, dim), nn.GELU(approximate="tanh"),
                                            operations.Linear(dim, dim))
        self.time_embedding = nn.Sequential(operations.Linear(FREQ_DIM, dim), nn.SiLU(), operations.Linear(dim, dim))
        self.time_projection = nn.Sequential(nn.SiLU(), operations.Linear(dim, dim * 6))
        self.blocks = nn.ModuleList([ComfyWanAttentionBlock(dim, ffn_dim, num_heads, eps, rope_sum=rope_sum,
                                                            operations=operations) for _ in range(num_layers)])
        self.head = ComfyHead(dim, IN_CH, PATCH, eps, operations=operations)
        d = dim // num_heads
        self.rope_embedder = ComfyEmbedND(dim=d, theta=10000.0, axes_dim=[d - 4 * (d // 6), 2 * (d // 6), 2 * (d // 6)])

    def rope_encode(self, t, h, w, device=None, dtype=None):
        patch_size = self.patch_size
        t_len = (t + (patch_size[0] // 2)) // patch_size[0]
        h_len = (h + (patch_size[1] // 2)) // patch_size[1]
        w_len = (w + (patch_size[2] // 2)) // patch_size[2]
        img_ids = torch.zeros((t_len, h_len, w_len, 3), device=device, dtype=dtype)
        img_ids[:, :, :, 0] = img_ids[:, :, :, 0] + torch.linspace(0, t_len - 1, steps=t_len, device=device,
                                                                   dtype=dtype).reshape(-1, 1, 1)
        img_ids[:, :, :, 1] = img_ids[:, :, :, 1] + torch.linspace(0, h_len - 1, steps=h_len, device=device,
                                                                   dtype=dtype).reshape(1, -1, 1)
        img_ids[:, :, :, 2] = img_ids[:, :, :, 2] + torch.linspace(0, w_len - 1, steps=w_len, device=device,
                                                                   dtype=dtype).reshape(1, 1, -1)
        img_ids = img_ids.reshape(1, -1, img_ids.shape[-1])
        return self.rope_embedder(img_ids).movedim(1, 2)

    def forward(self, x, timestep, context):
        bs, c, t, h, w = x.shape
        freqs = self.rope_encode(t, h, w, device=x.device, dtype=x.dtype)
        x = self.patch_embedding(x.float()).to(x.dtype)
        grid_sizes = x.shape[2:]
        x = x.flatten(2).transpose(1, 2)
        e = self.time_embedding(comfy_sinusoidal_embedding_1d(self.freq_dim, timestep.flatten()).to(dtype=x.dtype))
        e0 = self.time_projection(e).unflatten(1, (6, self.dim))
        context = self.text_embedding(context)
        for block in self.blocks:
            x = block(x, e=e0, freqs=freqs, context=context)
        x = self.head(x, e)
        u = x.view(bs, *grid_sizes, *self.patch_size, self.out_dim)
        u = torch.einsum("bfhwpqrc->bcfphqwr", u)
        return u.reshape(bs, self.out_dim, *[i * j for i, j in zip(grid_sizes, self.patch_size)])


def wan_comfyui(num_layers: int = 2, dtype=torch.float32, batch: int = 1, seed: int = 0, frames: int = 2,
                height: int = 4, width: int = 4, text: int = 5, rope_sum: bool = False):
    torch.manual_seed(seed)
    model = ComfyWanModel(num_layers, rope_sum=rope_sum).to(dtype).eval()
    return model, dict(x=_video(batch, frames, height, width, dtype), timestep=_timestep(batch),
                       context=torch.randn(batch, text, TEXT_DIM, dtype=dtype))


def wan_comfyui_ropesum(num_layers: int = 2, dtype=torch.float32, **kw):
    return wan_comfyui(num_layers, dtype, rope_sum=True, **kw)


# ============================================================================ official Wan 2.1 / 2.2
# Wan-Video/Wan2.1 wan/modules/{model,attention}.py (the autocast decorators are left out:
# a no-op on a CPU).
def wan_sinusoidal_embedding_1d(dim, position):
    assert dim % 2 == 0
    half = dim // 2
    position = position.type(torch.float64)
    sinusoid = torch.outer(position, torch.pow(10000, -torch.arange(half).to(position).div(half)))
    return torch.cat([torch.cos(sinusoid), torch.sin(sinusoid)], dim=1)


def wan_rope_params(max_seq_len, dim, theta=10000):
    assert dim % 2 == 0
    freqs = torch.outer(torch.arange(max_seq_len),
                        1.0 / torch.pow(theta, torch.arange(0, dim, 2).to(torch.float64).div(dim)))
    return torch.polar(torch.ones_like(freqs), freqs)


def wan_rope_apply(x, grid_sizes, freqs):
    n, c = x.size(2), x.size(3) // 2
    freqs = freqs.split([c - 2 * (c // 3), c // 3, c // 3], dim=1)
    output = []
    for i, (f, h, w) in enumerate(grid_sizes.tolist()):
        seq_len = f * h * w
        x_i = torch.view_as_complex(x[i, :seq_len].to(torch.float64).reshape(seq_len, n, -1, 2))
        freqs_i = torch.cat([
            freqs[0][:f].view(f, 1, 1, -1).expand(f, h, w, -1),
            freqs[1][:h].view(1, h, 1, -1).expand(f, h, w, -1),
            freqs[2][:w].view(1, 1, w, -1).expand(f, h, w, -1),
        ], dim=-1).reshape(seq_len, 1, -1)
        x_i = torch.view_as_real(x_i * freqs_i).flatten(2)
        x_i = torch.cat([x_i, x[i, seq_len:]])
        output.append(x_i)
    return torch.stack(output).float()


def wan_flash_attention(q, k, v, k_lens=None, dtype=None):
    """attention.py's fallback without flash-attn: [B, L, N, C] in and out, through SDPA."""
    out_dtype = v.dtype if dtype is None else dtype
    q = q.transpose(1, 2).to(out_dtype)
    k = k.transpose(1, 2).to(out_dtype)
    v = v.transpose(1, 2).to(out_dtype)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=None, is_causal=False, dropout_p=0.0)
    return out.transpose(1, 2).contiguous()


class WanRMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-5):
        super().__init__()
        self.dim, self.eps = dim, eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return self._norm(x.float()).type_as(x) * self.weight

    def _norm(self, x):
        return x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + self.eps)


class WanLayerNorm(nn.LayerNorm):
    def __init__(self, dim, eps=1e-6, elementwise_affine=False):
        super().__init__(dim, elementwise_affine=elementwise_affine, eps=eps)

    def forward(self, x):
        return super().forward(x.float()).type_as(x)


class WanSelfAttention(nn.Module):
    def __init__(self, dim, num_heads, window_size=(-1, -1), qk_norm=True, eps=1e-6):
        assert dim % num_heads == 0
        super().__init__()
        self.dim, self.num_heads, self.head_dim = dim, num_heads, dim // num_heads
        self.window_size, self.qk_norm, self.eps = window_size, qk_norm, eps
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        self.norm_q = WanRMSNorm(dim, eps=eps) if qk_norm else nn.Identity()
        self.norm_k = WanRMSNorm(dim, eps=eps) if qk_norm else nn.Identity()

    def forward(self, x, seq_lens, grid_sizes, freqs):
        b, s, n, d = *x.shape[:2], self.num_heads, self.head_dim

        def qkv_fn(x):
            q = self.norm_q(self.q(x)).view(b, s, n, d)
            k = self.norm_k(self.k(x)).view(b, s, n, d)
            v = self.v(x).view(b, s, n, d)
            return q, k, v

        q, k, v = qkv_fn(x)
        x = wan_flash_attention(q=wan_rope_apply(q, grid_sizes, freqs), k=wan_rope_apply(k, grid_sizes, freqs),
                                v=v, k_lens=seq_lens)
        x = x.flatten(2)
        return self.o(x)


class WanT2VCrossAttention(WanSelfAttention):
    def forward(self, x, context, context_lens):
        b, n, d = x.size(0), self.num_heads, self.head_dim
        q = self.norm_q(self.q(x)).view(b, -1, n, d)
        k = self.norm_k(self.k(context)).view(b, -1, n, d)
        v = self.v(context).view(b, -1, n, d)
        x = wan_flash_attention(q, k, v, k_lens=context_lens)
        x = x.flatten(2)
        return self.o(x)


class WanAttentionBlock(nn.Module):
    def __init__(self, dim, ffn_dim, num_heads, window_size=(-1, -1), qk_norm=True, cross_attn_norm=True, eps=1e-6):
        super().__init__()
        self.dim, self.ffn_dim, self.num_heads = dim, ffn_dim, num_heads
        self.norm1 = WanLayerNorm(dim, eps)
        self.self_attn = WanSelfAttention(dim, num_heads, window_size, qk_norm, eps)
        self.norm3 = WanLayerNorm(dim, eps, elementwise_affine=True) if cross_attn_norm else nn.Identity()
        self.cross_attn = WanT2VCrossAttention(dim, num_heads, (-1, -1), qk_norm, eps)
        self.norm2 = WanLayerNorm(dim, eps)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(ffn_dim, dim))
        self.modulation = nn.Parameter(torch.randn(1, 6, dim) / dim ** 0.5)

    def forward(self, x, e, seq_lens, grid_sizes, freqs, context, context_lens):
        e = (self.modulation + e).chunk(6, dim=1)
        y = self.self_attn(self.norm1(x).float() * (1 + e[1]) + e[0], seq_lens, grid_sizes, freqs)
        x = x + y * e[2]

        def cross_attn_ffn(x, context, context_lens, e):
            x = x + self.cross_attn(self.norm3(x), context, context_lens)
            y = self.ffn(self.norm2(x).float() * (1 + e[4]) + e[3])
            x = x + y * e[5]
            return x

        return cross_attn_ffn(x, context, context_lens, e)


class WanHead(nn.Module):
    def __init__(self, dim, out_dim, patch_size, eps=1e-6):
        super().__init__()
        self.dim, self.out_dim, self.patch_size, self.eps = dim, out_dim, patch_size, eps
        self.norm = WanLayerNorm(dim, eps)
        self.head = nn.Linear(dim, math.prod(patch_size) * out_dim)
        self.modulation = nn.Parameter(torch.randn(1, 2, dim) / dim ** 0.5)

    def forward(self, x, e):
        e = (self.modulation + e.unsqueeze(1)).chunk(2, dim=1)
        return self.head(self.norm(x) * (1 + e[1]) + e[0])


class WanModel(nn.Module):
    def __init__(self, patch_size=PATCH, text_len=8, in_dim=IN_CH, dim=DIM, ffn_dim=FFN, freq_dim=FREQ_DIM,
                 text_dim=TEXT_DIM, out_dim=IN_CH, num_heads=HEADS, num_layers=2, eps=1e-6):
        super().__init__()
        self.patch_size, self.text_len, self.dim = patch_size, text_len, dim
        self.freq_dim, self.out_dim = freq_dim, out_dim
        self.num_heads = num_heads
        self.patch_embedding = nn.Conv3d(in_dim, dim, kernel_size=patch_size, stride=patch_size)
        self.text_embedding = nn.Sequential(nn.Linear(text_dim, dim), nn.GELU(approximate="tanh"), nn.Linear(dim, dim))
        self.time_embedding = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(dim, dim * 6))
        self.blocks = nn.ModuleList([WanAttentionBlock(dim, ffn_dim, num_heads, eps=eps) for _ in range(num_layers)])
        self.head = WanHead(dim, out_dim, patch_size, eps)
        d = dim // num_heads
        self.freqs = torch.cat([wan_rope_params(1024, d - 4 * (d // 6)), wan_rope_params(1024, 2 * (d // 6)),
                                wan_rope_params(1024, 2 * (d // 6))], dim=1)

    def forward(self, x, t, context, seq_len):
        device = self.patch_embedding.weight.device
        if self.freqs.device != device:
            self.freqs = self.freqs.to(device)
        x = [self.patch_embedding(u.unsqueeze(0)) for u in x]
        grid_sizes = torch.stack([torch.tensor(u.shape[2:], dtype=torch.long) for u in x])
        x = [u.flatten(2).transpose(1, 2) for u in x]
        seq_lens = torch.tensor([u.size(1) for u in x], dtype=torch.long)
        assert seq_lens.max() <= seq_len
        x = torch.cat([torch.cat([u, u.new_zeros(1, seq_len - u.size(1), u.size(2))], dim=1) for u in x])
        e = self.time_embedding(wan_sinusoidal_embedding_1d(self.freq_dim, t).to(x.dtype))
        e0 = self.time_projection(e).unflatten(1, (6, self.dim))
        context = self.text_embedding(torch.stack([torch.cat([u, u.new_zeros(self.text_len - u.size(0), u.size(1))])
                                                   for u in context]))
        kwargs = dict(e=e0, seq_lens=seq_lens, grid_sizes=grid_sizes, freqs=self.freqs, context=context,
                      context_lens=None)
        for block in self.blocks:
            x = block(x, **kwargs)
        x = self.head(x, e)
        x = self.unpatchify(x, grid_sizes)
        return [u.float() for u in x]

    def unpatchify(self, x, grid_sizes):
        c = self.out_dim
        out = []
        for u, v in zip(x, grid_sizes.tolist()):
            u = u[:math.prod(v)].view(*v, *self.patch_size, c)
            u = torch.einsum("fhwpqrc->cfphqwr", u)
            u = u.reshape(c, *[i * j for i, j in zip(v, self.patch_size)])
            out.append(u)
        return out


def wan_official(num_layers: int = 2, dtype=torch.float32, batch: int = 1, seed: int = 0, frames: int = 2,
                 height: int = 4, width: int = 4, text: int = 5):
    torch.manual_seed(seed)
    model = WanModel(num_layers=num_layers).to(dtype).eval()
    tokens = frames * (height // PATCH[1]) * (width // PATCH[2])
    return model, dict(x=[torch.randn(IN_CH, frames, height, width, dtype=dtype) for _ in range(batch)],
                       t=_timestep(batch), context=[torch.randn(text, TEXT_DIM, dtype=dtype) for _ in range(batch)],
                       seq_len=tokens)


# ============================================================================ DiffSynth-Studio
# diffsynth/models/wan_video_dit.py
def ds_sinusoidal_embedding_1d(dim, position):
    sinusoid = torch.outer(position.type(torch.float64),
                           torch.pow(10000, -torch.arange(dim // 2, dtype=torch.float64,
                                                          device=position.device).div(dim // 2)))
    x = torch.cat([torch.cos(sinusoid), torch.sin(sinusoid)], dim=1)
    return x.to(position.dtype)


def ds_precompute_freqs_cis(dim: int, end: int = 1024, theta: float = 10000.0):
    freqs = 1.0 / (theta ** (torch.arange(0, dim, 2)[: (dim // 2)].double() / dim))
    freqs = torch.outer(torch.arange(end, device=freqs.device), freqs)
    return torch.polar(torch.ones_like(freqs), freqs)


def ds_precompute_freqs_cis_3d(dim: int, end: int = 1024, theta: float = 10000.0):
    f_freqs_cis = ds_precompute_freqs_cis(dim - 2 * (dim // 3), end, theta)
    h_freqs_cis = ds_precompute_freqs_cis(dim // 3, end, theta)
    w_freqs_cis = ds_precompute_freqs_cis(dim // 3, end, theta)
    return f_freqs_cis, h_freqs_cis, w_freqs_cis


def ds_rope_apply(x, freqs, num_heads):
    b, s, _ = x.shape
    x = x.view(b, s, num_heads, -1)
    x_out = torch.view_as_complex(x.to(torch.float64).reshape(x.shape[0], x.shape[1], x.shape[2], -1, 2))
    x_out = torch.view_as_real(x_out * freqs).flatten(2)
    return x_out.to(x.dtype)


def ds_flash_attention(q, k, v, num_heads):
    b, s, _ = q.shape
    q, k, v = (t.view(b, -1, num_heads, t.shape[-1] // num_heads).transpose(1, 2) for t in (q, k, v))
    x = F.scaled_dot_product_attention(q, k, v)
    return x.transpose(1, 2).flatten(2)


def ds_modulate(x, shift, scale):
    return x * (1 + scale) + shift


class DsRMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def norm(self, x):
        return x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + self.eps)

    def forward(self, x):
        dtype = x.dtype
        return self.norm(x.float()).to(dtype) * self.weight


class DsAttentionModule(nn.Module):
    def __init__(self, num_heads):
        super().__init__()
        self.num_heads = num_heads

    def forward(self, q, k, v):
        return ds_flash_attention(q=q, k=k, v=v, num_heads=self.num_heads)


class DsSelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, eps: float = 1e-6):
        super().__init__()
        self.dim, self.num_heads, self.head_dim = dim, num_heads, dim // num_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        self.norm_q = DsRMSNorm(dim, eps=eps)
        self.norm_k = DsRMSNorm(dim, eps=eps)
        self.attn = DsAttentionModule(self.num_heads)

    def forward(self, x, freqs):
        q = self.norm_q(self.q(x))
        k = self.norm_k(self.k(x))
        v = self.v(x)
        q = ds_rope_apply(q, freqs, self.num_heads)
        k = ds_rope_apply(k, freqs, self.num_heads)
        x = self.attn(q, k, v)
        return self.o(x)


class DsCrossAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, eps: float = 1e-6):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        self.norm_q = DsRMSNorm(dim, eps=eps)
        self.norm_k = DsRMSNorm(dim, eps=eps)
        self.attn = DsAttentionModule(self.num_heads)

    def forward(self, x: torch.Tensor, y: torch.Tensor):
        q = self.norm_q(self.q(x))
        k = self.norm_k(self.k(y))
        v = self.v(y)
        x = self.attn(q, k, v)
        return self.o(x)


class DsGateModule(nn.Module):
    def forward(self, x, gate, residual):
        return x + gate * residual


class DsDiTBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, ffn_dim: int, eps: float = 1e-6):
        super().__init__()
        self.dim, self.num_heads, self.ffn_dim = dim, num_heads, ffn_dim
        self.self_attn = DsSelfAttention(dim, num_heads, eps)
        self.cross_attn = DsCrossAttention(dim, num_heads, eps)
        self.norm1 = nn.LayerNorm(dim, eps=eps, elementwise_affine=False)
        self.norm2 = nn.LayerNorm(dim, eps=eps, elementwise_affine=False)
        self.norm3 = nn.LayerNorm(dim, eps=eps)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(ffn_dim, dim))
        self.modulation = nn.Parameter(torch.randn(1, 6, dim) / dim ** 0.5)
        self.gate = DsGateModule()

    def forward(self, x, context, t_mod, freqs):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
            self.modulation.to(dtype=t_mod.dtype, device=t_mod.device) + t_mod).chunk(6, dim=1)
        input_x = ds_modulate(self.norm1(x), shift_msa, scale_msa)
        x = self.gate(x, gate_msa, self.self_attn(input_x, freqs))
        x = x + self.cross_attn(self.norm3(x), context)
        input_x = ds_modulate(self.norm2(x), shift_mlp, scale_mlp)
        x = self.gate(x, gate_mlp, self.ffn(input_x))
        return x


class DsHead(nn.Module):
    def __init__(self, dim: int, out_dim: int, patch_size, eps: float):
        super().__init__()
        self.dim, self.patch_size = dim, patch_size
        self.norm = nn.LayerNorm(dim, eps=eps, elementwise_affine=False)
        self.head = nn.Linear(dim, out_dim * math.prod(patch_size))
        self.modulation = nn.Parameter(torch.randn(1, 2, dim) / dim ** 0.5)

    def forward(self, x, t_mod):
        shift, scale = (self.modulation.to(dtype=t_mod.dtype, device=t_mod.device) + t_mod.unsqueeze(1)).chunk(2, dim=1)
        return self.head(self.norm(x) * (1 + scale) + shift)


class DsWanModel(nn.Module):
    def __init__(self, dim=DIM, in_dim=IN_CH, ffn_dim=FFN, out_dim=IN_CH, text_dim=TEXT_DIM, freq_dim=FREQ_DIM,
                 eps=1e-6, patch_size=PATCH, num_heads=HEADS, num_layers=2):
        super().__init__()
        self.dim, self.freq_dim, self.patch_size = dim, freq_dim, patch_size
        self.patch_embedding = nn.Conv3d(in_dim, dim, kernel_size=patch_size, stride=patch_size)
        self.text_embedding = nn.Sequential(nn.Linear(text_dim, dim), nn.GELU(approximate="tanh"), nn.Linear(dim, dim))
        self.time_embedding = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(dim, dim * 6))
        self.blocks = nn.ModuleList([DsDiTBlock(dim, num_heads, ffn_dim, eps) for _ in range(num_layers)])
        self.head = DsHead(dim, out_dim, patch_size, eps)
        head_dim = dim // num_heads
        self.freqs = ds_precompute_freqs_cis_3d(head_dim)

    def patchify(self, x: torch.Tensor):
        x = self.patch_embedding(x)
        grid_size = x.shape[2:]
        x = x.flatten(2).transpose(1, 2)  # b c f h w -> b (f h w) c
        return x, grid_size

    def unpatchify(self, x: torch.Tensor, grid_size):
        f, h, w = grid_size
        x = x.view(x.shape[0], f, h, w, *self.patch_size, -1).permute(0, 7, 1, 4, 2, 5, 3, 6)
        return x.reshape(x.shape[0], x.shape[1], f * self.patch_size[0], h * self.patch_size[1], w * self.patch_size[2])

    def forward(self, x, timestep, context):
        t = self.time_embedding(ds_sinusoidal_embedding_1d(self.freq_dim, timestep))
        t_mod = self.time_projection(t).unflatten(1, (6, self.dim))
        context = self.text_embedding(context)
        x, (f, h, w) = self.patchify(x)
        freqs = torch.cat([
            self.freqs[0][:f].view(f, 1, 1, -1).expand(f, h, w, -1),
            self.freqs[1][:h].view(1, h, 1, -1).expand(f, h, w, -1),
            self.freqs[2][:w].view(1, 1, w, -1).expand(f, h, w, -1),
        ], dim=-1).reshape(f * h * w, 1, -1).to(x.device)
        for block in self.blocks:
            x = block(x, context, t_mod, freqs)
        x = self.head(x, t)
        return self.unpatchify(x, (f, h, w))


def wan_diffsynth(num_layers: int = 2, dtype=torch.float32, batch: int = 1, seed: int = 0, frames: int = 2,
                  height: int = 4, width: int = 4, text: int = 5):
    torch.manual_seed(seed)
    # head_dim 12: DiffSynth splits it as d - 2 * (d // 3), d // 3, d // 3, which needs d // 3 even
    model = DsWanModel(dim=24, num_layers=num_layers).to(dtype).eval()
    return model, dict(x=_video(batch, frames, height, width, dtype), timestep=_timestep(batch).to(dtype),
                       context=torch.randn(batch, text, TEXT_DIM, dtype=dtype))


# ============================================================================ LightX2V
# ModelTC/LightX2V lightx2v/models/networks/wan/{weights,infer}: weights live in holder
# objects with `.apply()` (a Linear is `torch.addmm(bias, x, weight)` on a weight stored
# transposed), inference is written against them on 2-D [tokens, dim] activations. The
# holders are nn.Modules here only so that `.to(dtype)` and `named_modules` see them; no
# `forward` is ever called on them.
class MMWeight(nn.Module):
    def __init__(self, in_dim, out_dim):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(in_dim, out_dim) / in_dim ** 0.5)  # stored transposed
        self.bias = nn.Parameter(torch.randn(out_dim) * 0.02)

    def apply(self, input_tensor):
        shape = (input_tensor.shape[0], self.weight.shape[1])
        output_tensor = torch.empty(shape, dtype=input_tensor.dtype, device=input_tensor.device)
        return torch.addmm(self.bias, input_tensor, self.weight, out=output_tensor)


class LNWeight(nn.Module):
    def __init__(self, dim, eps=1e-6, affine=False):
        super().__init__()
        self.eps, self.dim = eps, dim
        self.weight = nn.Parameter(torch.ones(dim)) if affine else None
        self.bias = nn.Parameter(torch.zeros(dim)) if affine else None

    def apply(self, input_tensor):
        return F.layer_norm(input_tensor, (self.dim,), self.weight, self.bias, self.eps)


class RMSWeight(nn.Module):
    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def apply(self, input_tensor):
        input_tensor = input_tensor * torch.rsqrt(input_tensor.pow(2).mean(-1, keepdim=True) + self.eps)
        return input_tensor * self.weight


class TensorWeight(nn.Module):
    def __init__(self, *shape):
        super().__init__()
        self.tensor = nn.Parameter(torch.randn(*shape) / shape[-1] ** 0.5)


class LightWanTransformerAttentionBlock(nn.Module):
    """The weights of one block (LightX2V's WanTransformerAttentionBlock)."""

    def __init__(self, dim, ffn_dim, eps=1e-6):
        super().__init__()
        self.modulation = TensorWeight(1, 6, dim)
        self.norm1 = LNWeight(dim, eps)
        self.self_attn_q, self.self_attn_k = MMWeight(dim, dim), MMWeight(dim, dim)
        self.self_attn_v, self.self_attn_o = MMWeight(dim, dim), MMWeight(dim, dim)
        self.self_attn_norm_q, self.self_attn_norm_k = RMSWeight(dim, eps), RMSWeight(dim, eps)
        self.norm3 = LNWeight(dim, eps, affine=True)
        self.cross_attn_q, self.cross_attn_k = MMWeight(dim, dim), MMWeight(dim, dim)
        self.cross_attn_v, self.cross_attn_o = MMWeight(dim, dim), MMWeight(dim, dim)
        self.cross_attn_norm_q, self.cross_attn_norm_k = RMSWeight(dim, eps), RMSWeight(dim, eps)
        self.norm2 = LNWeight(dim, eps)
        self.ffn_0, self.ffn_2 = MMWeight(dim, ffn_dim), MMWeight(ffn_dim, dim)


def lightx2v_compute_freqs(c, grid_sizes, freqs):
    f, h, w = grid_sizes
    freqs = freqs.split([c - 2 * (c // 3), c // 3, c // 3], dim=1)
    seq_len = f * h * w
    freqs_i = torch.cat([
        freqs[0][:f].view(f, 1, 1, -1).expand(f, h, w, -1),
        freqs[1][:h].view(1, h, 1, -1).expand(f, h, w, -1),
        freqs[2][:w].view(1, 1, w, -1).expand(f, h, w, -1),
    ], dim=-1).reshape(seq_len, 1, -1)
    return freqs_i


def lightx2v_apply_rotary_emb(x, freqs_i):
    """Complex rope in fp32: x [L, N, D], freqs_i complex64 [L, 1, D/2]."""
    n = x.size(1)
    seq_len = freqs_i.size(0)
    x_i = torch.view_as_complex(x[:seq_len].to(torch.float32).reshape(seq_len, n, -1, 2))
    x_i = torch.view_as_real(x_i * freqs_i).flatten(2)
    return torch.cat([x_i, x[seq_len:]]).to(x.dtype)


def lightx2v_apply_rotary_emb_real(x, cos_sin):
    """A real rope, strided writes into an empty tensor: x [L, N, D], cos, sin [L, 1, D/2]."""
    cos, sin = cos_sin
    a, b = x[..., 0::2], x[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = a * cos - b * sin
    out[..., 1::2] = a * sin + b * cos
    return out


def lightx2v_sdpa(q, k, v):
    """TorchSDPAWeight.apply: [L, N, D] -> [L, N*D]."""
    q, k, v = (t.unsqueeze(0).transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v)
    return out.transpose(1, 2).reshape(out.shape[2], -1)


class LightWanTransformerInfer(nn.Module):
    """One block's inference (LightX2V's WanTransformerInfer.infer_block and its phases).
    An nn.Module that owns its block's weights, so the module path of its sites is the block's."""

    def __init__(self, dim, ffn_dim, num_heads, eps=1e-6, real_rope=False):
        super().__init__()
        self.weights = LightWanTransformerAttentionBlock(dim, ffn_dim, eps)
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.real_rope = real_rope

    def forward(self, x, embed0, freqs, context):
        return self.infer_block(self.weights, x, embed0, freqs, context)

    def infer_block(self, weights, x, embed0, freqs, context):
        shift_msa, scale_msa, gate_msa, c_shift_msa, c_scale_msa, c_gate_msa = self.infer_modulation(weights, embed0)
        y_out = self.infer_self_attn(weights, x, shift_msa, scale_msa, freqs)
        x = x + y_out * gate_msa.squeeze(0)
        x = self.infer_cross_attn(weights, x, context)
        y = self.infer_ffn(weights, x, c_shift_msa, c_scale_msa)
        x = x + y * c_gate_msa.squeeze(0)
        return x

    def infer_modulation(self, weights, embed0):
        return (weights.modulation.tensor + embed0).chunk(6, dim=1)

    def infer_self_attn(self, weights, x, shift_msa, scale_msa, freqs):
        s, n, d = x.shape[0], self.num_heads, self.head_dim
        norm1_out = weights.norm1.apply(x)
        norm1_out = norm1_out * (1 + scale_msa.squeeze(0)) + shift_msa.squeeze(0)
        q = weights.self_attn_norm_q.apply(weights.self_attn_q.apply(norm1_out)).view(s, n, d)
        k = weights.self_attn_norm_k.apply(weights.self_attn_k.apply(norm1_out)).view(s, n, d)
        v = weights.self_attn_v.apply(norm1_out).view(s, n, d)
        if self.real_rope:
            q, k = lightx2v_apply_rotary_emb_real(q, freqs), lightx2v_apply_rotary_emb_real(k, freqs)
        else:
            q, k = lightx2v_apply_rotary_emb(q, freqs), lightx2v_apply_rotary_emb(k, freqs)
        attn_out = lightx2v_sdpa(q, k, v)
        return weights.self_attn_o.apply(attn_out)

    def infer_cross_attn(self, weights, x, context):
        n, d = self.num_heads, self.head_dim
        norm3_out = weights.norm3.apply(x)
        q = weights.cross_attn_norm_q.apply(weights.cross_attn_q.apply(norm3_out)).view(-1, n, d)
        k = weights.cross_attn_norm_k.apply(weights.cross_attn_k.apply(context)).view(-1, n, d)
        v = weights.cross_attn_v.apply(context).view(-1, n, d)
        attn_out = lightx2v_sdpa(q, k, v)
        return x + weights.cross_attn_o.apply(attn_out)

    def infer_ffn(self, weights, x, c_shift_msa, c_scale_msa):
        norm2_out = weights.norm2.apply(x)
        y = weights.ffn_0.apply(norm2_out * (1 + c_scale_msa.squeeze(0)) + c_shift_msa.squeeze(0))
        y = F.gelu(y, approximate="tanh")
        return weights.ffn_2.apply(y)


class LightWanPostInfer(nn.Module):
    """The head (LightX2V's WanPostInfer with its weights)."""

    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.head_modulation = TensorWeight(1, 2, dim)
        self.norm = LNWeight(dim, eps)
        self.head = MMWeight(dim, IN_CH * math.prod(PATCH))

    def forward(self, x, embed):
        e = (self.head_modulation.tensor + embed.unsqueeze(1)).chunk(2, dim=1)
        x = self.norm.apply(x)
        x = x * (1 + e[1].squeeze(0)) + e[0].squeeze(0)
        return self.head.apply(x)


class LightWanModel(nn.Module):
    """Batch 1, as LightX2V runs: activations [tokens, dim]."""

    def __init__(self, num_layers=2, dim=DIM, ffn_dim=FFN, num_heads=HEADS, eps=1e-6, real_rope=False):
        super().__init__()
        self.dim, self.num_heads, self.real_rope = dim, num_heads, real_rope
        self.patch_embedding = nn.Conv3d(IN_CH, dim, kernel_size=PATCH, stride=PATCH)
        self.text_embedding_0, self.text_embedding_2 = MMWeight(TEXT_DIM, dim), MMWeight(dim, dim)
        self.time_embedding_0, self.time_embedding_2 = MMWeight(FREQ_DIM, dim), MMWeight(dim, dim)
        self.time_projection_1 = MMWeight(dim, 6 * dim)
        self.blocks = nn.ModuleList([LightWanTransformerInfer(dim, ffn_dim, num_heads, eps, real_rope)
                                     for _ in range(num_layers)])
        self.post_infer = LightWanPostInfer(dim, eps)
        d = dim // num_heads
        self.freqs = torch.cat([wan_rope_params(1024, d - 4 * (d // 6)), wan_rope_params(1024, 2 * (d // 6)),
                                wan_rope_params(1024, 2 * (d // 6))], dim=1)

    def forward(self, x, t, context):
        x = self.patch_embedding(x.unsqueeze(0))
        grid_sizes = tuple(x.shape[2:])
        x = x.flatten(2).transpose(1, 2).squeeze(0)
        embed = wan_sinusoidal_embedding_1d(FREQ_DIM, t.flatten()).to(x.dtype)
        embed = self.time_embedding_2.apply(F.silu(self.time_embedding_0.apply(embed)))
        embed0 = self.time_projection_1.apply(F.silu(embed)).unflatten(1, (6, self.dim))
        context = self.text_embedding_0.apply(context)
        context = self.text_embedding_2.apply(F.gelu(context, approximate="tanh"))
        freqs_i = lightx2v_compute_freqs(self.dim // self.num_heads // 2, grid_sizes, self.freqs.to(x.device))
        if self.real_rope:
            freqs_i = (freqs_i.real.to(torch.float32), freqs_i.imag.to(torch.float32))
        else:
            freqs_i = freqs_i.to(torch.complex64)
        for block in self.blocks:
            x = block(x, embed0, freqs_i, context)
        x = self.post_infer(x, embed)
        f, h, w = grid_sizes
        x = x.view(f, h, w, *PATCH, IN_CH).permute(6, 0, 3, 1, 4, 2, 5)
        return x.reshape(IN_CH, f * PATCH[0], h * PATCH[1], w * PATCH[2])


def wan_lightx2v(num_layers: int = 2, dtype=torch.float32, batch: int = 1, seed: int = 0, frames: int = 2,
                 height: int = 4, width: int = 4, text: int = 5, real_rope: bool = False):
    assert batch == 1, "LightX2V runs one sample ([tokens, dim] activations)"
    torch.manual_seed(seed)
    model = LightWanModel(num_layers, real_rope=real_rope).to(dtype).eval()
    return model, dict(x=torch.randn(IN_CH, frames, height, width, dtype=dtype), t=_timestep(1),
                       context=torch.randn(text, TEXT_DIM, dtype=dtype))


def wan_lightx2v_real(num_layers: int = 2, dtype=torch.float32, **kw):
    return wan_lightx2v(num_layers, dtype, real_rope=True, **kw)


# ============================================================================ a plain DiT, other spellings
def rotate_half_chunk(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rotate_half_slice(x):
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def rope_neox(x, cos, sin, rotate_half):
    """cos, sin: [L, D] (the half table repeated: `cat((freqs, freqs), -1)`)."""
    return x * cos + rotate_half(x) * sin


def rope_interleaved(x, cos, sin):
    """cos, sin: [L, D] (each frequency twice: `repeat_interleave(2, -1)`)."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = cos[..., 0::2], sin[..., 1::2]
    return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)


def rope_real_unbind(x, cos, sin):
    """diffusers' own spelling (apply_rotary_emb, use_real_unbind_dim=-1); cos, sin: [L, D]
    with each frequency twice."""
    x_real, x_imag = x.reshape(*x.shape[:-1], -1, 2).unbind(-1)
    x_rotated = torch.stack([-x_imag, x_real], dim=-1).flatten(3)
    return (x.float() * cos + x_rotated.float() * sin).to(x.dtype)


def rope_kandinsky(x, rope):
    """Kandinsky 5: rope [L, D/2, 2, 2] rotation matrices, computed in fp32, rounded to bf16."""
    x_ = x.reshape(*x.shape[:-1], -1, 1, 2).to(torch.float32)
    x_out = (rope * x_).sum(dim=-1)
    return x_out.reshape(*x.shape).to(torch.bfloat16)


def rope_allegro(x, tables, positions):
    """Allegro: one 1-D rope per axis on thirds of head_dim, tables gathered by position."""
    def apply_1d_rope(tokens, pos, cos, sin):
        cos = F.embedding(pos, cos)[:, None, :, :]
        sin = F.embedding(pos, sin)[:, None, :, :]
        x1, x2 = tokens[..., : tokens.shape[-1] // 2], tokens[..., tokens.shape[-1] // 2:]
        tokens_rotated = torch.cat((-x2, x1), dim=-1)
        return (tokens.float() * cos + tokens_rotated.float() * sin).to(tokens.dtype)

    (t_cos, t_sin), (h_cos, h_sin), (w_cos, w_sin) = tables
    t, h, w = x.chunk(3, dim=-1)
    t = apply_1d_rope(t, positions[0], t_cos, t_sin)
    h = apply_1d_rope(h, positions[1], h_cos, h_sin)
    w = apply_1d_rope(w, positions[2], w_cos, w_sin)
    return torch.cat([t, h, w], dim=-1)


class PlainAttention(nn.Module):
    def __init__(self, dim, heads, qk_norm=True, rope=None, graph_break=False, kandinsky=False):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.rope, self.graph_break, self.kandinsky = rope, graph_break, kandinsky
        self.to_q, self.to_k, self.to_v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.to_out = nn.Linear(dim, dim)
        self.q_norm = nn.RMSNorm(self.head_dim, eps=1e-6) if qk_norm else None
        self.k_norm = nn.RMSNorm(self.head_dim, eps=1e-6) if qk_norm else None

    def forward(self, x, context=None, rope=None):
        b, n, _ = x.shape
        ctx = x if context is None else context
        q = self.to_q(x).view(b, n, self.heads, self.head_dim).transpose(1, 2)
        k = self.to_k(ctx).view(b, ctx.shape[1], self.heads, self.head_dim).transpose(1, 2)
        v = self.to_v(ctx).view(b, ctx.shape[1], self.heads, self.head_dim).transpose(1, 2)
        if self.q_norm is not None:
            if self.kandinsky:  # Kandinsky 5 normalises in fp32 and casts back
                q = self.q_norm(q.float()).type_as(q)
                k = self.k_norm(k.float()).type_as(k)
            else:
                q, k = self.q_norm(q), self.k_norm(k)
        if self.graph_break and q.detach().abs().amax().item() > 6.0e4:  # a debug check: .item() ends the graph
            warnings.warn("q would overflow fp16")
        if rope is not None:
            if self.rope == "chunk":
                q, k = rope_neox(q, *rope, rotate_half_chunk), rope_neox(k, *rope, rotate_half_chunk)
            elif self.rope == "slice":
                q, k = rope_neox(q, *rope, rotate_half_slice), rope_neox(k, *rope, rotate_half_slice)
            elif self.rope == "interleaved":
                q, k = rope_interleaved(q, *rope), rope_interleaved(k, *rope)
            elif self.rope == "diffusers":
                q, k = rope_real_unbind(q, *rope), rope_real_unbind(k, *rope)
            elif self.rope == "kandinsky":
                q, k = rope_kandinsky(q, rope), rope_kandinsky(k, rope)
            elif self.rope == "allegro":
                q, k = rope_allegro(q, *rope), rope_allegro(k, *rope)
            else:
                raise ValueError(self.rope)
        out = F.scaled_dot_product_attention(q, k, v.to(q.dtype))
        return self.to_out(out.transpose(1, 2).reshape(b, n, -1).to(x.dtype))


def modulate(x, shift, scale):
    return x * (1 + scale) + shift


class PlainBlock(nn.Module):
    """adaLN-Zero (DiT) block: self-attention with rope, cross-attention, tanh-GELU MLP.
    `modulation`: "shift_scale" `norm(x) * (1 + scale) + shift`; "scale_only" RMSNorms and
    `norm(x) * (1 + scale)` with tanh gates (Lumina2); "scale_first" `(1 + scale) * norm(x) +
    shift` (FLUX.2); "twice": norm1's output modulated twice, the second for the cross-attention
    (SD3.5's AdaLayerNormZeroX); "kandinsky" `norm(x) * (scale + 1.0) + shift`."""

    def __init__(self, dim, heads, rope, modulation="shift_scale", qk_norm=True, graph_break=False):
        super().__init__()
        self.modulation = modulation
        kandinsky = rope == "kandinsky"
        if modulation == "scale_only":
            self.norm1 = nn.RMSNorm(dim, eps=1e-6)
            self.norm3 = nn.RMSNorm(dim, eps=1e-6)
        else:
            self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
            self.norm3 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = PlainAttention(dim, heads, qk_norm, rope, graph_break, kandinsky)
        if modulation != "twice":
            self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.cross_attn = PlainAttention(dim, heads, qk_norm, kandinsky=kandinsky)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(approximate="tanh"), nn.Linear(2 * dim, dim))
        chunks = {"scale_only": 4, "twice": 8}.get(modulation, 6)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, chunks * dim))

    def forward(self, x, c, context, rope):
        mod = self.adaLN_modulation(c).unsqueeze(1)
        if self.modulation == "scale_only":
            scale_msa, gate_msa, scale_mlp, gate_mlp = mod.chunk(4, dim=-1)
            x = x + gate_msa.tanh() * self.attn(self.norm1(x) * (1 + scale_msa), rope=rope)
            x = x + self.cross_attn(self.norm2(x), context=context)
            x = x + gate_mlp.tanh() * self.mlp(self.norm3(x) * (1 + scale_mlp))
            return x
        if self.modulation == "twice":
            shift_msa, scale_msa, gate_msa, shift_msa2, scale_msa2, gate_msa2, shift_mlp, scale_mlp = mod.chunk(8, -1)
            norm_x = self.norm1(x)
            attn_in = norm_x * (1 + scale_msa) + shift_msa
            cross_in = norm_x * (1 + scale_msa2) + shift_msa2
            x = x + gate_msa * self.attn(attn_in, rope=rope)
            x = x + gate_msa2 * self.cross_attn(cross_in, context=context)
            return x + self.mlp(modulate(self.norm3(x), shift_mlp, scale_mlp))
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod.chunk(6, dim=-1)
        if self.modulation == "scale_first":
            x = x + gate_msa * self.attn((1 + scale_msa) * self.norm1(x) + shift_msa, rope=rope)
            x = x + self.cross_attn(self.norm2(x), context=context)
            return x + gate_mlp * self.mlp((1 + scale_mlp) * self.norm3(x) + shift_mlp)
        if self.modulation == "kandinsky":
            x = x + gate_msa * self.attn(self.norm1(x) * (scale_msa + 1.0) + shift_msa, rope=rope)
            x = x + self.cross_attn(self.norm2(x), context=context)
            return x + gate_mlp * self.mlp(self.norm3(x) * (scale_mlp + 1.0) + shift_mlp)
        x = x + gate_msa * self.attn(modulate(self.norm1(x), shift_msa, scale_msa), rope=rope)
        x = x + self.cross_attn(self.norm2(x), context=context)
        return x + gate_mlp * self.mlp(modulate(self.norm3(x), shift_mlp, scale_mlp))


class PlainDiT(nn.Module):
    """A DiT as a newcomer writes it: tokens in, tokens out; 1-D positions (3-D for Allegro)."""

    def __init__(self, num_layers=2, dim=DIM, heads=HEADS, rope="chunk", modulation="shift_scale", qk_norm=True,
                 graph_break=False, block_keys=None):
        super().__init__()
        self.dim, self.heads, self.head_dim, self.rope = dim, heads, dim // heads, rope
        self.x_embedder = nn.Linear(IN_CH, dim)
        self.t_embedder = nn.Sequential(nn.Linear(FREQ_DIM, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.context_embedder = nn.Linear(TEXT_DIM, dim)
        blocks = [PlainBlock(dim, heads, rope, modulation, qk_norm, graph_break) for _ in range(num_layers)]
        if block_keys is None:
            self.blocks = nn.ModuleList(blocks)
        else:
            self.blocks = nn.ModuleDict({key: blk for key, blk in zip(block_keys, blocks)})
        self.modulation = modulation
        if modulation == "scale_only":
            self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
            self.adaLN_final = nn.Sequential(nn.SiLU(), nn.Linear(dim, dim))
        else:
            self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
            self.adaLN_final = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))
        self.proj_out = nn.Linear(dim, IN_CH)
        d = self.head_dim
        if rope == "allegro":
            third = d // 3
            self.register_buffer("axis_inv_freq", 1.0 / (10000 ** (torch.arange(0, third, 2).float() / third)),
                                 persistent=False)
        else:
            self.register_buffer("inv_freq", 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d)), persistent=False)

    def timestep_embedding(self, t):
        half = FREQ_DIM // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t[:, None].float() * freqs[None]
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)

    def rope_tables(self, n, device, grid=None):
        if self.rope == "allegro":
            f, h, w = grid
            tables = []
            for size in (f, h, w):
                ang = torch.outer(torch.arange(size, device=device).float(), self.axis_inv_freq)
                ang = torch.cat((ang, ang), dim=-1)
                tables.append((ang.cos(), ang.sin()))
            pos = torch.stack(torch.meshgrid(torch.arange(f, device=device), torch.arange(h, device=device),
                                             torch.arange(w, device=device), indexing="ij")).flatten(1)
            return tables, pos[:, None, :]  # positions [3, 1 (batch), L]
        ang = torch.outer(torch.arange(n, device=device).float(), self.inv_freq)
        if self.rope == "kandinsky":
            rope = torch.stack([ang.cos(), -ang.sin(), ang.sin(), ang.cos()], dim=-1)
            return rope.view(n, -1, 2, 2)
        if self.rope in ("interleaved", "diffusers"):
            ang = ang.repeat_interleave(2, dim=-1)
        else:
            ang = torch.cat((ang, ang), dim=-1)
        return ang.cos(), ang.sin()

    def forward(self, x, timestep, context, grid=None):
        rope = self.rope_tables(x.shape[1], x.device, grid)
        x = self.x_embedder(x)
        c = self.t_embedder(self.timestep_embedding(timestep).to(x.dtype))
        context = self.context_embedder(context)
        blocks = self.blocks.values() if isinstance(self.blocks, nn.ModuleDict) else self.blocks
        for block in blocks:
            x = block(x, c, context, rope)
        if self.modulation == "scale_only":
            x = self.norm_final(x) * (1 + self.adaLN_final(c).unsqueeze(1))
        else:
            shift, scale = self.adaLN_final(c).unsqueeze(1).chunk(2, dim=-1)
            x = modulate(self.norm_final(x), shift, scale)
        return self.proj_out(x)


def _plain(num_layers=2, dtype=torch.float32, batch=1, seed=0, tokens=8, text=5, dim=DIM, grid=None, **cfg):
    torch.manual_seed(seed)
    model = PlainDiT(num_layers, dim=dim, **cfg).to(dtype).eval()
    kwargs = dict(x=torch.randn(batch, tokens, IN_CH, dtype=dtype), timestep=_timestep(batch),
                  context=torch.randn(batch, text, TEXT_DIM, dtype=dtype))
    if grid is not None:
        kwargs["grid"] = grid
    return model, kwargs


def plain_chunk(num_layers=2, dtype=torch.float32, **kw):
    return _plain(num_layers, dtype, rope="chunk", **kw)


def plain_slice(num_layers=2, dtype=torch.float32, **kw):
    return _plain(num_layers, dtype, rope="slice", **kw)


def plain_interleaved(num_layers=2, dtype=torch.float32, **kw):
    return _plain(num_layers, dtype, rope="interleaved", **kw)


def lumina_scale_only(num_layers=2, dtype=torch.float32, **kw):
    return _plain(num_layers, dtype, rope="interleaved", modulation="scale_only", **kw)


def flux2_scale_first(num_layers=2, dtype=torch.float32, **kw):
    return _plain(num_layers, dtype, rope="interleaved", modulation="scale_first", **kw)


def sd35_twice(num_layers=2, dtype=torch.float32, **kw):
    return _plain(num_layers, dtype, rope="chunk", modulation="twice", **kw)


def kandinsky5_bf16(num_layers=2, dtype=torch.bfloat16, **kw):
    """Kandinsky 5's rope always rounds to bf16: the model runs in bf16, its q/k norms in fp32."""
    model, kwargs = _plain(num_layers, dtype, rope="kandinsky", modulation="kandinsky", **kw)
    for name, module in model.named_modules():
        if name.endswith(("q_norm", "k_norm")):
            module.float()
    return model, kwargs


def allegro_axes(num_layers=2, dtype=torch.float32, **kw):
    """No q/k norm; head_dim 12 (thirds of 4); an 2x2x2 token grid."""
    kw.setdefault("tokens", 8)
    return _plain(num_layers, dtype, rope="allegro", qk_norm=False, dim=24, grid=(2, 2, 2), **kw)


def plain_graph_break(num_layers=2, dtype=torch.float32, **kw):
    return _plain(num_layers, dtype, rope="interleaved", graph_break=True, **kw)


def plain_moduledict(num_layers=2, dtype=torch.float32, **kw):
    """Only the keys are wild: the rope is diffusers' own spelling."""
    return _plain(num_layers, dtype, rope="diffusers", block_keys=[f"2-{i + 1}" for i in range(num_layers)], **kw)


WILD_MODELS: dict[str, Callable] = {
    "wan-sglang": wan_sglang,
    "wan-comfyui": wan_comfyui,
    "wan-comfyui-ropesum": wan_comfyui_ropesum,
    "wan-official": wan_official,
    "wan-diffsynth": wan_diffsynth,
    "wan-lightx2v": wan_lightx2v,
    "wan-lightx2v-real": wan_lightx2v_real,
    "plain-chunk": plain_chunk,
    "plain-slice": plain_slice,
    "plain-interleaved": plain_interleaved,
    "lumina-scale-only": lumina_scale_only,
    "flux2-scale-first": flux2_scale_first,
    "sd35-twice": sd35_twice,
    "kandinsky5-bf16": kandinsky5_bf16,
    "allegro-axes": allegro_axes,
    "plain-graph-break": plain_graph_break,
    "plain-moduledict": plain_moduledict,
}

WAN_STYLE = tuple(name for name in WILD_MODELS if name.startswith("wan-"))


def first_tensor(out):
    """The output tensor of a wild model (official Wan returns a list of videos)."""
    while isinstance(out, (list, tuple)):
        out = out[0]
    return out
