"""Module paths for the report: the qualified name (in the compiled root module) of the
module each graph node was traced in, also after a graph break and for `ModuleDict` keys
that are not identifiers. Read by the families' miss records (`patterns/common.py`) and the
report; it sits below the pass manager so that patterns never import `fusion_pass`."""
from __future__ import annotations

import logging
import re
import sys
import weakref
from typing import Optional

log = logging.getLogger("difffuse")


# ------------------------------------------------------------ module paths
# Dynamo names the modules a node was traced in (node.meta["nn_module_stack"]: {key: (source,
# class)}, outermost first) relative to the frame it traced: `L['self'].blocks[0].norm` in the
# compiled module's own frame, but `L['self'].norm` (or nothing, for code in the frame's own
# method) in a frame it compiled on its own (a submodule's forward, when a graph break in the
# caller's loop made Dynamo skip the caller) or resumed after a graph break
# (`torch_dynamo_resume_in_forward_at_N`, whose locals are the broken frame's). Its key is
# `str(id(module))` (unspecialized modules, the default since torch 2.5; "@N" for the N-th
# call of one module in a frame) or, for a specialized module, a name made from the source.
# So a path is read: from the module object the key names, looked up in the compiled root
# module; else from the source's base local (a module of the root) and the rest of the
# source; else from the source as written (relative to the traced frame). Everything is
# read from the compile in progress (the Python stack, Dynamo's current frame), once per
# graph: a graph compiled elsewhere keeps Dynamo's relative names.
_SOURCE_BASE = re.compile(r"^([LG])\[(['\"])(.*?)\2\]")
_SOURCE_STEP = re.compile(r"\.([^.\[\]]+)|\[(['\"])(.*?)\2\]|\[(-?\d+)\]")
_NOT_PATH = ("_modules", "__dict__", "_parameters", "_buffers")


def source_steps(source: str) -> tuple[Optional[str], list[str]]:
    """(base local or global name, the names after it) of a Dynamo source name:
    "L['self'].blocks[0]._modules['2-1']" -> ("self", ["blocks", "0", "2-1"]). Module
    containers' own attributes (`_modules`, ...) are not path components."""
    base = _SOURCE_BASE.match(source)
    rest = source[base.end():] if base else source
    steps = [a or c or d for a, _, c, d in _SOURCE_STEP.findall(rest)]
    if not base and steps and steps[0] == "self":  # an older spelling: "self.blocks.0"
        steps = steps[1:]
    return (base.group(3) if base else None), [s for s in steps if s not in _NOT_PATH]


def _source_name(source) -> str:
    name = getattr(source, "name", "")
    return name() if callable(name) else str(name)  # a method before torch 2.13


def compiled_root():
    """The module the compile in progress is for: the one given to `torch.compile` (an
    OptimizedModule's `_orig_mod`) or whose `.compile()` replaced its call (diffusers'
    regional compilation compiles each block so), the innermost on the Python stack; None
    for `torch.compile` of a function or outside a compile."""
    import torch

    try:
        from torch._dynamo.eval_frame import OptimizedModule
    except ImportError:  # pragma: no cover
        return None
    wrapped = torch.nn.Module._wrapped_call_impl.__code__
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name in ("__call__", "_wrapped_call_impl", "_call_impl"):
            mod = frame.f_locals.get("self")
            if isinstance(mod, OptimizedModule):
                return mod._orig_mod
            if frame.f_code is wrapped and getattr(mod, "_compiled_call_impl", None) is not None:
                return mod
        frame = frame.f_back
    return None


def _caller_module(ids: dict):
    """The innermost module of the root whose `_call_impl` is on the Python stack: the
    module whose forward called the frame being compiled."""
    import torch

    code = torch.nn.Module._call_impl.__code__
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code is code and id(frame.f_locals.get("self")) in ids:
            return ids[id(frame.f_locals["self"])]
        frame = frame.f_back
    return None


class ModuleNamer:
    """Module paths, in the compiled root module, for the nodes of one graph (see above).

    `ids`: id(module) -> path for every module of the root; `locals`: frame local -> path,
    for the traced frame's locals that are modules of the root; `own`: the path of the module
    whose method the traced frame runs (for nodes with no nn_module_stack); `inputs`: the
    source names of the Dynamo graph's placeholders, in order; `resumed`: the frame is a
    resume function or a frame Dynamo compiled on its own below the root's forward, so its
    frame-local inputs were computed before it (by a previous graph or eager code). Holds
    names only, never the frame's objects."""

    def __init__(self, tx=None, root=None):
        self.ids: dict[int, str] = {}
        self.locals: dict[str, str] = {}
        self.own: Optional[str] = None
        self.inputs: list[str] = []
        self.resumed = False
        self._cache: dict = {}
        if root is not None:
            for name, mod in root.named_modules(remove_duplicate=False):
                self.ids.setdefault(id(mod), name)
        if tx is not None:
            self._read_frame(tx)

    def _read_frame(self, tx) -> None:
        f_locals = getattr(tx, "f_locals", None) or {}
        self.locals = {k: self.ids[id(v)] for k, v in f_locals.items() if id(v) in self.ids}
        code = getattr(tx, "f_code", None)
        try:
            from torch._dynamo.resume_execution import ContinueExecutionCache

            meta = ContinueExecutionCache.generated_code_metadata.get(code)
        except Exception:  # noqa: BLE001  (another torch: no resume metadata)
            meta = None
        orig = getattr(meta, "code", None) or code
        first = orig.co_varnames[0] if orig is not None and orig.co_argcount else None
        self.own = self.locals.get(first) if first else None
        if self.own is None and self.ids:
            self.own = _caller_module(self.ids)
        self.resumed = meta is not None or self.own not in (None, "")
        try:
            placeholders = tx.output.graph.find_nodes(op="placeholder")
            self.inputs = [_source_name(getattr(p.meta.get("grapharg"), "source", None)) for p in placeholders]
        except Exception:  # noqa: BLE001
            self.inputs = []

    def path(self, key: str, source: str) -> str:
        """The path of the module an nn_module_stack entry names."""
        found = self._cache.get((key, source))
        if found is None:
            found = self._cache[(key, source)] = self._path(key, source)
        return found

    def _path(self, key: str, source: str) -> str:
        module_id = key.split("@", 1)[0]
        if module_id.isdigit() and int(module_id) in self.ids:
            return self.ids[int(module_id)]
        base, steps = source_steps(source)
        prefix = self.locals.get(base) if base else None
        return ".".join(([prefix] if prefix else []) + steps)

    def input_source(self, index: int) -> Optional[str]:
        """The Dynamo source name of graph input `index` ("L['x']"), if known."""
        return self.inputs[index] if 0 <= index < len(self.inputs) else None


_NAMERS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def module_namer(graph) -> ModuleNamer:
    """The ModuleNamer of `graph`, made at its first use from the compile in progress."""
    namer = _NAMERS.get(graph) if graph is not None else None
    if namer is None:
        try:
            from torch._dynamo.symbolic_convert import InstructionTranslator

            tx = InstructionTranslator.current_tx()
        except Exception:  # noqa: BLE001  (not inside a Dynamo trace)
            tx = None
        try:
            namer = ModuleNamer(tx, compiled_root() if tx is not None else None)
        except Exception as exc:  # noqa: BLE001  (paths are a report detail: never a failed compile)
            log.debug("difffuse: module paths stay as Dynamo named them: %s", exc)
            namer = ModuleNamer()
        if graph is not None:
            _NAMERS[graph] = namer
    return namer
