"""The device table: which lowering implements each family (data, not if-chains).

A lowering module exposes ``IMPLS`` (family -> callable with the reference op's
signature) and ``supports(site) -> None | reason`` — the one eligibility predicate that
the pattern check, the lowering and the tests share. ``site`` is a typed record of one op
call (``lowering/sites.py``: operands as ``TensorSpec`` — shape, strides, dtype, device,
computed — and constants; the family is ``site.FAMILY``), never graph nodes, so nothing
under ``lowering/`` imports ``patterns/`` and each rule is testable without a graph.
``"inductor"`` and ``"musa"`` map to no lowering: no rewrite, plain Inductor.
"""
from __future__ import annotations

import contextlib
import contextvars
import importlib
import logging
from types import ModuleType
from typing import Optional

log = logging.getLogger("difffuse")

# lowering name -> (module, package it needs, fallback lowering if that package is missing)
DEVICE_TABLE: dict[str, Optional[tuple[str, Optional[str], Optional[str]]]] = {
    "reference": ("difffuse.lowering.reference", None, None),
    "cuda": ("difffuse.lowering.cuda", "triton", "inductor"),
    "rocm": ("difffuse.lowering.rocm", "aiter", "inductor"),
    "npu": ("difffuse.lowering.npu", "sgl_kernel_npu", "inductor"),
    "musa": None,
    "inductor": None,
}

# The backend option `attention_kernel` ("auto" | "fa4" | "fa3"), set by the pass while it
# runs (it is part of the pass's cache key); the CUDA attention lowering reads it.
ATTENTION_KERNEL: contextvars.ContextVar[str] = contextvars.ContextVar("difffuse_attention_kernel", default="auto")


@contextlib.contextmanager
def attention_kernel(name: str):
    token = ATTENTION_KERNEL.set(name)
    try:
        yield
    finally:
        ATTENTION_KERNEL.reset(token)


_warned: set[str] = set()


def load_lowering(name: str) -> tuple[str, Optional[ModuleType]]:
    """Return (effective name, module) for a lowering; None module = plain Inductor.
    A lowering whose module or vendor package fails to import falls back, with one WARNING."""
    entry = DEVICE_TABLE[name]
    if entry is None:
        return name, None
    module_name, package, fallback = entry
    try:
        return name, importlib.import_module(module_name)
    except ImportError as exc:
        if name not in _warned:
            _warned.add(name)
            if isinstance(exc, ModuleNotFoundError) and exc.name == module_name:
                log.warning("difffuse: the %r lowering is not part of this difffuse build; falling back to %s",
                            name, fallback)
            else:
                log.warning("difffuse: lowering %r needs %s (%s); falling back to %s",
                            name, package or module_name, exc, fallback)
        if fallback is None:
            raise
        return load_lowering(fallback)
