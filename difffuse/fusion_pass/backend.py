"""`torch.compile(m, backend="difffuse", options={...})`: Inductor with the difffuse
post-grad pass (or, with `inductor=False`, the rewritten aten graph run eagerly).

Warm caches: on an FX-graph or AOTAutograd cache hit Inductor does not run its post-grad
passes, so the pass's record of matches is stored on disk and loaded on a hit. Inductor's
FX-graph cache keys the post-AOTAutograd graph (names normalised: arg0_1, primals_1, ...);
AOTAutograd's keys the Dynamo graph (the user's variable names). So the record is stored
under both levels' keys: the graph `compile_fx_inner` receives (through `compile_fx`'s
`inner_compile` parameter, with Inductor's own cache key where the output carries it) and
the Dynamo graph. A hit with no record gives a graph with *unknown* counts, never zeros."""
from __future__ import annotations

import hashlib
import itertools
import logging
import sys
from typing import Any, Optional

import torch

from ..lowering import load_lowering
from ..lowering import ops as _ops  # noqa: F401  (registers difffuse::* before any cached graph runs)
from .config import OptionError, parse_options
from .device import detect_from_tensors
from .inductor_hook import chained, framework_pass
from .pass_manager import DifffusePass, source_hash
from .report import GraphRecord, add_note, add_record, cpu_note, load_record, save_record

log = logging.getLogger("difffuse")
_counter = itertools.count()


def _inputs_meta(example_inputs) -> str:
    parts = []
    for t in example_inputs:
        if isinstance(t, torch.Tensor):
            parts.append(f"{t.dtype}{tuple(t.shape)}{t.stride()}{t.device.type}")
        else:
            parts.append(repr(t))
    return ";".join(parts)


def _config_meta(cfg) -> str:
    return f"{cfg.key()};{cfg.inductor_options!r};{source_hash()}"


def _entry_key(gm: torch.fx.GraphModule, example_inputs, cfg) -> str:
    """The Dynamo-level key: the Dynamo graph (its code holds the user's variable names),
    its inputs' metadata, the config. Only an AOTAutograd cache hit, which never reaches
    Inductor's inner compile, is looked up by it."""
    h = hashlib.sha256()
    h.update(gm.code.encode())
    h.update(_inputs_meta(example_inputs).encode())
    h.update(f"{_config_meta(cfg)};{torch.is_grad_enabled()}".encode())
    return "dynamo-" + h.hexdigest()[:32]


def _graph_code(gm: torch.fx.GraphModule) -> str:
    """The code of a post-AOTAutograd graph and its subgraphs, comments dropped. AOTAutograd
    names the inputs (arg0_1, primals_1, ...) and nodes after their ops, so this does not
    depend on the user's variable names (as Inductor's FX-graph cache key does not)."""
    out = []
    for name, mod in sorted(gm.named_modules(), key=lambda kv: kv[0]):
        if isinstance(mod, torch.fx.GraphModule):
            out.append(f"## {name}")
            out += [ln.rstrip() for ln in mod.code.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    return "\n".join(out)


def _graph_key(gm: torch.fx.GraphModule, example_inputs, cfg) -> str:
    """The key of the graph Inductor compiles (what `compile_fx_inner` receives, on a cache hit
    and a miss alike): its normalised code, its inputs' metadata, the difffuse config and
    sources. Stored beside Inductor's own FX-graph cache key and looked up after it, so the
    record is found on a torch that does not expose that key or where its record was lost."""
    h = hashlib.sha256()
    h.update(_graph_code(gm).encode())
    h.update(_inputs_meta(example_inputs).encode())
    h.update(_config_meta(cfg).encode())
    return "graph-" + h.hexdigest()[:32]


def _has_calls(gm: torch.fx.GraphModule) -> bool:
    return any("call" in n.op for n in gm.graph.nodes)


class _InnerCompile:
    """`compile_fx(..., inner_compile=this)`: Inductor calls it with the post-AOTAutograd graph
    before its post-grad passes, on an FX-graph cache hit and a miss alike (an AOTAutograd
    cache hit does not call it). It keys the record as Inductor keys the compiled graph: the
    pass stores its record under the graph key (`_graph_key`), copied here under Inductor's own
    cache key (`_fx_graph_cache_key` on the output, set on a hit and a miss where this torch has
    it); when the pass did not run, the record is loaded by those keys and stored back under
    whichever lacked it."""

    def __init__(self, fusion: DifffusePass, cfg, name: str):
        self.fusion, self.cfg, self.name = fusion, cfg, name
        self.record: Optional[GraphRecord] = None  # the record of the last inner compile
        self.called = False

    def __call__(self, gm: torch.fx.GraphModule, example_inputs, *args, **kwargs):
        from torch._inductor.compile_fx import compile_fx_inner

        self.called = True
        gkey = _graph_key(gm, example_inputs, self.cfg)
        has_calls = _has_calls(gm)
        self.fusion.record_key, self.fusion.record = gkey, None  # the pass saves under the graph key
        compiled = compile_fx_inner(gm, example_inputs, *args, **kwargs)
        ikey = getattr(compiled, "_fx_graph_cache_key", None)  # Inductor's own key (hit or miss)
        ikey = f"inductor-{ikey}" if isinstance(ikey, str) and ikey else None
        if self.fusion.record is not None:  # a miss: the pass recorded this graph (add_record) and saved it
            self.record = self.fusion.record
            if ikey:
                save_record(ikey, self.record)
        elif not has_calls:  # Inductor returns such a graph as is, without its passes
            self.record = GraphRecord(self.name, self.cfg.lowering, notes=[
                "no operations to compile: Inductor ran no passes on this graph"])
            add_record(self.record)
        else:  # Inductor's FX-graph cache answered
            by_ikey, by_gkey = load_record(ikey), load_record(gkey)
            self.record = _cached(self.name, self.cfg, by_ikey or by_gkey)
            save_record([k for k, r in ((ikey, by_ikey), (gkey, by_gkey)) if k and r is None], self.record)
        return compiled


def _cached(name: str, cfg, rec: Optional[GraphRecord]) -> GraphRecord:
    """The record of a graph the pass did not run on, added to the report: as first recorded,
    or with unknown counts (never zeros) when no record was found."""
    if rec is None:
        rec = GraphRecord(name, cfg.lowering, cached=True, unknown=True)
    rec.graph = name
    add_record(rec)
    return rec


def _is_training(example_inputs) -> bool:
    return torch.is_grad_enabled() and any(
        isinstance(t, torch.Tensor) and t.requires_grad for t in example_inputs)


def _surfaced(exc: OptionError) -> Exception:
    """`exc` as the error the user reads. Dynamo wraps a backend's exception in
    BackendCompilerFailed ("backend='difffuse' raised:" first, the message second, under the
    traceback of Dynamo's internals) but passes a ShortenTraceback through as is, cut to the
    frame that raised it. So a bad option is raised as an exception that is both the
    OptionError (a ValueError, or TypeError) and a ShortenTraceback: its message is the first
    line after the traceback, and the traceback is the user's call and this frame. Where this
    torch lacks ShortenTraceback, `exc` itself (Dynamo wraps it)."""
    try:
        from torch._dynamo.exc import ShortenTraceback
    except ImportError:
        return exc
    cls = _SURFACED.get(type(exc))
    if cls is None:
        try:
            cls = type(type(exc).__name__, (ShortenTraceback, type(exc)),
                       {"__module__": type(exc).__module__, "real_stack": _NO_STACK})
        except TypeError:  # an incompatible base layout on some torch: leave it to Dynamo
            return exc
        _SURFACED[type(exc)] = cls
    try:
        return cls(str(exc), first_useful_frame=sys._getframe(1))
    except TypeError:  # a ShortenTraceback with another constructor
        return exc


_SURFACED: dict[type, type] = {}


def _no_stack(self):
    raise AttributeError("real_stack")


# Dynamo attaches the traced user stack to an exception as `real_stack` (only where it has none)
# and, where it finds one, appends "from user code: ..." and "Set TORCHDYNAMO_VERBOSE=1 ... (please
# do this especially if you're reporting a bug to PyTorch)" to the message. An option error is not
# a PyTorch bug: the attribute reads as absent and what Dynamo stores is dropped.
_NO_STACK = property(_no_stack, lambda self, value: None)


def difffuse_backend(gm: torch.fx.GraphModule, example_inputs, options: Optional[dict] = None,
                     mode: Optional[str] = None) -> Any:
    """The `difffuse` torch.compile backend."""
    from torch._inductor.compile_fx import compile_fx

    try:
        cfg = parse_options(options, mode)
    except OptionError as exc:
        raise _surfaced(exc) from None
    patches = dict(cfg.inductor_options)
    # plain-Inductor paths below keep a framework's own post-grad pass, but not the Inductor switch
    patches["post_grad_custom_post_pass"] = _framework_pass(patches)
    name = f"graph{next(_counter)}"
    if cfg.disabled:
        add_record(GraphRecord(name, "inductor", notes=["DIFFFUSE_DISABLE is set: plain Inductor"]))
        return compile_fx(gm, example_inputs, config_patches=patches)
    if _is_training(example_inputs):
        add_record(GraphRecord(name, "inductor", notes=[
            "training graph (grad enabled): left to plain Inductor; difffuse rewrites inference graphs"]))
        return compile_fx(gm, example_inputs, config_patches=patches)
    key = _entry_key(gm, example_inputs, cfg)
    # A cached compiled graph calls the lowering's ops without running the pass: load it now.
    load_lowering(detect_from_tensors(example_inputs) if cfg.lowering == "auto" else cfg.lowering)
    note = cpu_note(cfg, example_inputs)
    fusion = DifffusePass(cfg, name, key)
    if not cfg.inductor:
        compiled = _run_eager(gm, example_inputs, fusion)
        add_note(fusion.record, note)
        return compiled
    patches["post_grad_custom_post_pass"] = chained(fusion, patches["post_grad_custom_post_pass"])
    inner = _InnerCompile(fusion, cfg, name)
    compiled = compile_fx(gm, example_inputs, inner_compile=inner, config_patches=patches)
    if inner.called:
        if inner.record is not None:  # so that an AOTAutograd cache hit on this Dynamo graph finds it
            save_record(key, inner.record)
            add_note(inner.record, note)  # after saving: the note is about this process's device
    else:  # AOTAutograd's cache answered: only the Dynamo-level key can find the record
        add_note(_cached(name, cfg, load_record(key)), note)
    return compiled


def _framework_pass(patches: dict):
    """The post-grad pass already set for this compile (in `options`, else Inductor's config), not
    counting the Inductor switch: the backend runs it after its own instead of dropping it."""
    from torch._inductor import config as inductor_config

    key = "post_grad_custom_post_pass"
    return framework_pass(patches[key] if key in patches else inductor_config.post_grad_custom_post_pass)


def _run_eager(gm, example_inputs, fusion: DifffusePass):
    """AOTAutograd with Inductor's decompositions, the pass, then the aten graph run as is."""
    from functorch.compile import make_boxed_func
    from torch._functorch.aot_autograd import aot_module_simplified
    from torch._inductor.decomposition import select_decomp_table

    def fw_compiler(fx_gm: torch.fx.GraphModule, _inputs):
        fusion(fx_gm.graph)
        fx_gm.recompile()
        return make_boxed_func(fx_gm.forward)

    return aot_module_simplified(gm, example_inputs, fw_compiler=fw_compiler,
                                 decompositions=select_decomp_table())
