"""The one table of rewrite families: name, the module that defines it, the order the pass
applies them in, and whether it is on by default. Config (valid `patterns`), the pass
manager (which module to load, in which order) and the report (column order) read it."""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class FamilyEntry:
    name: str
    module: str  # holds FAMILY, a patterns.common.Family
    summary: str
    default: bool = True  # on unless `patterns` names the families


# in the order the pass applies them: larger patterns first, so a fused norm+rope is not
# split by the plain norm pattern
TABLE: tuple[FamilyEntry, ...] = (
    FamilyEntry("qk_norm_rope", "difffuse.patterns.qk_norm_rope", "q/k RMSNorm or LayerNorm + rotary embedding"),
    # ropes with no norm in front (the same recogniser; qk_norm_rope took the others)
    FamilyEntry("rope", "difffuse.patterns.rope_only", "rotary embedding with no norm in front"),
    FamilyEntry("norm_scale_shift", "difffuse.patterns.norm_scale_shift",
                "residual (+ gate) -> LayerNorm/RMSNorm -> AdaLN modulation"),
    # rms_norm's table plus the tensor-parallel variants
    FamilyEntry("rms_norm", "difffuse.patterns.rms_norm_tp", "RMSNorm (and its tensor-parallel form)"),
    FamilyEntry("scale_shift", "difffuse.patterns.scale_shift", "AdaLN `x*(k+scale)+shift`, gated residual"),
    # after the three families whose output it quantises (it rewrites their ops into fp8 twins)
    # off by default until its CUDA kernels have run on a GPU (issue 29): a Triton kernel that
    # fails in Inductor's code generation would break the user's compile, past the pass's guard
    FamilyEntry("fp8_quant", "difffuse.patterns.fp8_quant",
                "torchao float8 per-row activation quantisation fused into the norm/modulation before it",
                default=False),
    FamilyEntry("linear_gelu", "difffuse.patterns.linear_gelu", "Linear + tanh-GELU (cuBLASLt epilogue)"),
    # one node per site (an SDPA aten op), so its place in the order changes nothing
    FamilyEntry("attention", "difffuse.patterns.attention", "exact SDPA calls -> the device's attention kernel"),
)

NAMES: tuple[str, ...] = tuple(f.name for f in TABLE)
DEFAULTS: tuple[str, ...] = tuple(f.name for f in TABLE if f.default)
BY_NAME = {f.name: f for f in TABLE}
