"""Shared test set-up: a fresh Inductor cache (count tests must see the pass run), the
one per-dtype tolerance table, and a helper that compiles and returns the report."""
from __future__ import annotations

import os
import tempfile

_CACHE = tempfile.mkdtemp(prefix="difffuse-test-inductor-")
os.environ["TORCHINDUCTOR_CACHE_DIR"] = _CACHE

import pytest  # noqa: E402
import torch  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:  # the CUDA lowering's Triton kernels run in Triton's CPU interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")
DEVICE = "cuda" if HAS_CUDA else "cpu"
from torch._functorch import config as functorch_config  # noqa: E402
from torch._inductor import config as inductor_config  # noqa: E402

import difffuse  # noqa: E402

inductor_config.fx_graph_cache = False
functorch_config.enable_autograd_cache = False

# dtype -> (rtol, atol) for compiled-vs-eager and kernel-vs-reference comparisons
TOL = {
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (2e-2, 2e-2),
}


def assert_close(actual, expected, dtype=None):
    rtol, atol = TOL[dtype or expected.dtype]
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)


def compile_and_run(module, *args, options=None, dynamic=None, fullgraph=False, **kwargs):
    """Compile `module` with difffuse (reference lowering unless told), run it once under
    no_grad on a fresh Dynamo state; return (output, report)."""
    torch._dynamo.reset()
    difffuse.reset_report()
    opts = {"lowering": "reference", **(options or {})}
    compiled = torch.compile(module, backend="difffuse", options=opts, dynamic=dynamic, fullgraph=fullgraph)
    with torch.no_grad():
        out = compiled(*args, **kwargs)
    return out, difffuse.report()


def without_attention(matches: dict) -> dict:
    """A report's matches less the attention family: the family tables of the coverage tests
    predate it, and tests/test_attention.py asserts the attention counts of the same models."""
    return {f: n for f, n in matches.items() if f != "attention"}


def non_attention_misses(rep) -> list:
    """The misses of every family but attention (whose lowering may have no kernel yet:
    "the cuda lowering has no attention kernel"; test_attention.py checks those)."""
    return [m for m in rep.misses if m.family != "attention"]


@pytest.fixture
def run_compiled():
    return compile_and_run


def pytest_collection_modifyitems(config, items):
    """Tests marked `cuda` need a CUDA GPU."""
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
