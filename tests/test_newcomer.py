"""A new user's first hour: the packaging (sdist with the tests' conftest and the LICENSE,
license metadata), the README's code, the demo, the option errors and the command line."""
from __future__ import annotations

import argparse
import email
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

import difffuse
from difffuse.fusion_pass.config import OptionError, parse_options

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
ILLUSTRATIVE = "# illustrative"  # first line of a README block the test does not run


def _run(args, timeout, env=None, cwd=ROOT):
    return subprocess.run([sys.executable, *args], cwd=cwd, env={**os.environ, **(env or {})},
                          capture_output=True, text=True, timeout=timeout)


# --- 1, 2: the sdist and the wheel ------------------------------------------------------------

@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """An sdist and a wheel built by setuptools' own backend (no `build` package needed) from
    a copy of the source tree, so the working tree gets no egg-info or build directory."""
    tmp = tmp_path_factory.mktemp("dist")
    src = tmp / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
        ".git", ".whl", ".benchmarks", ".pytest_cache", "__pycache__", "*.egg-info", "build", "dist",
        "outputs", "out", ".dev", ".ci"))
    out = tmp / "out"
    code = ("import warnings; warnings.simplefilter('always')\n"
            "from setuptools import build_meta as b\n"
            f"print(b.build_sdist({str(out)!r})); print(b.build_wheel({str(out)!r}))\n")
    proc = _run(["-c", code], timeout=180, cwd=src)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    sdist, = out.glob("difffuse-*.tar.gz")
    wheel, = out.glob("difffuse-*.whl")
    return SimpleNamespace(sdist=sdist, wheel=wheel, log=proc.stdout + proc.stderr, tmp=tmp)


def test_sdist_has_conftest_license_and_every_test(built):
    with tarfile.open(built.sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    tests = {f"tests/{p.name}" for p in (ROOT / "tests").glob("test_*.py")}
    assert tests and {"tests/conftest.py", "LICENSE", "README.md", "pyproject.toml"} <= names
    assert tests <= names, sorted(tests - names)


def test_sdist_tests_collect(built):
    """The unpacked sdist's tests import (conftest included) and collect without errors."""
    with tarfile.open(built.sdist) as tar:
        if hasattr(tarfile, "data_filter"):
            tar.extractall(built.tmp / "unpacked", filter="data")
        else:
            tar.extractall(built.tmp / "unpacked")
    root, = (built.tmp / "unpacked").iterdir()
    proc = _run(["-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", "tests"], timeout=240, cwd=root)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "error" not in proc.stdout.lower().splitlines()[-1]
    assert re.search(r"\d+ tests? collected", proc.stdout)


def _metadata(text: str):
    return email.message_from_string(text)


def test_license_metadata(built):
    with tarfile.open(built.sdist) as tar:
        pkg_info = next(m for m in tar.getmembers() if m.name.count("/") == 1 and m.name.endswith("/PKG-INFO"))
        sdist_meta = _metadata(tar.extractfile(pkg_info).read().decode())
    with zipfile.ZipFile(built.wheel) as whl:
        names = whl.namelist()
        meta_name = next(n for n in names if n.endswith(".dist-info/METADATA"))
        wheel_meta = _metadata(whl.read(meta_name).decode())
        license_file = next(n for n in names if re.search(r"\.dist-info/licenses?/LICENSE$", n))
        license_text = whl.read(license_file).decode()
    for meta in (sdist_meta, wheel_meta):
        assert meta["License-Expression"] == "Apache-2.0"
        assert "LICENSE" in meta.get_all("License-File")
        assert not [c for c in meta.get_all("Classifier") or [] if c.startswith("License ::")]
        assert meta.get("Keywords")
    assert "Apache License" in license_text and "Version 2.0, January 2004" in license_text
    assert "END OF TERMS AND CONDITIONS" in license_text
    assert license_text == (ROOT / "LICENSE").read_text()


def test_build_has_no_license_deprecation_warning(built):
    bad = [ln for ln in built.log.splitlines() if re.search(r"(?i)licen[cs]e.*deprecat|deprecat.*licen[cs]e", ln)]
    assert not bad, bad


# --- 4, 5: the README's code -------------------------------------------------------------------

def _python_blocks() -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", README.read_text(), flags=re.S | re.M)


class _StandInPipe:
    """What the README's quick start needs of a diffusers pipeline: `.transformer` and a call
    returning `.frames`. A tiny transformer-like module keeps the compile short."""

    class Transformer(nn.Module):
        def __init__(self, d=32):
            super().__init__()
            self.proj, self.norm, self.out = nn.Linear(d, d), nn.RMSNorm(d, eps=1e-6), nn.Linear(d, d)

        def forward(self, x):
            return self.out(self.norm(self.proj(x)))

    def __init__(self):
        self.transformer = self.Transformer().eval()

    def __call__(self, prompt=None, **kwargs):
        with torch.no_grad():
            return SimpleNamespace(frames=[self.transformer(torch.randn(1, 8, 32))])


@pytest.mark.slow  # compiles a tiny Wan transformer (about 10-30 s on a CPU)
def test_readme_python_blocks_run(capsys):
    """Every ```python block of README.md runs on CPU (`pipe` is a stand-in), except the ones
    whose first line starts with `# illustrative`; the quick start's report explains CPU."""
    blocks = _python_blocks()
    runnable = [b for b in blocks if not b.startswith(ILLUSTRATIVE)]
    assert len(runnable) >= 2, "the quick-start blocks must run"
    outputs = []
    for i, block in enumerate(runnable):
        torch._dynamo.reset()
        difffuse.reset_report()
        namespace = {"__name__": f"readme_block_{i}"}
        if re.search(r"\bpipe\b", block):
            namespace["pipe"] = _StandInPipe()
        exec(compile(block, f"README.md python block {i}", "exec"), namespace)
        outputs.append(capsys.readouterr().out)
    quick, reference = outputs[0], outputs[1]
    assert "difffuse fusion report" in quick
    assert "rewrites nothing" in quick and "'lowering': 'reference'" in quick  # the CPU note
    assert "difffuse fusion report" in reference and "reference" in reference
    assert re.search(r"^total\s+[1-9]", reference, flags=re.M)  # it fused something


def test_readme_keeps_ci_command_and_points_to_results():
    text = README.read_text()
    assert 'python3 -m pip install -e ".[test]" && python3 -m pytest -q' in text
    assert "--index-url https://download.pytorch.org/whl/cpu" in text
    assert "difffuse.reset_report()" in text and "torch._dynamo.reset()" in text
    assert "2026-11-23" not in text and "RESULTS.md" in text


def test_auto_on_cpu_report_says_nothing_is_rewritten():
    m, x = _StandInPipe.Transformer().eval(), torch.randn(2, 32)
    torch._dynamo.reset()
    difffuse.reset_report()
    with torch.no_grad():
        torch.compile(m, backend="difffuse")(x)
    rep = difffuse.report()
    assert rep.matches() == {}
    notes = [n for g in rep.graphs for n in g.notes]
    assert any("on CPU" in n and "rewrites nothing" in n and "'lowering': 'reference'" in n for n in notes), notes
    assert "rewrites nothing" in str(rep)


# --- 7: option errors --------------------------------------------------------------------------

def test_env_lowering_error_names_the_variable(monkeypatch):
    monkeypatch.setenv("DIFFFUSE_LOWERING", "bogus")
    with pytest.raises(ValueError, match=r"DIFFFUSE_LOWERING.*'bogus'.*valid: auto, reference"):
        parse_options({})
    monkeypatch.delenv("DIFFFUSE_LOWERING")
    monkeypatch.setenv("DIFFFUSE_ATTENTION_KERNEL", "fa9")
    with pytest.raises(ValueError, match=r"DIFFFUSE_ATTENTION_KERNEL.*'fa9'.*valid: auto, fa4, fa3"):
        parse_options({})


@pytest.mark.parametrize("key, suggestion", [("max_autotun", "max_autotune"), ("loweing", "lowering"),
                                             ("pattern", "patterns")])
def test_unknown_option_did_you_mean(key, suggestion):
    with pytest.raises(ValueError, match=rf"unknown option '{key}' \(did you mean '{suggestion}'\?\)"):
        parse_options({key: 1})


def test_bad_values_name_option_and_valid_values():
    for patterns in (None, 5):
        with pytest.raises(TypeError, match=r"option 'patterns'.*valid families: qk_norm_rope, .*rms_norm"):
            parse_options({"patterns": patterns})
    with pytest.raises(ValueError, match=r"\['rms_nrom'\] \(did you mean 'rms_norm'\?\)"):
        parse_options({"patterns": ["rms_nrom"]})
    with pytest.raises(ValueError, match=r"option 'lowering' is 'refrence'.*did you mean 'reference'"):
        parse_options({"lowering": "refrence"})
    with pytest.raises(TypeError, match=r"options must be a dict, got str 'reference'.*'lowering'"):
        parse_options("reference")
    with pytest.raises(TypeError, match=r"option 'inductor' must be True or False"):
        parse_options({"inductor": "yes"})
    assert isinstance(OptionError("x"), ValueError)


@pytest.mark.parametrize("options, exc_type, first_line", [
    ("reference", TypeError, "difffuse: options must be a dict"),
    ({"max_autotun": True}, ValueError, "difffuse: unknown option 'max_autotun' (did you mean 'max_autotune'?)"),
])
def test_option_error_is_what_the_user_sees(options, exc_type, first_line):
    """Raised from the first call as the difffuse error itself, not Dynamo's
    BackendCompilerFailed: the message's first line is difffuse's."""
    torch._dynamo.reset()
    compiled = torch.compile(nn.Linear(4, 4), backend="difffuse", options=options)
    with pytest.raises(exc_type) as info:
        compiled(torch.randn(2, 4))
    assert isinstance(info.value, OptionError)
    assert type(info.value).__name__ != "BackendCompilerFailed"
    assert str(info.value).splitlines()[0].startswith(first_line)
    torch._dynamo.reset()


# --- 7, 8: the command line --------------------------------------------------------------------

def test_cli_report_without_diffusers(tmp_path):
    shadow = tmp_path / "diffusers"
    shadow.mkdir()
    (shadow / "__init__.py").write_text(
        "raise ModuleNotFoundError(\"No module named 'diffusers'\", name='diffusers')\n")
    env = {"PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = _run(["-m", "difffuse", "report"], timeout=120, env=env)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "pip install diffusers" in lines[0], proc.stderr


def test_cli_bare_lists_commands():
    proc = _run(["-m", "difffuse"], timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: python -m difffuse")
    assert "torch.compile backend" in proc.stdout  # the one-line description
    assert re.search(r"^\s+report\s+\S", proc.stdout, flags=re.M)  # the command with its help


def test_cli_report_help_has_every_argument_with_defaults(capsys):
    from difffuse.__main__ import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "cmd").choices["report"]
    with pytest.raises(SystemExit) as info:
        parser.parse_args(["report", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for action in sub._actions:
        assert action.help, f"{action.option_strings} has no help"
        if action.default is not None and action.default is not argparse.SUPPRESS:
            assert f"(default: {action.default})" in " ".join(out.split()), action.option_strings
    assert "(default: wan-t2v-tiny)" in out and "(default: 2)" in out


def test_examples_write_into_outputs(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "examples"))
    import _wan_cli

    monkeypatch.setattr(sys, "argv", ["wan_t2v.py"])
    args = _wan_cli.parse("t2v", "doc")
    assert Path(args.output).parts[0] == "outputs"
    gitignore = ROOT / ".gitignore"
    if gitignore.exists():  # a git checkout (an sdist has none)
        assert "outputs/" in gitignore.read_text().split()


# --- 3: the demo -------------------------------------------------------------------------------

@pytest.mark.slow
def test_demo_times_three_modes(tmp_path):
    proc = _run([str(ROOT / "examples" / "demo.py"), "--steps", "2", "--layers", "1"], timeout=600,
                env={"TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert "difffuse lowering: reference" in out and "correctness path" in out
    for mode in ("eager", "inductor", "difffuse"):
        assert re.search(rf"^\s+{mode}\b.*ms/step", out, flags=re.M), mode
    assert "compiling the transformer with torch.compile(backend='inductor')" in out
    assert "compiling the transformer with torch.compile(backend='difffuse'" in out
    # each first call from its own empty Inductor cache, after a throwaway compile warmed the process
    assert len(re.findall(r"first call \(trace \+ compile from an empty cache \+ one step\) [\d.]+ s", out)) == 2
    assert "difffuse fusion report" in out
    assert re.search(r"max \|difffuse - eager\| after 2 steps = ", out)
    assert not list(tmp_path.glob("*.gif"))


# --- issue 30: DIFFFUSE_DISABLE spellings, the error a user sees, the clone shadowing the install,
# --- the examples' help, the kernels note vs the table, the fuzzer's temporary files -------------

@pytest.mark.parametrize("value, disabled", [("1", True), ("true", True), ("YES", True), (" On ", True),
                                             ("0", False), ("false", False), ("No", False), ("OFF", False),
                                             ("", False)])
def test_disable_accepts_the_usual_spellings(monkeypatch, value, disabled):
    monkeypatch.setenv("DIFFFUSE_DISABLE", value)
    assert parse_options({}).disabled is disabled


@pytest.mark.parametrize("value", ["2", "disable", "nein"])
def test_disable_rejects_other_values(monkeypatch, value):
    monkeypatch.setenv("DIFFFUSE_DISABLE", value)
    with pytest.raises(ValueError, match=rf"DIFFFUSE_DISABLE is '{value}', not a boolean; valid .*1, true, yes, on"):
        parse_options({})


def test_option_error_output_is_short(tmp_path):
    """What a new user's script prints for a misspelt option (torch 2.13: 19 lines): a traceback
    from their own line to difffuse's, the message last, no BackendCompilerFailed and no
    "report this to PyTorch" footer."""
    script = tmp_path / "user.py"
    script.write_text("import torch\n"
                      "m = torch.nn.Linear(4, 4)\n"
                      "compiled = torch.compile(m, backend='difffuse', options={'max_autotun': True})\n"
                      "compiled(torch.randn(2, 4))\n")
    proc = _run([str(script)], timeout=300, cwd=tmp_path, env={"TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "ind")})
    lines = proc.stderr.rstrip().splitlines()
    assert proc.returncode == 1
    assert lines[0] == "Traceback (most recent call last):" and f'File "{script}", line 4' in lines[1]
    assert lines[-1].startswith("difffuse.fusion_pass.config.OptionError: difffuse: unknown option 'max_autotun' "
                                "(did you mean 'max_autotune'?)"), lines[-1]
    assert "BackendCompilerFailed" not in proc.stderr and "PyTorch" not in proc.stderr
    assert len(lines) <= 25, proc.stderr


@pytest.mark.skipif(not (ROOT / "difffuse").is_dir() or not (ROOT / ".git").exists(), reason="needs a clone")
def test_clone_shadowing_the_install_is_named(tmp_path):
    """Python started in the folder that holds a clone: with an editable install the clone (a folder
    named difffuse) shadows the package. The backend's error and the switch's warning say so."""
    import importlib.metadata

    if not any(json.loads(d.read_text("direct_url.json") or "{}").get("dir_info", {}).get("editable")
               for d in importlib.metadata.distributions(name="difffuse")):
        pytest.skip("a regular install is not shadowed by a folder without __init__.py")
    (tmp_path / "difffuse" / "examples").mkdir(parents=True)  # what a clone's folder looks like from outside
    code = "import torch\ntorch.compile(torch.nn.Linear(4, 4), backend='difffuse')(torch.randn(2, 4))\n"
    env = {"TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "ind"), "PYTHONPATH": ""}
    proc = _run(["-c", code], timeout=300, cwd=tmp_path, env=env)
    assert proc.returncode == 1
    assert f"`import difffuse` found the folder {tmp_path / 'difffuse'}" in proc.stderr
    assert "shadows the install" in proc.stderr
    proc = _run(["-c", "import torch; print('torch imported')"], timeout=300, cwd=tmp_path,
                env={**env, "DIFFFUSE_INDUCTOR_PASS": "1"})
    assert proc.returncode == 0 and "torch imported" in proc.stdout
    assert "shadows the install" in proc.stderr and "the Inductor switch (DIFFFUSE_INDUCTOR_PASS) stays off" in proc.stderr


def test_example_help_shows_no_none_default():
    proc = _run([str(ROOT / "examples" / "wan_t2v.py"), "--help"], timeout=120)
    assert proc.returncode == 0, proc.stderr
    text = " ".join(proc.stdout.split())
    assert "(default: None)" not in text and "(default: False)" not in text
    assert "(default: tiny random pipeline)" in text and "(default: 4)" in text


def test_report_explains_calls_beyond_matches():
    """Flux's joint q/k rope: 8 matches in the table, 12 op calls in the kernels note."""
    from difffuse.fusion_pass.report import GraphRecord, Report

    g = GraphRecord("graph0", "reference", matches={"qk_norm_rope": 8, "attention": 4}, notes=[
        "kernels: attention -> difffuse::attention x4, qk_norm_rope -> difffuse::qk_norm_rope x12"])
    text = str(Report([g]))
    assert "qk_norm_rope: 8 matches (the table), 12 op calls (kernels): one match can make several" in text
    assert "one per stream" in text and "attention: 4 matches" not in text


def test_fuzzer_removes_its_temporary_files(tmp_path):
    code = ("import os, sys\n"
            "from difffuse.testing.fuzz import runner\n"
            "runner.setup()\n"
            "open(os.path.join(runner._TMP, 'case.py'), 'w').write('x = 1')\n"
            "print(runner._TMP)\n")
    proc = _run(["-c", code], timeout=300, env={"TMPDIR": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr
    made = Path(proc.stdout.strip().splitlines()[-1])
    assert made.parent == tmp_path and made.name.startswith("difffuse-fuzz-")
    assert not made.exists() and not list(tmp_path.glob("difffuse-fuzz-*"))


def test_wheel_carries_the_entry_points(built):
    """The wheel has the top-level difffuse_entry module and both entry points torch loads: the
    backend by name and the Inductor switch (`torch.backends`, loaded by `import torch`)."""
    with zipfile.ZipFile(built.wheel) as whl:
        names = whl.namelist()
        eps = whl.read(next(n for n in names if n.endswith(".dist-info/entry_points.txt"))).decode()
    assert "difffuse_entry.py" in names
    assert "[torch.backends]\ndifffuse = difffuse_entry:torch_autoload" in eps
    assert "[torch_dynamo_backends]\ndifffuse = difffuse_entry:backend" in eps
