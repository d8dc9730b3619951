"""difffuse: a torch.compile backend that fuses the memory-bound subgraphs of diffusion
transformers (RMSNorm, AdaLN scale/shift, q/k norm + rope, residual + norm + modulation).

    torch.compile(model, backend="difffuse")   # found by name; no import needed for this
    difffuse.report()                           # what the compilations fused and missed

On CPU the default lowering ("auto") rewrites nothing (plain Inductor): compile with
`options={"lowering": "reference"}` to see the rewrites (pure-PyTorch fused ops).
"""
from ._version import __version__  # noqa: F401


def report():
    """The fusion report of every graph compiled in this process since the last
    `reset_report()`; `torch._dynamo.reset()` does not clear it. Filled when a compiled
    model first runs. Print it, or read `.matches()`, `.misses`, `.sites()`."""
    from .fusion_pass.report import report as _report

    return _report()


def reset_report() -> None:
    """Forget the recorded compilations: the next `report()` shows only later ones. Call it
    with `torch._dynamo.reset()` to count one compile on its own."""
    from .fusion_pass.report import reset

    reset()


def backend(gm, example_inputs, options=None, mode=None):
    """The `difffuse` torch.compile backend (entry point `torch_dynamo_backends`)."""
    from .fusion_pass.backend import difffuse_backend

    return difffuse_backend(gm, example_inputs, options=options, mode=mode)
