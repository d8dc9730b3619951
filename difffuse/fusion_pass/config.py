"""Backend options: parsing, validation and the frozen config the pass and cache key use."""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping, Optional

from ..families import DEFAULTS as DEFAULT_PATTERNS
from ..families import NAMES as PATTERN_NAMES

LOWERING_NAMES = ("auto", "reference", "cuda", "rocm", "npu", "musa", "inductor")
DIFFFUSE_KEYS = ("lowering", "patterns", "inductor", "attention_kernel")
ATTENTION_KERNELS = ("auto", "fa4", "fa3")


@dataclasses.dataclass(frozen=True)
class FusionConfig:
    lowering: str = "auto"
    patterns: tuple[str, ...] = DEFAULT_PATTERNS
    inductor: bool = True
    inductor_options: tuple[tuple[str, Any], ...] = ()
    disabled: bool = False
    attention_kernel: str = "auto"  # CUDA: "auto" = the measured preference, or "fa4" / "fa3" only

    def key(self) -> str:
        return (f"lowering={self.lowering};patterns={','.join(self.patterns)};inductor={self.inductor};"
                f"attention_kernel={self.attention_kernel}")


def parse_options(options: Optional[Mapping[str, Any]] = None, mode: Optional[str] = None) -> FusionConfig:
    """Validate `torch.compile(..., options=...)` for the difffuse backend.

    difffuse keys: lowering, patterns, inductor, attention_kernel. Any other key must be
    an Inductor config option and passes through to Inductor; anything else is an error
    that names the valid keys. `DIFFFUSE_LOWERING` overrides `lowering`,
    `DIFFFUSE_ATTENTION_KERNEL` overrides `attention_kernel`; `DIFFFUSE_DISABLE=1` turns
    the backend into plain Inductor.
    """
    from torch._inductor import config as inductor_config

    options = dict(options or {})
    lowering = options.pop("lowering", "auto")
    patterns = options.pop("patterns", DEFAULT_PATTERNS)
    run_inductor = options.pop("inductor", True)
    attention_kernel = os.environ.get("DIFFFUSE_ATTENTION_KERNEL") or options.pop("attention_kernel", "auto")
    options.pop("attention_kernel", None)
    valid_inductor = set(inductor_config.get_config_copy().keys())
    unknown = sorted(k for k in options if k not in valid_inductor)
    if unknown:
        raise ValueError(
            f"difffuse: unknown option(s) {unknown}. Valid difffuse options: {list(DIFFFUSE_KEYS)}; "
            "any other key must be an Inductor config option (torch._inductor.config)."
        )
    env_lowering = os.environ.get("DIFFFUSE_LOWERING")
    if env_lowering:
        lowering = env_lowering
    if lowering not in LOWERING_NAMES:
        raise ValueError(f"difffuse: unknown lowering {lowering!r}; valid: {list(LOWERING_NAMES)}")
    if isinstance(patterns, str):
        patterns = (patterns,)
    valid_patterns = PATTERN_NAMES
    bad = [p for p in patterns if p not in valid_patterns]
    if bad:
        raise ValueError(f"difffuse: unknown pattern(s) {bad}; valid: {list(valid_patterns)}")
    if attention_kernel not in ATTENTION_KERNELS:
        raise ValueError(f"difffuse: unknown attention_kernel {attention_kernel!r}; valid: {list(ATTENTION_KERNELS)}")
    if not isinstance(run_inductor, bool):
        raise ValueError(f"difffuse: option 'inductor' must be True or False, got {run_inductor!r}")
    if mode not in (None, "default"):
        options.update(_mode_options(mode))
    return FusionConfig(
        lowering=lowering,
        patterns=tuple(p for p in valid_patterns if p in patterns),
        inductor=run_inductor,
        attention_kernel=attention_kernel,
        inductor_options=tuple(sorted(options.items())),
        disabled=os.environ.get("DIFFFUSE_DISABLE", "") not in ("", "0"),
    )


def _mode_options(mode: str) -> dict[str, Any]:
    from torch._inductor import list_mode_options

    return dict(list_mode_options(mode))
