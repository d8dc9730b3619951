"""Helpers for tests that start a process group on this machine (gloo on CPU)."""
from __future__ import annotations

import socket


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago, for MASTER_PORT."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def lse_merge(prev_out, prev_lse, out, lse):
    """diffusers' ring-attention merge of two partial attention results over disjoint key
    sets, by their logsumexp (`lse` with a trailing 1): the (out, lse) of attention over
    both; `prev_out is None` starts the merge."""
    import torch
    import torch.nn.functional as F

    if prev_out is None:
        return out, lse
    return prev_out - torch.sigmoid(lse - prev_lse) * (prev_out - out), prev_lse - F.logsigmoid(prev_lse - lse)


def ring_attention_cpu(q, k, v, shards: int = 2):
    """Ring attention on one process: SDPA (the CPU flash op, which returns the logsumexp)
    over `shards` key/value chunks, merged by `lse_merge`; fp32 output."""
    import torch

    out = lse = None
    for ks, vs in zip(k.chunk(shards, dim=2), v.chunk(shards, dim=2)):
        o, l = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, ks, vs)[:2]
        out, lse = lse_merge(out, lse, o.float(), l.unsqueeze(-1))
    return out
