"""difffuse: a torch.compile backend that fuses the memory-bound subgraphs of diffusion
transformers (RMSNorm, AdaLN scale/shift, q/k norm + rope, residual + norm + modulation).

    torch.compile(model, backend="difffuse")   # found by name; no import needed
    difffuse.report()                           # what the compilations fused and missed
"""
from ._version import __version__  # noqa: F401


def report():
    """The fusion report for every compilation since the last `reset_report()`."""
    from .fusion_pass.report import report as _report

    return _report()


def reset_report() -> None:
    from .fusion_pass.report import reset

    reset()


def backend(gm, example_inputs, options=None, mode=None):
    """The `difffuse` torch.compile backend (entry point `torch_dynamo_backends`)."""
    from .fusion_pass.backend import difffuse_backend

    return difffuse_backend(gm, example_inputs, options=options, mode=mode)
