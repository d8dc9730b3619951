"""The backend itself: options, entry point, failure safety, devices, recompiles, caches."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn as nn

import difffuse
from conftest import assert_close, compile_and_run
from difffuse.fusion_pass import pass_manager


class Block(nn.Module):
    """Linear -> RMSNorm (nn.RMSNorm) -> Linear: one rms_norm site."""

    def __init__(self, d=16):
        super().__init__()
        self.a, self.n, self.b = nn.Linear(d, d), nn.RMSNorm(d, eps=1e-6), nn.Linear(d, d)

    def forward(self, x):
        return self.b(self.n(self.a(x)))


def test_unknown_option_names_valid_ones():
    with pytest.raises(Exception, match="lowering.*patterns.*inductor"):
        compile_and_run(Block().eval(), torch.randn(2, 16), options={"no_such_option": 1})


def test_unknown_lowering_is_an_error():
    with pytest.raises(Exception, match="valid"):
        compile_and_run(Block().eval(), torch.randn(2, 16), options={"lowering": "tpu"})


def test_inductor_options_pass_through():
    m, x = Block().eval(), torch.randn(2, 16)
    out, rep = compile_and_run(m, x, options={"max_autotune": False, "triton.cudagraphs": False})
    assert rep.matches() == {"rms_norm": 1}
    assert_close(out, m(x))


@pytest.mark.parametrize("lowering", ["musa", "inductor"])
def test_lowering_without_rewrite(lowering):
    m, x = Block().eval(), torch.randn(2, 16)
    out, rep = compile_and_run(m, x, options={"lowering": lowering})
    assert rep.matches() == {}
    assert any("no rewrite, plain Inductor" in n for g in rep.graphs for n in g.notes)
    assert_close(out, m(x))


def test_auto_on_cpu_means_plain_inductor():
    m, x = Block().eval(), torch.randn(2, 16)
    out, rep = compile_and_run(m, x, options={"lowering": "auto"})
    assert rep.matches() == {} and rep.graphs[0].lowering == "inductor"
    assert_close(out, m(x))


def test_env_overrides(monkeypatch):
    m, x = Block().eval(), torch.randn(2, 16)
    monkeypatch.setenv("DIFFFUSE_LOWERING", "musa")
    _, rep = compile_and_run(m, x, options={"lowering": "reference"})
    assert rep.matches() == {}
    monkeypatch.delenv("DIFFFUSE_LOWERING")
    monkeypatch.setenv("DIFFFUSE_DISABLE", "1")
    out, rep = compile_and_run(m, x)
    assert rep.matches() == {} and "DIFFFUSE_DISABLE" in rep.graphs[0].notes[0]
    assert_close(out, m(x))


def test_failing_pass_restores_graph_and_compiles(monkeypatch, caplog):
    """A pass that edits the graph and then raises: the graph is restored, Inductor compiles
    it, the report and one WARNING say why."""

    class Broken:
        def apply(self, graph):
            for node in list(graph.nodes):
                if node.target == torch.ops.aten.rsqrt.default:
                    node.target = torch.ops.aten.sqrt.default  # a half-done edit
            raise RuntimeError("boom")

    monkeypatch.setattr(pass_manager, "_family_pass", lambda name: Broken())
    m, x = Block().eval(), torch.randn(2, 16)
    with caplog.at_level("WARNING", logger="difffuse"):
        out, rep = compile_and_run(m, x)
    assert_close(out, m(x))
    assert rep.matches() == {}
    assert "pass failed" in rep.graphs[0].notes[0] and "boom" in rep.graphs[0].notes[0]
    assert sum("pass failed" in r.message for r in caplog.records) == 1


def test_training_graph_left_to_inductor():
    torch._dynamo.reset()
    difffuse.reset_report()
    m, x = Block(), torch.randn(2, 16)
    out = torch.compile(m, backend="difffuse", options={"lowering": "reference"})(x)
    out.sum().backward()
    rep = difffuse.report()
    assert rep.matches() == {} and "training graph" in rep.graphs[0].notes[0]


def test_inductor_false_runs_rewritten_graph_eagerly():
    m, x = Block().eval(), torch.randn(3, 16)
    out, rep = compile_and_run(m, x, options={"inductor": False})
    assert rep.matches() == {"rms_norm": 1}
    assert_close(out, m(x))


def test_mode_reaches_inductor(monkeypatch):
    """`mode=` keeps its Inductor meaning: the config patches include `list_mode_options(mode)`
    and the compile runs under them (seen from inside the pass, which Inductor runs within
    its config), with the difffuse rewrite still applied."""
    from torch._inductor import config as inductor_config
    from torch._inductor import list_mode_options

    from difffuse.fusion_pass import backend
    from difffuse.fusion_pass.config import parse_options

    mode = "max-autotune-no-cudagraphs"
    want = list_mode_options(mode)
    patches = dict(parse_options(None, mode).inductor_options)
    assert want and {k: patches.get(k) for k in want} == want
    default = inductor_config.get_config_copy()
    assert any(default[k] != v for k, v in want.items())  # else the check below proves nothing
    seen = {}

    class Spy(pass_manager.DifffusePass):
        def __call__(self, graph):
            cfg = inductor_config.get_config_copy()
            seen.update({k: cfg[k] for k in want})
            return super().__call__(graph)

    monkeypatch.setattr(backend, "DifffusePass", Spy)
    monkeypatch.setenv("DIFFFUSE_LOWERING", "reference")  # mode= cannot come with options=
    m, x = Block().eval(), torch.randn(3, 16)
    torch._dynamo.reset()
    difffuse.reset_report()
    with torch.no_grad():
        out = torch.compile(m, backend="difffuse", mode=mode)(x)
    assert seen == want
    assert difffuse.report().matches() == {"rms_norm": 1}
    assert_close(out, m(x))


def test_uuid_depends_on_config():
    from difffuse.fusion_pass.config import parse_options

    a = pass_manager.DifffusePass(parse_options({"lowering": "reference"})).uuid()
    b = pass_manager.DifffusePass(parse_options({"lowering": "reference", "patterns": ["rms_norm"]})).uuid()
    c = pass_manager.DifffusePass(parse_options({"lowering": "cuda"})).uuid()
    assert len({a, b, c}) == 3
    assert a == pass_manager.DifffusePass(parse_options({"lowering": "reference"})).uuid()


def test_patterns_option_limits_families():
    m, x = Block().eval(), torch.randn(2, 16)
    _, rep = compile_and_run(m, x, options={"patterns": ["scale_shift"]})
    assert rep.matches() == {}


def test_fullgraph_no_recompile_on_second_call():
    m, x = Block().eval(), torch.randn(2, 16)
    torch._dynamo.reset()
    difffuse.reset_report()
    c = torch.compile(m, backend="difffuse", options={"lowering": "reference"}, fullgraph=True)
    with torch.no_grad():
        c(x)
        c(torch.randn(2, 16))
    assert len(difffuse.report().graphs) == 1


def _count_compiles(backend, options, shapes):
    torch._dynamo.reset()
    difffuse.reset_report()
    n = [0]
    m = Block().eval()
    if backend == "inductor":
        from torch._inductor.compile_fx import compile_fx

        def counting(gm, ex):
            n[0] += 1
            return compile_fx(gm, ex)
        c = torch.compile(m, backend=counting)
    else:
        c = torch.compile(m, backend="difffuse", options=options)
    with torch.no_grad():
        for s in shapes:
            c(torch.randn(*s))
    return n[0] if backend == "inductor" else len(difffuse.report().graphs)


def test_automatic_dynamic_adds_no_recompile():
    shapes = [(2, 3, 16), (2, 5, 16), (4, 7, 16), (4, 9, 16)]
    plain = _count_compiles("inductor", None, shapes)
    ours = _count_compiles("difffuse", {"lowering": "reference"}, shapes)
    assert ours == plain
    assert all(g.matches == {"rms_norm": 1} for g in difffuse.report().graphs)


def test_backend_found_by_name_without_import(tmp_path):
    code = textwrap.dedent("""
        import sys, torch
        m = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.RMSNorm(8)).eval()
        with torch.no_grad():
            torch.compile(m, backend="difffuse", options={"lowering": "reference"})(torch.randn(2, 8))
        print(sys.modules["difffuse"].report().matches())
    """)
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(tmp_path))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "{'rms_norm': 1}" in out.stdout


def test_report_right_on_warm_cache_in_second_process(tmp_path):
    code = textwrap.dedent("""
        import torch
        import difffuse
        m = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.RMSNorm(8)).eval()
        with torch.no_grad():
            torch.compile(m, backend="difffuse", options={"lowering": "reference"})(torch.randn(2, 8))
        rep = difffuse.report()
        print("MATCHES", rep.matches(), "CACHED", rep.graphs[0].cached)
    """)
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(tmp_path))
    runs = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
            for _ in range(2)]
    for r in runs:
        assert r.returncode == 0, r.stderr[-2000:]
    assert "MATCHES {'rms_norm': 1} CACHED False" in runs[0].stdout
    assert "MATCHES {'rms_norm': 1} CACHED True" in runs[1].stdout


def test_graph_without_operations_is_known_empty():
    """Inductor returns a graph with no call nodes as is, running no passes: that is a known
    zero (with a note), not a cache hit with unknown counts."""
    from difffuse.fusion_pass.backend import difffuse_backend

    class Swap(nn.Module):
        def forward(self, x, y):
            return (y, x)

    difffuse.reset_report()
    a, b = torch.randn(3), torch.randn(3)
    with torch.no_grad():
        out = difffuse_backend(torch.fx.symbolic_trace(Swap()), [a, b], options={"lowering": "reference"})(a, b)
    rep = difffuse.report()
    assert out[0] is b and out[1] is a
    assert rep.unknown == [] and rep.matches() == {} and not rep.graphs[0].cached
    assert "no operations to compile" in rep.graphs[0].notes[0]
