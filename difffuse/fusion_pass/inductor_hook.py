"""The Inductor switch: difffuse's pass inside every Inductor compile of the process, for
frameworks that call `torch.compile` themselves (LightX2V, ComfyUI, sglang, ...).

    DIFFFUSE_INDUCTOR_PASS=1 python run_my_framework.py    # no edit to the framework
    difffuse.enable_inductor_pass()                        # or explicitly, in-process

How it reaches a process that never imports difffuse: difffuse declares an entry point in
torch's own `torch.backends` group, which `import torch` loads (torch's out-of-tree
extension autoload, torch >= 2.5; off with TORCH_DEVICE_BACKEND_AUTOLOAD=0). It calls
`difffuse_entry.torch_autoload`, a top-level module that reads the variable and returns when it
is unset (no difffuse import), so it costs nothing to a process that does not ask.

What it does: Inductor's `post_grad_custom_post_pass` becomes an `InductorSwitchPass`, which
runs difffuse's `DifffusePass` on inference graphs (the backend's rule: a graph that needs
autograd is left alone and reported) and then the pass the framework set there, if any
(framework's last: a pass written for Inductor's graph still gets a valid one, and
difffuse's matches are exactly those of `backend="difffuse"`). Its `uuid()` combines
difffuse's and the framework's (None where the framework's is None: Inductor's FX-graph
cache is then bypassed, as it would be for the framework's pass alone). Before each Dynamo
compile (torch's compile-start callback) the switch re-wraps a pass the framework assigned
to the global config after the switch was installed, and loads the fused ops a cached graph
calls. A pass handed to one compile only (`config_patches`, `options={...}` of that compile)
replaces the switch for that compile: difffuse does not run there (see the README).

It never breaks a compile: DifffusePass restores the graph when a family fails, and any
other error of difffuse's part is logged (one WARNING) and skipped; the framework's pass
runs either way. Each graph it sees is recorded in `difffuse.report()` like a backend graph.
On an Inductor cache hit the pass does not run and the switch has no key to find a stored
record by (the backend's is Inductor's `inner_compile`, which only a backend can pass): such
a graph's counts are reported as unknown, never as 0.
"""
from __future__ import annotations

import hashlib
import itertools
import logging
import threading
from typing import Any, Optional

log = logging.getLogger("difffuse")
ENV = "DIFFFUSE_INDUCTOR_PASS"
_counter = itertools.count()
_lock = threading.Lock()
_window = threading.local()  # per compiling thread: did Inductor key a graph with us, did we run
_installed: Optional[Any] = None  # the FusionConfig the switch runs with, while installed
_callbacks: list = []  # holds the error once the missing-callbacks warning was given


def _passes(value) -> tuple:
    """A post_grad_custom_post_pass value as a tuple of passes (newer torch also takes lists)."""
    if value is None:
        return ()
    return tuple(value) if isinstance(value, (list, tuple)) else (value,)


def _switch_class():
    """InductorSwitchPass, built on first use so that importing this module imports no torch."""
    return _classes()[0]


def chained(first, framework):
    """`first` (a DifffusePass), then the framework's pass(es): what the backend installs when a
    post_grad_custom_post_pass is already set, so that the backend does not drop it."""
    return first if not _passes(framework) else _classes()[1](first, framework)


def _classes():
    """(InductorSwitchPass, ChainedPass). On a torch that has `CustomInferenceAwareGraphPass`
    (2.11+) Inductor tells a pass whether the graph is an inference graph; on older ones the
    placeholders say it (AOTAutograd names a training graph's inputs primals_N / tangents_N,
    an inference graph's argN_1)."""
    global _CLASSES
    if _CLASSES is not None:
        return _CLASSES
    from torch._inductor import custom_graph_pass as cgp

    aware = getattr(cgp, "CustomInferenceAwareGraphPass", None)

    def framework_uuids(framework) -> Optional[str]:
        details = []
        for p in _passes(framework):
            if not isinstance(p, cgp.CustomGraphPass):
                return None  # a plain callable: Inductor bypasses its cache for it, and for us
            u = p.uuid()
            if not u:
                return None
            details.append(repr(u))
        return ";".join(details)

    def run_framework(framework, graph, is_inference: bool) -> None:
        for p in _passes(framework):
            if aware is not None and isinstance(p, aware):
                p(graph, is_inference=is_inference)
            else:
                p(graph)

    class InductorSwitchPass(aware or cgp.CustomGraphPass):
        """difffuse's pass (inference graphs), then the framework's own post-grad pass."""

        def __init__(self, cfg, framework=None):
            self.cfg = cfg
            self.framework = framework

        def uuid(self) -> Optional[Any]:
            _ensure_callbacks()
            state = getattr(_window, "state", None)
            if state is not None:
                state["keyed"] = True
            theirs = framework_uuids(self.framework)
            if theirs is None:
                return None
            from .pass_manager import DifffusePass

            ours = DifffusePass(self.cfg).uuid()
            return hashlib.sha256(f"difffuse-switch;{ours};{theirs}".encode()).hexdigest()

        def __call__(self, graph, is_inference: Optional[bool] = None) -> None:
            _ensure_callbacks()
            if is_inference is None:
                is_inference = _looks_inference(graph)
            _run_difffuse(self.cfg, graph, is_inference)
            run_framework(self.framework, graph, is_inference)

        def __repr__(self) -> str:
            return f"InductorSwitchPass({self.cfg.key()}, framework={self.framework!r})"

    class ChainedPass(aware or cgp.CustomGraphPass):
        """The backend's DifffusePass, then the pass that was already set (the backend compiles
        inference graphs only, so `first` always runs)."""

        def __init__(self, first, framework):
            self.first = first
            self.framework = framework

        def uuid(self) -> Optional[Any]:
            theirs = framework_uuids(self.framework)
            if theirs is None:
                return None
            return hashlib.sha256(f"difffuse-chain;{self.first.uuid()};{theirs}".encode()).hexdigest()

        def __call__(self, graph, is_inference: Optional[bool] = None) -> None:
            self.first(graph)
            run_framework(self.framework, graph, _looks_inference(graph) if is_inference is None else is_inference)

    _CLASSES = (InductorSwitchPass, ChainedPass)
    return _CLASSES


_CLASSES = None


def is_switch(value) -> bool:
    return _CLASSES is not None and isinstance(value, _CLASSES[0])


def framework_pass(value):
    """The framework's own pass inside a post_grad_custom_post_pass value (the value itself
    unless it is the switch): what the backend chains with, so that it never runs difffuse twice."""
    return value.framework if is_switch(value) else value


def _looks_inference(graph) -> bool:
    names = [str(n.target) for n in graph.nodes if n.op == "placeholder"]
    return not any(n.startswith(("primals", "tangents")) for n in names)


def _run_difffuse(cfg, graph, is_inference: bool) -> None:
    """DifffusePass on `graph`, recorded in the report; never raises."""
    from .report import GraphRecord, add_record

    state = getattr(_window, "state", None)
    if state is not None:
        state["ran"] = True
    name = f"inductor-switch{next(_counter)}"
    if cfg.disabled:
        add_record(GraphRecord(name, "inductor", notes=["DIFFFUSE_DISABLE is set: plain Inductor"]))
        return
    if not is_inference:
        add_record(GraphRecord(name, "inductor", notes=[
            "training graph (needs autograd): left to plain Inductor; difffuse rewrites inference graphs"]))
        return
    try:
        from .report import add_note, cpu_note
        from .pass_manager import DifffusePass

        fusion = DifffusePass(cfg, name)
        fusion(graph)  # restores the graph itself if a family fails
        values = [n.meta.get("val") for n in graph.nodes if n.op == "placeholder"]
        add_note(fusion.record, cpu_note(cfg, values))
    except Exception as exc:  # noqa: BLE001  never break a user's compile
        msg = f"the Inductor switch skipped a graph: {type(exc).__name__}: {str(exc)[:300]}"
        log.warning("difffuse: %s", msg)
        add_record(GraphRecord(name, cfg.lowering, notes=[msg]))


def _on_compile_start(*_args, **_kwargs) -> None:
    """Before each Dynamo compile: a fresh window; the switch back in front of a pass the
    framework assigned globally since; the lowering a cached graph may call, loaded."""
    if _installed is None:
        return
    _window.state = {"keyed": False, "ran": False}
    try:
        _wrap_current(_installed)
        _load_lowerings(_installed)
    except Exception as exc:  # noqa: BLE001
        log.warning("difffuse: the Inductor switch could not prepare a compile: %s: %s", type(exc).__name__, exc)


def _on_compile_end(*_args, **_kwargs) -> None:
    """A compile whose key included the switch but whose graphs never reached it: Inductor's
    cache answered. Its counts are unknown (a record saying so), never 0."""
    state = getattr(_window, "state", None)
    _window.state = None
    if _installed is None or not state or not state["keyed"] or state["ran"]:
        return
    try:
        from .report import GraphRecord, add_record

        add_record(GraphRecord(f"inductor-switch{next(_counter)}", _installed.lowering, cached=True, unknown=True,
                               notes=["Inductor's cache answered for a graph compiled under the Inductor switch: the "
                                      "pass did not run and the switch has no record of it (counts unknown)"]))
    except Exception:  # noqa: BLE001
        pass


def _load_lowerings(cfg) -> None:
    import torch

    from ..lowering import load_lowering
    from ..lowering import ops as _ops  # noqa: F401  (registers difffuse::* before a cached graph runs)
    from .device import device_of_tensor_type

    if cfg.lowering != "auto":
        load_lowering(cfg.lowering)
    elif torch.cuda.is_available():
        load_lowering(device_of_tensor_type("cuda"))


def _wrap_current(cfg) -> None:
    from torch._inductor import config as inductor_config

    current = inductor_config.post_grad_custom_post_pass
    if not is_switch(current):
        inductor_config.post_grad_custom_post_pass = _switch_class()(cfg, current)


def _ensure_callbacks() -> None:
    """Dynamo's compile-start/end callbacks, registered again where `torch._dynamo.reset()` cleared
    them (it clears every callback): called on install and whenever Inductor uses the switch."""
    try:
        from torch._dynamo.callback import callback_handler

        if _on_compile_start not in callback_handler.start_callbacks:
            callback_handler.register_start_callback(_on_compile_start)
        if _on_compile_end not in callback_handler.end_callbacks:
            callback_handler.register_end_callback(_on_compile_end)
    except Exception as exc:  # noqa: BLE001  a torch without these callbacks
        if not _callbacks:
            _callbacks.append(exc)
            log.warning("difffuse: no Dynamo compile callbacks on this torch (%s): the Inductor switch will not "
                        "re-wrap a pass set after it", exc)


def install(options: Optional[dict] = None):
    """Make difffuse's pass Inductor's post-grad custom pass for every compile in this process
    (chained with a pass already set there). `options`: difffuse's keys (lowering, patterns,
    attention_kernel), with the same DIFFFUSE_* overrides as the backend. Idempotent; returns
    the config it runs with. Raises OptionError for a bad option."""
    global _installed
    from .config import DIFFFUSE_KEYS, OptionError, parse_options

    extra = sorted(set(options or {}) - set(DIFFFUSE_KEYS) - {"inductor"})
    if extra or (options or {}).get("inductor", True) is not True:
        raise OptionError(f"difffuse: the Inductor switch takes difffuse's options only "
                          f"(lowering, patterns, attention_kernel), got {extra or ['inductor']}")
    cfg = parse_options(options)
    with _lock:
        _installed = cfg
        from torch._inductor import config as inductor_config

        current = inductor_config.post_grad_custom_post_pass
        inductor_config.post_grad_custom_post_pass = _switch_class()(cfg, framework_pass(current))
    _ensure_callbacks()
    log.info("difffuse: Inductor switch on (%s)", cfg.key())
    return cfg


def uninstall() -> None:
    """Turn the switch off: Inductor's post-grad custom pass is the framework's again."""
    global _installed
    with _lock:
        _installed = None
        from torch._inductor import config as inductor_config

        current = inductor_config.post_grad_custom_post_pass
        if is_switch(current):
            inductor_config.post_grad_custom_post_pass = current.framework


def active() -> bool:
    return _installed is not None


def autoload() -> None:
    """`DIFFFUSE_INDUCTOR_PASS` set: install the switch. Called while torch is being imported,
    so it never raises: a bad variable or a failure is one WARNING, and the switch stays off."""
    from .config import OptionError, env_flag

    try:
        if not env_flag(ENV) or env_flag("DIFFFUSE_DISABLE"):
            return
        install()
    except OptionError as exc:
        log.warning("%s; the Inductor switch stays off", exc)
    except Exception as exc:  # noqa: BLE001  an `import torch` must not fail because of difffuse
        log.warning("difffuse: the Inductor switch could not be installed (%s: %s); it stays off",
                    type(exc).__name__, exc)
