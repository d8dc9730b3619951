"""The Inductor switch (DIFFFUSE_INDUCTOR_PASS=1 / difffuse.enable_inductor_pass()): difffuse's
pass inside every Inductor compile of a process, for frameworks that call torch.compile with
backend="inductor" themselves. Fresh subprocesses check what a framework's process sees (the
entry point that `import torch` loads); in-process tests check chaining, cache keys, training
graphs and failure safety."""
from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import difffuse
from conftest import assert_close
from difffuse.fusion_pass import inductor_hook, pass_manager
from difffuse.fusion_pass.config import parse_options

ROOT = Path(__file__).resolve().parents[1]
KEY = "post_grad_custom_post_pass"


def _python(code: str, tmp_path, env=None, cwd=None, timeout=600):
    full = {k: v for k, v in os.environ.items() if not k.startswith("DIFFFUSE_")}
    full.update(TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "inductor"), **(env or {}))
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env=full, cwd=cwd or ROOT, timeout=timeout)


# --- the entry point: what `import torch` loads -------------------------------------------------

def test_entry_points_are_installed():
    """pyproject declares both entry points in difffuse_entry; the installed metadata has them
    (a stale editable install needs `pip install -e .` again)."""
    eps = {(ep.group, ep.name): ep.value for group in ("torch.backends", "torch_dynamo_backends")
           for ep in importlib.metadata.entry_points(group=group) if ep.name == "difffuse"}
    assert eps == {("torch.backends", "difffuse"): "difffuse_entry:torch_autoload",
                   ("torch_dynamo_backends", "difffuse"): "difffuse_entry:backend"}, \
        f"installed entry points {eps}: reinstall difffuse (pip install -e .)"


@pytest.mark.parametrize("value", [None, "off", "bogus"])
def test_import_torch_does_nothing_unless_switched_on(tmp_path, value):
    """Unset or off: `import torch` imports no difffuse at all and leaves Inductor's pass alone.
    A bad value: one warning naming the variable, torch imports, the switch stays off."""
    code = """
        import sys, torch
        from torch._inductor import config
        print("IMPORTED", "difffuse" in sys.modules, "PASS", config.post_grad_custom_post_pass)
    """
    proc = _python(code, tmp_path, env={} if value is None else {"DIFFFUSE_INDUCTOR_PASS": value})
    assert proc.returncode == 0, proc.stderr[-3000:]
    if value == "bogus":
        assert "DIFFFUSE_INDUCTOR_PASS is 'bogus', not a boolean" in proc.stderr and "stays off" in proc.stderr
        assert "PASS None" in proc.stdout
    else:
        assert "IMPORTED False PASS None" in proc.stdout, proc.stdout
        assert proc.stderr.strip() == "", proc.stderr


_COMPILE = textwrap.dedent("""
    import json, sys, torch
    from torch._inductor import config
    import difffuse
    from difffuse.testing.tiny_models import MODELS

    torch.manual_seed(0)
    model, inputs = MODELS["wan-t2v-tiny"](num_layers=1)
    model.eval()
    out = {"switch_installed": type(config.post_grad_custom_post_pass).__name__,
           "hook_imported": "difffuse.fusion_pass.inductor_hook" in sys.modules}
    with torch.no_grad():
        eager = model(**inputs)[0]
        for backend in BACKENDS:
            torch._dynamo.reset()
            difffuse.reset_report()
            got = torch.compile(model, backend=backend)(**inputs)[0]
            rep = difffuse.report()
            torch.save(got, f"{OUT}/{backend}.pt")
            out[backend] = {"matches": rep.matches(), "graphs": [g.graph for g in rep.graphs],
                            "diff": (got - eager).abs().max().item()}
    print("RESULT" + json.dumps(out))
""")


def _result(proc) -> dict:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT"))
    return json.loads(line[len("RESULT"):])


@pytest.mark.slow  # two fresh processes, three compiles of a one-block tiny Wan
def test_switch_gives_backend_matches_and_output(tmp_path):
    """A tiny Wan compiled with backend="inductor" in a fresh process with DIFFFUSE_INDUCTOR_PASS=1
    gets exactly the matches and the output of backend="difffuse" (reference lowering, via
    DIFFFUSE_LOWERING, so that it rewrites on a CPU); with the variable unset, none and plain
    Inductor's output."""
    pytest.importorskip("diffusers")
    on = _python(f"BACKENDS = ['inductor', 'difffuse']; OUT = {str(tmp_path)!r}\n" + _COMPILE,
                 tmp_path / "on", env={"DIFFFUSE_INDUCTOR_PASS": "1", "DIFFFUSE_LOWERING": "reference"})
    res = _result(on)
    assert res["switch_installed"] == "InductorSwitchPass" and res["hook_imported"]
    switched, backend = res["inductor"], res["difffuse"]
    assert switched["matches"] and switched["matches"] == backend["matches"], res
    assert all(g.startswith("inductor-switch") for g in switched["graphs"])
    assert all(g.startswith("graph") for g in backend["graphs"])  # the backend ran its own pass, once
    torch.testing.assert_close(torch.load(tmp_path / "inductor.pt"), torch.load(tmp_path / "difffuse.pt"),
                               rtol=0, atol=0)
    assert switched["diff"] < 1e-4

    (tmp_path / "off").mkdir()
    off = _python(f"BACKENDS = ['inductor']; OUT = {str(tmp_path / 'off')!r}\n" + _COMPILE,
                  tmp_path / "off", env={"DIFFFUSE_LOWERING": "reference"})
    res_off = _result(off)
    assert res_off["switch_installed"] == "NoneType" and not res_off["hook_imported"]
    assert res_off["inductor"] == {"matches": {}, "graphs": [], "diff": res_off["inductor"]["diff"]}
    assert res_off["inductor"]["diff"] < 1e-4


# --- in-process: chaining, cache key, training graphs, failures ---------------------------------

class Block(nn.Module):
    """Linear -> RMSNorm -> Linear: one rms_norm site."""

    def __init__(self, d=16):
        super().__init__()
        self.a, self.n, self.b = nn.Linear(d, d), nn.RMSNorm(d, eps=1e-6), nn.Linear(d, d)

    def forward(self, x):
        return self.b(self.n(self.a(x)))


class FrameworkPass(torch._inductor.custom_graph_pass.CustomGraphPass):
    """A framework's own post-grad pass: counts the graphs it sees and the difffuse ops in them."""

    def __init__(self, tag="fw-1"):
        self.tag, self.graphs, self.difffuse_ops = tag, 0, 0

    def __call__(self, graph):
        self.graphs += 1
        self.difffuse_ops += sum(1 for n in graph.nodes if "difffuse" in str(n.target))

    def uuid(self):
        return self.tag


@pytest.fixture
def switch(monkeypatch):
    """The switch on (reference lowering) for one test, then off and Inductor's pass restored."""
    from torch._inductor import config as inductor_config

    monkeypatch.setenv("DIFFFUSE_LOWERING", "reference")
    before = inductor_config.post_grad_custom_post_pass
    yield difffuse.enable_inductor_pass
    difffuse.disable_inductor_pass()
    inductor_config.post_grad_custom_post_pass = before


def _compile(m, x, backend="inductor", grad=False, **kwargs):
    torch._dynamo.reset()
    difffuse.reset_report()
    with torch.set_grad_enabled(grad):
        return torch.compile(m, backend=backend, **kwargs)(x)


def test_framework_pass_set_before_the_switch_still_runs(switch):
    from torch._inductor import config as inductor_config

    m, x = Block().eval(), torch.randn(2, 16)
    before = FrameworkPass("before")
    inductor_config.post_grad_custom_post_pass = before
    switch()
    out = _compile(m, x)
    assert difffuse.report().matches() == {"rms_norm": 1}
    assert before.graphs == 1 and before.difffuse_ops == 1  # it ran, after difffuse
    assert_close(out, m(x))


def test_framework_pass_set_after_the_switch_is_chained(switch):
    """What a framework's process does: `import torch` installs the switch, the framework then
    assigns its own pass, then compiles. The switch wraps it again when the compile starts."""
    from torch._inductor import config as inductor_config

    m, x = Block().eval(), torch.randn(2, 16)
    torch._dynamo.reset()  # (it also clears Dynamo's compile callbacks: the switch registers them again)
    difffuse.reset_report()
    switch()
    after = FrameworkPass("after")
    inductor_config.post_grad_custom_post_pass = after
    with torch.no_grad():
        out = torch.compile(m)(x)
    assert difffuse.report().matches() == {"rms_norm": 1}
    assert after.graphs == 1 and after.difffuse_ops == 1
    assert inductor_config.post_grad_custom_post_pass.framework is after
    assert_close(out, m(x))


def test_compile_in_another_thread(switch):
    """ComfyUI compiles in a worker thread, and torch 2.13 keeps Inductor's config per thread:
    the switch is put in place when that thread's compile starts."""
    import threading

    torch._dynamo.reset()
    difffuse.reset_report()
    switch()
    m, x = Block().eval(), torch.randn(2, 16)
    out = {}

    def work():
        with torch.no_grad():
            out["y"] = torch.compile(m)(x)

    t = threading.Thread(target=work)
    t.start()
    t.join()
    assert difffuse.report().matches() == {"rms_norm": 1}
    assert_close(out["y"], m(x))


def test_uuid_covers_difffuse_and_the_framework(switch):
    from torch._inductor import config as inductor_config

    cfg = switch()
    ours = pass_manager.DifffusePass(cfg).uuid()
    cls = inductor_hook._classes()[0]
    a, b = cls(cfg, FrameworkPass("a")).uuid(), cls(cfg, FrameworkPass("b")).uuid()
    alone = cls(cfg, None).uuid()
    other_cfg = cls(parse_options({"lowering": "reference", "patterns": ["rms_norm"]}), FrameworkPass("a")).uuid()
    assert len({a, b, alone, other_cfg, ours}) == 5 and a == cls(cfg, FrameworkPass("a")).uuid()
    no_cache = FrameworkPass("x")
    no_cache.uuid = lambda: None
    assert cls(cfg, no_cache).uuid() is None and cls(cfg, lambda g: None).uuid() is None
    assert isinstance(inductor_config.post_grad_custom_post_pass, cls)


def test_training_graph_left_alone(switch):
    """A graph that needs autograd (grad on, parameters requiring grad): not rewritten, reported."""
    switch()
    m, x = Block(), torch.randn(2, 16)
    out = _compile(m, x, grad=True)
    rep = difffuse.report()
    assert rep.matches() == {} and len(rep.graphs) == 1 and "training graph" in rep.graphs[0].notes[0]
    assert out.requires_grad
    assert_close(out, m(x))


def test_failing_pass_never_breaks_the_compile(switch, monkeypatch, caplog):
    """A family that edits the graph and raises, and an error outside the families: the graph
    is compiled by plain Inductor, the framework's pass still runs, the report says why."""
    from torch._inductor import config as inductor_config

    class Broken:
        def apply(self, graph):
            for node in list(graph.nodes):
                if node.target == torch.ops.aten.rsqrt.default:
                    node.target = torch.ops.aten.sqrt.default  # a half-done edit
            raise RuntimeError("boom")

    fw = FrameworkPass()
    inductor_config.post_grad_custom_post_pass = fw
    switch()
    m, x = Block().eval(), torch.randn(2, 16)
    monkeypatch.setattr(pass_manager, "_family_pass", lambda name: Broken())
    with caplog.at_level("WARNING", logger="difffuse"):
        out = _compile(m, x)
    assert_close(out, m(x))
    assert difffuse.report().matches() == {} and "boom" in difffuse.report().graphs[0].notes[0]
    assert fw.graphs == 1

    def explode(self, graph):
        raise KeyError("outside the families")

    monkeypatch.setattr(pass_manager.DifffusePass, "__call__", explode)
    with caplog.at_level("WARNING", logger="difffuse"):
        out = _compile(m, x)
    assert_close(out, m(x))
    assert "the Inductor switch skipped a graph: KeyError" in difffuse.report().graphs[0].notes[0]
    assert fw.graphs == 2 and any("skipped a graph" in r.message for r in caplog.records)


def test_backend_keeps_a_framework_pass_and_runs_difffuse_once(switch):
    """backend="difffuse" runs a framework's pass after its own (it used to drop it), and with the
    switch on as well it rewrites each graph once: the switch steps aside for the backend."""
    from torch._inductor import config as inductor_config

    fw = FrameworkPass()
    inductor_config.post_grad_custom_post_pass = fw
    m, x = Block().eval(), torch.randn(2, 16)
    out = _compile(m, x, backend="difffuse", options={"lowering": "reference"})
    assert difffuse.report().matches() == {"rms_norm": 1} and fw.graphs == 1 and fw.difffuse_ops == 1
    switch()
    out = _compile(m, x, backend="difffuse", options={"lowering": "reference"})
    rep = difffuse.report()
    assert rep.matches() == {"rms_norm": 1} and [g.graph[:5] for g in rep.graphs] == ["graph"]
    assert fw.graphs == 2
    assert_close(out, m(x))


def test_a_pass_given_to_one_compile_replaces_the_switch_there(switch):
    """The documented limit: a pass handed to one compile (options=/config_patches) is Inductor's
    pass for that compile; it runs, difffuse does not, and nothing breaks."""
    switch()
    fw = FrameworkPass()
    m, x = Block().eval(), torch.randn(2, 16)
    out = _compile(m, x, options={KEY: fw})
    assert fw.graphs == 1 and fw.difffuse_ops == 0
    assert difffuse.report().graphs == []
    assert_close(out, m(x))
