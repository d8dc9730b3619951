"""`torch.compile(m, backend="difffuse", options={...})`: Inductor with the difffuse
post-grad pass (or, with `inductor=False`, the rewritten aten graph run eagerly)."""
from __future__ import annotations

import hashlib
import itertools
import logging
from typing import Any, Optional

import torch

from ..lowering import load_lowering
from ..lowering import ops as _ops  # noqa: F401  (registers difffuse::* before any cached graph runs)
from .config import parse_options
from .device import detect_from_tensors
from .pass_manager import DifffusePass, source_hash
from .report import GraphRecord, add_record, load_record

log = logging.getLogger("difffuse")
_counter = itertools.count()


def _entry_key(gm: torch.fx.GraphModule, example_inputs, cfg) -> str:
    """A key for the compiled entry: the Dynamo graph, its inputs' metadata, the config."""
    h = hashlib.sha256()
    h.update(gm.code.encode())
    for t in example_inputs:
        if isinstance(t, torch.Tensor):
            h.update(f"{t.dtype}{tuple(t.shape)}{t.stride()}{t.device.type}".encode())
        else:
            h.update(repr(t).encode())
    h.update(f"{cfg.key()};{source_hash()};{torch.is_grad_enabled()}".encode())
    return h.hexdigest()[:32]


def _is_training(example_inputs) -> bool:
    return torch.is_grad_enabled() and any(
        isinstance(t, torch.Tensor) and t.requires_grad for t in example_inputs)


def difffuse_backend(gm: torch.fx.GraphModule, example_inputs, options: Optional[dict] = None,
                     mode: Optional[str] = None) -> Any:
    """The `difffuse` torch.compile backend."""
    from torch._inductor.compile_fx import compile_fx

    cfg = parse_options(options, mode)
    patches = dict(cfg.inductor_options)
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
    fusion = DifffusePass(cfg, name, key)
    if not cfg.inductor:
        return _run_eager(gm, example_inputs, fusion)
    patches["post_grad_custom_post_pass"] = fusion
    compiled = compile_fx(gm, example_inputs, config_patches=patches)
    if not fusion.ran:  # Inductor's cache answered, or the graph had nothing to compile
        rec = load_record(key) or GraphRecord(name, cfg.lowering, cached=True, notes=[
            "Inductor did not run its post-grad passes on this graph (a cache hit whose matches this "
            "difffuse did not record, or a graph with no operations to compile)"])
        rec.graph = name
        add_record(rec)
    return compiled


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
