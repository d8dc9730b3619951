"""Tiny models compiled once per test session: each compile of a tiny DiT costs 8-20 s on a
2-core CPU, so the coverage tests and the report-honesty test share them.

`compile_tiny(name, num_layers, dtype, regional)` builds the model (a builder of
`tiny_models.MODELS` or `tiny_dits.DITS`), counts its eager sites, runs it eagerly and
compiled with the difffuse backend (reference lowering unless told) on a fresh Dynamo
state, and keeps the result for the next caller with the same arguments. Counts are only
right where Inductor's FX-graph cache is off or cold (the test conftest sees to it).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import torch

from . import sites
from .tiny_dits import DITS
from .tiny_models import MODELS

BUILDERS = {**MODELS, **DITS}


@dataclasses.dataclass
class Compiled:
    name: str
    num_layers: int
    dtype: torch.dtype
    regional: bool
    model: torch.nn.Module
    kwargs: dict
    ref: torch.Tensor  # eager output
    out: torch.Tensor  # compiled output
    report: Any  # difffuse.report() right after the compiled run
    eager: sites.EagerSites  # paths relative to the model (match a full-model compile's)

    def coverage(self) -> dict:
        return sites.coverage(self.eager, self.report)

    def honesty(self) -> dict:
        return sites.honesty(self.eager, self.report)

    def table(self) -> str:
        return sites.format_table(f"{self.name} ({self.num_layers} layers)", self.coverage(), self.eager)


_CACHE: dict = {}


def compile_tiny(name: str, num_layers: int = 2, dtype: torch.dtype = torch.float32, regional: bool = False,
                 lowering: str = "reference", options: Optional[dict] = None) -> Compiled:
    import difffuse

    opts = {"lowering": lowering, **(options or {})}
    key = (name, num_layers, dtype, regional, tuple(sorted(opts.items())))
    if key in _CACHE:
        return _CACHE[key]
    model, kwargs = BUILDERS[name](num_layers=num_layers, dtype=dtype)
    eager = sites.count_eager_sites(model, kwargs)
    torch._dynamo.reset()
    difffuse.reset_report()
    with torch.no_grad():
        ref = model(**kwargs)[0]
        if regional:
            model.compile_repeated_blocks(backend="difffuse", options=opts)
            out = model(**kwargs)[0]
        else:
            out = torch.compile(model, backend="difffuse", options=opts)(**kwargs)[0]
    result = Compiled(name, num_layers, dtype, regional, model, kwargs, ref, out, difffuse.report(), eager)
    _CACHE[key] = result
    return result


def clear() -> None:
    _CACHE.clear()
