"""The pattern families, loaded from the one family table (`difffuse.families`), in the
order the pass applies them."""
from __future__ import annotations

import importlib

from ..families import TABLE


def available_families() -> dict:
    """family name -> Family object, in table order, for the families whose module exists."""
    out = {}
    for entry in TABLE:
        try:
            out[entry.name] = importlib.import_module(entry.module).FAMILY
        except ModuleNotFoundError as exc:
            if exc.name != entry.module:
                raise
    return out
