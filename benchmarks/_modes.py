"""The compile modes the step benchmarks alternate, and the fair peer for attention.

- eager; inductor (regional);
- inductor+<kernel>: Inductor regional with attention routed by hand to the kernel difffuse
  picks, the way a user of diffusers' attention backends gets it: a backend function
  registered in diffusers' registry (`_AttentionBackendRegistry`, under an enum slot this
  process does not otherwise use) that calls the kernel through an op Dynamo does not
  trace into (difffuse's own `difffuse::flash_attention` op, so the kernel call is the
  same one); masked / dropout / GQA calls fall back to SDPA as diffusers' backends do;
- difffuse-attn: difffuse with every family but attention (the fusions alone);
- difffuse: the default (fusions + attention routing).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from difffuse.families import DEFAULTS


@dataclasses.dataclass(frozen=True)
class Mode:
    name: str
    backend: Optional[str] = None  # None: eager
    options: Optional[dict] = None
    hand_routed: Optional[str] = None  # the kernel diffusers' backend registry routes to


def routed_kernel() -> Optional[str]:
    """The kernel difffuse picks for a bf16 [*, *, *, 128] call on this GPU (None: none)."""
    from difffuse.lowering import flash_attention as fa
    from difffuse.lowering.sites import AttentionSite, TensorSpec

    q = torch.empty(1, 4096, 12, 128, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
    return fa.choose(AttentionSite(*(TensorSpec.of(q),) * 3, None, False, False))[0]


def modes(peer: bool = True) -> list[Mode]:
    out = [Mode("eager"), Mode("inductor", "inductor")]
    kernel = routed_kernel()
    if peer and kernel:
        out.append(Mode(f"inductor+{kernel}", "inductor", hand_routed=kernel))
    out.append(Mode("difffuse-attn", "difffuse", {"patterns": [p for p in DEFAULTS if p != "attention"]}))
    out.append(Mode("difffuse", "difffuse"))
    return out


def compiled(blocks: nn.ModuleList, mode: Mode) -> nn.ModuleList:
    """What compile_repeated_blocks does, as a separate ModuleList sharing the weights."""
    if mode.backend is None:
        return blocks
    if mode.hand_routed:
        # Inductor under another backend object: Dynamo keeps a separate compiled entry
        # (its backend guard), so the routed trace is not served the plain-Inductor one
        # (Dynamo puts no guard on diffusers' active attention backend)
        from torch._inductor.compile_fx import compile_fx

        return nn.ModuleList(torch.compile(b, backend=compile_fx) for b in blocks)
    return nn.ModuleList(torch.compile(b, backend=mode.backend, options=mode.options) for b in blocks)


@functools.lru_cache(None)  # one function per kernel: Dynamo guards on its identity
def _backend_fn(kernel: str):
    def attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                  enable_gqa=False, return_lse=False, _parallel_config=None):
        # diffusers' backends take and return [B, L, H, D]
        q, k, v = (t.transpose(1, 2) for t in (query, key, value))
        if attn_mask is not None or dropout_p or enable_gqa or q.dtype not in (torch.float16, torch.bfloat16):
            out = F.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal, scale=scale,
                                                 enable_gqa=enable_gqa)
            return out.transpose(1, 2)
        out, lse = torch.ops.difffuse.flash_attention(q, k, v, scale, is_causal, kernel)
        return (out.transpose(1, 2), lse.transpose(1, 2)) if return_lse else out.transpose(1, 2)
    return attention


@contextlib.contextmanager
def entered(mode: Mode):
    """Run the block with the mode's attention routing (diffusers' registry is global)."""
    if mode.hand_routed is None:
        yield
        return
    import inspect

    from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry as reg

    slot = AttentionBackendName._FLASH_3
    saved = (reg._backends.get(slot), reg._constraints.get(slot), reg._supported_arg_names.get(slot),
             reg._active_backend)
    fn = _backend_fn(mode.hand_routed)
    reg._backends[slot], reg._constraints[slot] = fn, []
    reg._supported_arg_names[slot] = set(inspect.signature(fn).parameters)
    reg.set_active_backend(slot)
    try:
        yield
    finally:
        reg._backends[slot], reg._constraints[slot], reg._supported_arg_names[slot] = saved[:3]
        reg.set_active_backend(saved[3])
