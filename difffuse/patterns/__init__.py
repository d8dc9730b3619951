"""The pattern families, in the order the pass applies them (larger patterns first,
so a fused norm+rope is not split by the plain norm pattern)."""
from __future__ import annotations

import importlib

# family name -> module holding FAMILY (a patterns.common.Family)
FAMILY_MODULES = {
    "qk_norm_rope": "difffuse.patterns.qk_norm_rope",
    "norm_scale_shift": "difffuse.patterns.norm_scale_shift",
    "rms_norm": "difffuse.patterns.rms_norm_tp",  # rms_norm's table + the tensor-parallel variants
    "scale_shift": "difffuse.patterns.scale_shift",
    "linear_gelu": "difffuse.patterns.linear_gelu",
}


def available_families() -> dict:
    """family name -> Family object, for the families whose module exists."""
    out = {}
    for name, module in FAMILY_MODULES.items():
        try:
            out[name] = importlib.import_module(module).FAMILY
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise
    return out
