"""Where the report says a match or a miss is (issue 28, Report): module paths are the
model's own after any graph break (Dynamo names modules relative to the frame it traces: a
submodule's forward it compiled on its own, a resume function), ModuleDict keys that are
not identifiers ('2-1') stay whole, a miss's source line is the user's (not a torch frame),
and `from_graph_input` tells a node that a previous graph computed from a parameter or a
model input."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch._inductor.custom_graph_pass import CustomGraphPass

from conftest import compile_and_run
from difffuse.patterns.common import from_graph_input, module_path, source_of


class Norm(nn.Module):
    def __init__(self, d=16):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight


class Block(nn.Module):
    """Two norms around a masked self-attention written in the block's own forward (no
    submodule: its nodes carry no module of their own), optionally a graph break between."""

    def __init__(self, brk: bool):
        super().__init__()
        self.norm, self.qkv, self.norm2, self.brk = Norm(), nn.Linear(16, 48), Norm(), brk

    def forward(self, x, mask):
        x = self.norm(x)
        if self.brk:
            torch._dynamo.graph_break()
        q, k, v = self.qkv(x).unflatten(-1, (3, 2, 8)).permute(2, 0, 3, 1, 4).unbind(0)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # masked: a reported miss
        return self.norm2(x + a.transpose(1, 2).flatten(2))


class Model(nn.Module):
    def __init__(self, brk: bool, loop: bool):
        super().__init__()
        self.blocks = nn.ModuleList([Block(brk), Block(brk)])
        self.heads = nn.ModuleDict({"2-1": Norm(), "out": Norm()})
        self.loop = loop

    def forward(self, x, mask):
        if self.loop:  # a graph break in a loop: Dynamo skips this frame, compiles each block's
            for block in self.blocks:
                x = block(x, mask)
        else:  # a graph break in an inlined call: this frame breaks and resumes
            x = self.blocks[0](x, mask)
            x = self.blocks[1](x, mask)
        return self.heads["out"](self.heads["2-1"](x))


NORMS = {"blocks.0.norm", "blocks.0.norm2", "blocks.1.norm", "blocks.1.norm2", "heads.2-1", "heads.out"}
ATTN = {"blocks.0", "blocks.1"}  # the attention and the residual add (fused with norm2) are the block's own


def _run(brk, loop):
    torch.manual_seed(0)
    model = Model(brk, loop).eval()
    x, mask = torch.randn(2, 5, 16), torch.rand(5, 5) > 0.3
    out, rep = compile_and_run(model, x, mask)
    with torch.no_grad():
        torch.testing.assert_close(out, model(x, mask), rtol=1e-5, atol=1e-5)
    paths = {p for f, v, ps in rep.sites() for p in ps}
    return rep, paths, {m.module for m in rep.misses if m.family == "attention"}


def test_paths_without_graph_break():
    rep, paths, missed = _run(brk=False, loop=True)
    assert paths == NORMS | ATTN, rep.sites()
    assert missed == ATTN and len(rep.misses) == 2, str(rep)
    assert NORMS | ATTN <= rep.modules()


@pytest.mark.parametrize("loop", [True, False], ids=["skipped-caller", "resumed"])
def test_paths_after_graph_break_are_the_models(loop):
    """Each graph names what it compiled by the model's paths (a graph Dynamo reuses for the
    second block, or for heads['out'] after heads['2-1'] where it compiles Norm.forward on its
    own, is recorded once): never frame-relative ('norm', 'norm2', '2-1', '') and never a
    mangled key ('heads.2')."""
    rep, paths, missed = _run(brk=True, loop=loop)
    assert {"blocks.0", "blocks.0.norm", "blocks.0.norm2", "heads.2-1"} <= paths <= NORMS | ATTN, \
        rep.sites()
    assert "blocks.0" in missed and missed <= ATTN, [(m.module, m.reason) for m in rep.misses]
    assert rep.modules() <= NORMS | ATTN | {f"blocks.{i}.qkv" for i in (0, 1)}, rep.modules()
    for m in rep.misses:  # the site's own line: the SDPA call in Block.forward
        assert "test_report_paths.py" in m.source and "scaled_dot_product_attention" in m.source, m.source


def test_moduledict_key_not_an_identifier():
    _, paths, _ = _run(brk=False, loop=False)
    assert "heads.2-1" in paths and not any(p in ("heads.2", "2-1") for p in paths)


def test_miss_source_is_the_users_line_not_torchs():
    """nn.RMSNorm traces into torch/nn/functional.py; the miss names the line that calls it."""
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = nn.RMSNorm(8, eps=1e-6)

        def forward(self, x):
            return self.norm(x) * 2

    _, rep = compile_and_run(M(), torch.randn(2, 0, 8))  # zero-size: a reported rms_norm miss
    assert [m.family for m in rep.misses] == ["rms_norm"], str(rep)
    assert "test_report_paths.py" in rep.misses[0].source, rep.misses[0].source
    assert "self.norm(x) * 2" in rep.misses[0].source and rep.misses[0].module == "norm", rep.misses[0]


def _node(graph, trace=None, args=()):
    n = graph.call_function(torch.ops.aten.relu.default, args)
    if trace is not None:
        n.meta["stack_trace"] = trace
    return n


def test_source_of_frames_and_replaced_nodes():
    """The innermost frame outside torch; a node without a trace (an Inductor pattern
    re-traced it) takes the line of the nearest node it feeds (the replacement's output,
    which keeps the replaced node's meta)."""
    torch_file = torch.nn.functional.__file__
    trace = (f'  File "/m/model.py", line 3, in forward\n    y = self.norm(x)\n'
             f'  File "{torch_file}", line 9, in rms_norm\n    return torch.rms_norm(x)\n')
    g = torch.fx.Graph()
    x = g.placeholder("x")
    inner = _node(g, None, (x,))
    out = _node(g, trace, (inner,))
    g.output(out)
    assert source_of(out) == '"/m/model.py", line 3, in forward: y = self.norm(x)'
    assert source_of(inner) == source_of(out)
    assert module_path(out) == ""  # no Dynamo trace in progress: no module recorded


class _Probe(CustomGraphPass):
    """A post-grad pass that records, per graph, from_graph_input of every placeholder
    (by the Dynamo source of its value) and of the nodes that read one."""

    def __init__(self):
        self.seen = []

    def __call__(self, graph):
        from difffuse.patterns.module_paths import module_namer

        namer = module_namer(graph)
        phs = graph.find_nodes(op="placeholder")
        self.seen.append({namer.input_source(i): from_graph_input(p) for i, p in enumerate(phs)})

    def uuid(self):
        return None


def test_from_graph_input():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = Norm(8)
            self.register_buffer("table", torch.randn(8))

        def forward(self, x):
            y = self.norm(x)
            torch._dynamo.graph_break()
            return y * self.table + self.norm.weight

    probe = _Probe()
    torch._dynamo.reset()
    with torch._inductor.config.patch(post_grad_custom_post_pass=probe), torch.no_grad():
        torch.compile(M())(torch.randn(2, 8))
    first, second = probe.seen
    assert first["L['x']"] is False  # the model's input
    assert all(v is False for k, v in first.items() if "_parameters" in k)
    assert second["L['y']"] is True  # the norm's output, from the graph before the break
    assert all(v is False for k, v in second.items() if "_parameters" in k or "_buffers" in k), second
