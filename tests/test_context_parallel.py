"""Context parallel graphs on CPU (diffusers' enable_parallelism needs an accelerator): a
2-process gloo group and, on one rank, the graphs that Ulysses and ring attention make.

The prologue: the rank's sequence shard of q/k, its slice of the rope tables, the norm
across heads and the Wan rope, then the functional collectives (all-to-all: sequence
gathered, heads scattered; all-gather of k for ring). The same matches as on one
process, output equal to eager.

The attention itself, written the way diffusers 0.42's `attention_dispatch` writes it
(`TemplatedUlyssesAttention` / `TemplatedRingAttention`, with `_all_to_all_single` and
`_wait_tensor`), compiled with the default families:
  - Ulysses: all-to-all q/k/v to [B, S, H/W, D], `F.scaled_dot_product_attention` on
    [B, H, S, D] views (the native backend), all-to-all back. The SDPA call is rewritten
    to `difffuse::attention`: one match in one graph, no miss; output equal to eager and
    to single-process attention over the whole sequence, for this rank's shard.
  - Ring: all-gather of the k/v buffer, then per shard the attention op that returns its
    logsumexp (on CPU `aten._scaled_dot_product_flash_attention_for_cpu`, where the
    native-flash backend calls `aten._scaled_dot_product_flash_attention`), merged by lse:
    out = prev_out - sigmoid(lse - prev_lse) * (prev_out - out),
    lse = prev_lse - logsigmoid(prev_lse - lse).
    Every one of the W calls is rewritten to `difffuse::attention`, and the merge reads
    the op's own lse, in the layout the node had (the [B, S, H] transpose diffusers reads):
    W matches, no miss; output and lse equal to eager and to attention over all keys."""
from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as fc
import torch.multiprocessing as mp
import torch.nn.functional as F

from difffuse.testing.distributed import free_port, lse_merge

WORLD, HEADS, HD, SEQ = 2, 4, 8, 10  # SEQ tokens per rank
aten = torch.ops.aten


def wan_rope(x, cos, sin):
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    c, s = cos[..., 0::2], sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * c - x2 * s
    out[..., 1::2] = x1 * s + x2 * c
    return out.type_as(x)


class Prologue(torch.nn.Module):
    """Wan self-attention up to the attention call, on one rank's sequence shard."""

    def __init__(self, ring: bool):
        super().__init__()
        d = HEADS * HD
        self.ring = ring
        self.norm_q, self.norm_k = torch.nn.RMSNorm(d, eps=1e-6), torch.nn.RMSNorm(d, eps=1e-6)

    def forward(self, q, k, cos, sin):
        q = wan_rope(self.norm_q(q).unflatten(2, (HEADS, -1)), cos, sin)
        k = wan_rope(self.norm_k(k).unflatten(2, (HEADS, -1)), cos, sin)
        group = dist.group.WORLD
        if self.ring:  # ring: every rank sees all keys in turn (all-gather along the sequence)
            return q, fc.all_gather_tensor(k.contiguous(), 1, group)
        # Ulysses: [B, S/W, H, D] -> [B, S, H/W, D] (all-to-all over a head-major layout)
        out = []
        for t in (q, k):
            b, s, h, d = t.shape
            t = t.reshape(b, s, WORLD, h // WORLD, d).permute(2, 0, 1, 3, 4).contiguous()
            t = fc.all_to_all_single(t, None, None, group)
            out.append(t.reshape(WORLD, b, s, h // WORLD, d).permute(1, 0, 2, 3, 4).flatten(1, 2))
        return tuple(out)


# ---- the attention of context parallelism, as diffusers' attention_dispatch writes it
def _wait_tensor(t):
    if isinstance(t, fc.AsyncCollectiveTensor):
        t = t.wait()
    return t


def _all_to_all_single(x):
    shape = x.shape
    x = fc.all_to_all_single(x.flatten(), None, None, dist.group.WORLD)
    return _wait_tensor(x.reshape(shape))


def ulysses_attention(query, key, value):
    """TemplatedUlyssesAttention.forward with the native (F.scaled_dot_product_attention) op."""
    b, s_local, h, d = query.shape
    h_local = h // WORLD
    query, key, value = (x.reshape(b, s_local, WORLD, h_local, d).permute(2, 1, 0, 3, 4).contiguous()
                         for x in (query, key, value))
    query, key, value = (_all_to_all_single(x) for x in (query, key, value))
    query, key, value = (x.flatten(0, 1).permute(1, 0, 2, 3).contiguous() for x in (query, key, value))
    # _native_attention_forward_op
    out = F.scaled_dot_product_attention(*(x.permute(0, 2, 1, 3) for x in (query, key, value)))
    out = out.permute(0, 2, 1, 3)
    out = out.reshape(b, WORLD, s_local, h_local, d).permute(1, 3, 0, 2, 4).contiguous()
    out = _all_to_all_single(out)
    return out.flatten(0, 1).permute(1, 2, 0, 3).contiguous()


def flash_forward(query, key, value):
    """_native_flash_attention_forward_op with return_lse, the CPU flash op in place of the CUDA one."""
    q, k, v = (x.transpose(1, 2).contiguous() for x in (query, key, value))
    out, lse = aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, dropout_p=0.0, is_causal=False)
    return out.transpose(1, 2).contiguous(), lse.transpose(1, 2).contiguous()


class RingAttention(torch.nn.Module):
    """TemplatedRingAttention.forward (convert_to_fp32, return_lse) with flash_forward."""

    def __init__(self, rank: int):
        super().__init__()
        self.rank = rank

    def forward(self, query, key, value):
        next_rank = (self.rank + 1) % WORLD
        prev_out = prev_lse = None
        kv_buffer = torch.cat([key.flatten(), value.flatten()]).contiguous()
        kv_buffer = _wait_tensor(fc.all_gather_tensor(kv_buffer, 0, dist.group.WORLD)).chunk(WORLD)
        for i in range(WORLD):
            if i > 0:
                kv = kv_buffer[next_rank]
                key_numel = key.numel()
                key = kv[:key_numel].reshape_as(key)
                value = kv[key_numel:].reshape_as(value)
                next_rank = (next_rank + 1) % WORLD
            out, lse = flash_forward(query, key, value)
            out, lse = out.to(torch.float32), lse.to(torch.float32)
            if lse.ndim == 3:
                lse = lse.unsqueeze(-1)
            prev_out, prev_lse = out, lse = lse_merge(prev_out, prev_lse, out, lse)
        return out.to(query.dtype), lse.squeeze(-1)


def _compile(fn, args, **options):
    torch._dynamo.reset()
    import difffuse

    difffuse.reset_report()
    with torch.no_grad():
        out = torch.compile(fn, backend="difffuse", fullgraph=True,
                            options={"lowering": "reference", **options})(*args)
    return out, difffuse.report()


def worker(rank: int, port: int, tests_dir: str) -> None:
    sys.path.insert(0, tests_dir)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    import difffuse
    from conftest import assert_close

    torch.manual_seed(0)  # same full tensors on both ranks; each keeps its sequence shard
    q, k = torch.randn(2, WORLD * SEQ, HEADS * HD), torch.randn(2, WORLD * SEQ, HEADS * HD)
    ang = torch.rand(1, WORLD * SEQ, 1, HD // 2) * 6.28
    cos, sin = ang.cos().repeat_interleave(2, -1), ang.sin().repeat_interleave(2, -1)
    shard = [t.tensor_split(WORLD, 1)[rank].contiguous() for t in (q, k, cos, sin)]
    for ring in (False, True):
        torch.manual_seed(1)
        m = Prologue(ring).eval()
        with torch.no_grad():
            ref = m(*shard)
            torch._dynamo.reset()
            difffuse.reset_report()
            out = torch.compile(m, backend="difffuse", options={"lowering": "reference"})(*shard)
        rep = difffuse.report()
        assert rep.matches() == {"qk_norm_rope": 2} and rep.misses == [], (ring, str(rep))
        for o, r in zip(out, ref):
            assert_close(o, r)

    # attention: full q/k/v [B, W*S, H, D] on every rank, each rank keeps its sequence shard
    full = [torch.randn(2, WORLD * SEQ, HEADS, HD) for _ in range(3)]
    qkv = [t.tensor_split(WORLD, 1)[rank].contiguous() for t in full]
    bhld = [t.transpose(1, 2) for t in full]
    want = F.scaled_dot_product_attention(*bhld).transpose(1, 2).tensor_split(WORLD, 1)[rank]
    want_lse = aten._scaled_dot_product_flash_attention_for_cpu(*bhld)[1].transpose(1, 2).tensor_split(WORLD, 1)[rank]

    with torch.no_grad():
        ref = ulysses_attention(*qkv)
    out, rep = _compile(ulysses_attention, qkv)
    assert len(rep.graphs) == 1 and rep.matches() == {"attention": 1} and rep.misses == [], str(rep)
    assert_close(out, ref)
    assert_close(out, want)

    ring = RingAttention(rank).eval()
    with torch.no_grad():
        ref = ring(*qkv)
    out, rep = _compile(ring, qkv)
    assert len(rep.graphs) == 1 and rep.matches() == {"attention": WORLD} and rep.misses == [], str(rep)
    for o, r, w in zip(out, ref, (want, want_lse)):
        assert_close(o, r)
        assert_close(o, w)
    dist.destroy_process_group()


def test_context_parallel_graphs_two_process_gloo():
    mp.spawn(worker, args=(free_port(), os.path.dirname(os.path.abspath(__file__))), nprocs=WORLD, join=True)
