"""The report on a warm Inductor cache (issue 20, item 8).

Each compile runs in its own process with a shared, fresh TORCHINDUCTOR_CACHE_DIR and
both of Inductor's caches on (conftest turns them off for the in-process tests). The
second copy of the module differs only in naming `self` as `s`: the Dynamo graph's code
(and so AOTAutograd's cache key) differs, the post-AOTAutograd graph Inductor's FX-graph
cache keys does not, so Inductor answers from its cache and the difffuse pass does not
run. The report must still say what the cached code does — or that it does not know.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from difffuse.fusion_pass.report import GraphRecord, Miss, Report, UnknownCountsError

# {SELF} is the name of the forward's first parameter.
PROGRAM = textwrap.dedent('''
    import json, torch, torch.nn as nn, torch.nn.functional as F
    from torch._inductor import config as inductor_config
    from torch._functorch import config as functorch_config
    from torch._dynamo.utils import counters
    import difffuse
    from difffuse.fusion_pass.report import UnknownCountsError

    inductor_config.fx_graph_cache = True
    functorch_config.enable_autograd_cache = True

    class Block(nn.Module):
        """RMSNorm (hand-written) -> LayerNorm -> *(1 + scale) + shift."""
        def __init__(self, d=16):
            super().__init__()
            self.w = nn.Parameter(torch.randn(d))
        def forward({SELF}, x, scale, shift):
            h = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * {SELF}.w
            return F.layer_norm(h, (h.shape[-1],), eps=1e-6) * (1 + scale) + shift

    torch.manual_seed(0)
    m = Block().eval()
    args = (torch.randn(2, 8, 16), torch.randn(2, 1, 16), torch.randn(2, 1, 16))
    with torch.no_grad():
        out = torch.compile(m, backend="difffuse", options={"lowering": "reference"})(*args)
        with torch.profiler.profile() as prof:  # what the compiled code calls, hit or miss
            torch.compile(m, backend="difffuse", options={"lowering": "reference"})(*args)
        ref = m(*args)
    ops = {}
    for e in prof.events():
        if e.name.startswith("difffuse::"):
            ops[e.name.split("::")[1]] = ops.get(e.name.split("::")[1], 0) + 1
    rep = difffuse.report()
    try:
        matches, sites = rep.matches(), [list(s) for s in rep.sites()]
    except UnknownCountsError as exc:
        matches, sites = "unknown", str(exc)
    print("RESULT " + json.dumps({
        "matches": matches, "sites": sites, "unknown": rep.unknown,
        "cached": [g.cached for g in rep.graphs], "graphs": len(rep.graphs),
        "ops": ops, "close": torch.allclose(out, ref, rtol=1e-5, atol=1e-5),
        "fx_hit": counters["inductor"]["fxgraph_cache_hit"],
        "fx_miss": counters["inductor"]["fxgraph_cache_miss"],
        "aot_hit": counters["aot_autograd"]["autograd_cache_hit"],
        "aot_miss": counters["aot_autograd"]["autograd_cache_miss"],
        "table": str(rep),
    }))
''')


def _run(cache_dir, self_name: str) -> dict:
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(cache_dir))
    for var in ("TORCHINDUCTOR_FX_GRAPH_CACHE", "TORCHINDUCTOR_AUTOGRAD_CACHE", "TORCHINDUCTOR_FORCE_DISABLE_CACHES",
                "DIFFFUSE_DISABLE", "DIFFFUSE_LOWERING"):
        env.pop(var, None)
    r = subprocess.run([sys.executable, "-c", PROGRAM.replace("{SELF}", self_name)],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    line = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


def _record_dir(cache_dir):
    return os.path.join(str(cache_dir), "difffuse")


def _drop(cache_dir, prefix: str) -> None:
    for f in os.listdir(_record_dir(cache_dir)):
        if f.startswith(prefix):
            os.remove(os.path.join(_record_dir(cache_dir), f))


def test_renamed_self_on_warm_cache_reports_first_matches(tmp_path):
    """Cold; then `s` for `self` and then `me`: each an FX-graph cache hit under an
    AOTAutograd miss (the bug's path); then `me` again: an AOTAutograd cache hit. All report
    what the first run recorded and what the compiled code calls. Before `s` the records
    under the normalised graph's key are dropped, before `me` those under Inductor's own key,
    so each key must find the record alone (and a hit stores it back under the other)."""
    cold = _run(tmp_path, "self")
    assert cold["fx_miss"] == 1 and cold["fx_hit"] == 0, cold
    assert cold["graphs"] == 1 and cold["cached"] == [False] and cold["unknown"] == []
    assert cold["matches"] == {"rms_norm": 1, "norm_scale_shift": 1}, cold["table"]
    assert cold["ops"] == cold["matches"] and cold["close"], cold
    assert sorted(f for f, _, _ in cold["sites"]) == ["norm_scale_shift", "rms_norm"]
    stored = os.listdir(_record_dir(tmp_path))
    assert sorted(f.split("-")[0] for f in stored) == ["dynamo", "graph", "inductor"], stored

    for name, drop in (("s", "graph-"), ("me", "inductor-")):
        _drop(tmp_path, drop)
        warm = _run(tmp_path, name)
        # the path of the bug: AOTAutograd missed (the Dynamo graph names `s`), Inductor hit
        assert warm["aot_miss"] == 1 and warm["fx_hit"] == 1 and warm["fx_miss"] == 0, (name, warm)
        assert warm["cached"] == [True] and warm["unknown"] == [], warm["table"]
        assert warm["matches"] == cold["matches"] and warm["sites"] == cold["sites"], warm["table"]
        assert warm["ops"] == cold["ops"] and warm["close"]
        assert "graph0 (cached)" in warm["table"] and "?" not in warm["table"], warm["table"]

    again = _run(tmp_path, "me")
    assert again["aot_hit"] == 1 and again["aot_miss"] == 0 and again["fx_miss"] == 0, again
    assert again["cached"] == [True] and again["unknown"] == []
    assert again["matches"] == cold["matches"] and again["sites"] == cold["sites"], again["table"]
    assert again["ops"] == cold["ops"] and again["close"]


def test_cached_graph_without_record_is_unknown_not_zero(tmp_path):
    """The records are gone, Inductor's compiled graph is not: the counts are unknown."""
    cold = _run(tmp_path, "self")
    assert cold["matches"] == {"rms_norm": 1, "norm_scale_shift": 1}, cold["table"]
    assert os.listdir(_record_dir(tmp_path))
    shutil.rmtree(_record_dir(tmp_path))

    renamed = _run(tmp_path, "s")
    assert renamed["aot_miss"] == 1 and renamed["fx_hit"] == 1 and renamed["fx_miss"] == 0, renamed
    assert renamed["ops"] == cold["ops"] and renamed["close"]  # the cached code still fuses
    assert renamed["unknown"] == ["graph0"] and renamed["cached"] == [True]
    assert renamed["matches"] == "unknown" and "graph0" in renamed["sites"]  # the error names it
    row = next(ln for ln in renamed["table"].splitlines() if ln.startswith("graph0")).split()
    assert row[:3] == ["graph0", "(cached)", "reference"] and len(row) > 3 and set(row[3:]) == {"?"}, \
        renamed["table"]
    assert "unknown, not 0" in renamed["table"]


# ------------------------------------------------------------ the Report API, no compile
def _records():
    a = GraphRecord("graph0", "reference", matches={"rms_norm": 2}, variants={"rms_norm:mul": 2},
                    sites=[["rms_norm", "mul", ["n"]], ["rms_norm", "mul", ["m"]]], modules=["m", "n"],
                    misses=[Miss("scale_shift", "shape", "x.py:3", "n")])
    b = GraphRecord("graph1", "reference", matches={"rms_norm": 1}, variants={"rms_norm:mul": 1},
                    sites=[["rms_norm", "mul", ["k"]]], modules=["k"], cached=True)
    c = GraphRecord("graph2", "reference", cached=True, unknown=True)
    return a, b, c


def test_report_totals_when_all_known():
    a, b, _ = _records()
    rep = Report([a, b])
    assert rep.unknown == [] and rep.matches() == {"rms_norm": 3} and rep.matches("rms_norm") == 3
    assert len(rep.sites()) == 3 and rep.modules() == {"m", "n", "k"} and len(rep.misses) == 1
    assert "graph1 (cached)" in str(rep) and "as first recorded" in str(rep) and "?" not in str(rep)


def test_report_refuses_totals_over_unknown_graphs():
    a, b, c = _records()
    rep = Report([a, b, c])
    assert rep.unknown == ["graph2"]
    for total in (rep.matches, lambda: rep.matches("rms_norm"), rep.variants, rep.sites, rep.modules,
                  rep.by_lowering, lambda: rep.misses):
        with pytest.raises(UnknownCountsError, match="graph2"):
            total()
    assert rep.known().matches() == {"rms_norm": 3} and rep.known().unknown == []
    text = str(rep)
    lines = text.splitlines()
    row = next(ln for ln in lines if ln.startswith("graph2")).split()
    assert row[:3] == ["graph2", "(cached)", "reference"] and set(row[3:]) == {"?"}, text
    total = next(ln for ln in lines if ln.startswith("total")).split()
    assert total[1:] == ["3+?", "1+?"], text
    assert "unknown, not 0" in text and "graph2" in text


def test_unknown_records_are_never_stored(tmp_path, monkeypatch):
    from difffuse.fusion_pass import report

    monkeypatch.setattr(report, "_store_dir", lambda: str(tmp_path))
    _, b, c = _records()
    report.save_record("k-unknown", c)
    report.save_record(["k1", "k2"], b)
    assert sorted(os.listdir(tmp_path)) == ["k1.json", "k2.json"]
    got = report.load_record("k2")
    assert got.cached and not got.unknown and got.matches == {"rms_norm": 1} and got.sites == b.sites
    assert report.load_record("k-unknown") is None and report.load_record(None) is None
