"""Context parallel graphs on CPU (diffusers' enable_parallelism needs an accelerator): a
2-process gloo group and the graphs a Ulysses / ring attention prologue makes on one rank —
its sequence shard of q/k, its slice of the rope tables, the norm across heads and the
Wan rope, then the functional collectives (all-to-all: sequence gathered, heads scattered;
all-gather of k for ring). The same matches as on one process, output equal to eager."""
from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as fc
import torch.multiprocessing as mp
from test_tp_rms_norm import _free_port

WORLD, HEADS, HD, SEQ = 2, 4, 8, 10  # SEQ tokens per rank


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
    dist.destroy_process_group()


def test_context_parallel_graphs_two_process_gloo():
    mp.spawn(worker, args=(_free_port(), os.path.dirname(os.path.abspath(__file__))), nprocs=WORLD, join=True)
