"""difffuse: a torch.compile backend that fuses the memory-bound subgraphs of diffusion
transformers (RMSNorm, AdaLN scale/shift, q/k norm + rope, residual + norm + modulation).

    torch.compile(model, backend="difffuse")   # found by name; no import needed for this
    difffuse.report()                           # what the compilations fused and missed

Inside frameworks that call `torch.compile` themselves (backend "inductor"), set
DIFFFUSE_INDUCTOR_PASS=1 in the environment, or call `difffuse.enable_inductor_pass()`:
difffuse's pass then runs in every Inductor compile of the process, with the same report.

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


def enable_inductor_pass(options=None):
    """The Inductor switch, in-process: difffuse's pass becomes Inductor's post-grad custom pass
    for every torch.compile of this process (any backend that compiles with Inductor), chained
    with a pass a framework set there; the graphs it rewrites appear in `report()`.
    `options`: difffuse's keys (lowering, patterns, attention_kernel), with the DIFFFUSE_*
    overrides. DIFFFUSE_INDUCTOR_PASS=1 does the same when torch is imported."""
    from .fusion_pass.inductor_hook import install

    return install(options)


def disable_inductor_pass() -> None:
    """Turn the Inductor switch off: the framework's own post-grad pass (if any) stays."""
    from .fusion_pass.inductor_hook import uninstall

    uninstall()
