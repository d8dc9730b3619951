"""Backend options: parsing, validation and the frozen config the pass and cache key use."""
from __future__ import annotations

import dataclasses
import difflib
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


class OptionError(ValueError):
    """A bad `torch.compile(..., backend="difffuse", options=...)` value or `DIFFFUSE_*`
    variable. The message starts with "difffuse:" and names the option and its valid values."""


class OptionTypeError(OptionError, TypeError):
    """An option of the wrong type (`options` not a mapping, `patterns` not names)."""


_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off", "")


def env_flag(name: str, default: bool = False) -> bool:
    """The boolean environment variable `name`: 1/true/yes/on or 0/false/no/off/"" (any case,
    surrounding spaces ignored); unset gives `default`. Any other value is an OptionError that
    names the variable and the valid spellings."""
    raw = os.environ.get(name)
    if raw is None:
        return default
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise OptionError(f"difffuse: environment variable {name} is {raw!r}, not a boolean; valid (any case): "
                      "1, true, yes, on to turn it on; 0, false, no, off or empty to leave it off")


def _did_you_mean(name: Any, candidates) -> str:
    if not isinstance(name, str):
        return ""
    close = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.75)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _choice(value: Any, valid: tuple[str, ...], label: str, kind: str) -> str:
    """`value` if it is one of `valid`, else an OptionError naming `label` and the valid values."""
    if isinstance(value, str) and value in valid:
        return value
    raise OptionError(f"difffuse: {label} is {value!r}, not a valid {kind}{_did_you_mean(value, valid)}; "
                      f"valid: {', '.join(valid)}")


def _patterns(patterns: Any) -> tuple[str, ...]:
    valid = ", ".join(PATTERN_NAMES)
    if isinstance(patterns, str):
        patterns = (patterns,)
    if not isinstance(patterns, (list, tuple, set, frozenset)) or not all(isinstance(p, str) for p in patterns):
        raise OptionTypeError(f"difffuse: option 'patterns' must be a family name or a list of them, "
                              f"got {patterns!r}; valid families: {valid} (leave it out for all)")
    bad = [p for p in patterns if p not in PATTERN_NAMES]
    if bad:
        hint = _did_you_mean(bad[0], PATTERN_NAMES)
        raise OptionError(f"difffuse: unknown pattern(s) {bad}{hint} in option 'patterns'; valid: {valid}")
    return tuple(patterns)


def parse_options(options: Optional[Mapping[str, Any]] = None, mode: Optional[str] = None) -> FusionConfig:
    """Validate `torch.compile(..., options=...)` for the difffuse backend.

    difffuse keys: lowering, patterns, inductor, attention_kernel. Any other key must be
    an Inductor config option and passes through to Inductor; anything else is an error
    that names the valid keys (and the closest one). `DIFFFUSE_LOWERING` overrides
    `lowering`, `DIFFFUSE_ATTENTION_KERNEL` overrides `attention_kernel`;
    `DIFFFUSE_DISABLE=1` (or true/yes/on; 0/false/no/off/"" leave it on) turns the backend into
    plain Inductor. Errors are `OptionError`
    (a ValueError; `OptionTypeError`, also a TypeError, for a value of the wrong type).
    """
    from torch._inductor import config as inductor_config

    if options is None:
        options = {}
    if not isinstance(options, Mapping):
        raise OptionTypeError(
            f"difffuse: options must be a dict, got {type(options).__name__} {options!r}; "
            f"e.g. options={{'lowering': 'reference'}}. difffuse keys: {', '.join(DIFFFUSE_KEYS)}")
    options = dict(options)
    lowering = options.pop("lowering", "auto")
    patterns = options.pop("patterns", DEFAULT_PATTERNS)
    run_inductor = options.pop("inductor", True)
    attention_kernel = options.pop("attention_kernel", "auto")
    valid_inductor = set(inductor_config.get_config_copy().keys())
    unknown = sorted((k for k in options if k not in valid_inductor), key=str)
    if unknown:
        hint = _did_you_mean(unknown[0], (*DIFFFUSE_KEYS, *sorted(valid_inductor)))
        raise OptionError(
            f"difffuse: unknown option {', '.join(map(repr, unknown))}{hint}. Valid difffuse options: "
            f"{', '.join(DIFFFUSE_KEYS)}; any other key must be an Inductor config option "
            "(torch._inductor.config).")
    env_lowering = os.environ.get("DIFFFUSE_LOWERING")
    if env_lowering:
        lowering = _choice(env_lowering, LOWERING_NAMES, "environment variable DIFFFUSE_LOWERING", "lowering")
    else:
        lowering = _choice(lowering, LOWERING_NAMES, "option 'lowering'", "lowering")
    env_kernel = os.environ.get("DIFFFUSE_ATTENTION_KERNEL")
    if env_kernel:
        attention_kernel = _choice(env_kernel, ATTENTION_KERNELS, "environment variable DIFFFUSE_ATTENTION_KERNEL",
                                   "attention kernel")
    else:
        attention_kernel = _choice(attention_kernel, ATTENTION_KERNELS, "option 'attention_kernel'",
                                   "attention kernel")
    patterns = _patterns(patterns)
    if not isinstance(run_inductor, bool):
        raise OptionTypeError(f"difffuse: option 'inductor' must be True or False, got {run_inductor!r}")
    if mode not in (None, "default"):
        options.update(_mode_options(mode))
    return FusionConfig(
        lowering=lowering,
        patterns=tuple(p for p in PATTERN_NAMES if p in patterns),
        inductor=run_inductor,
        attention_kernel=attention_kernel,
        inductor_options=tuple(sorted(options.items())),
        disabled=env_flag("DIFFFUSE_DISABLE"),
    )


def _mode_options(mode: str) -> dict[str, Any]:
    from torch._inductor import list_mode_options

    try:
        return dict(list_mode_options(mode))
    except (RuntimeError, KeyError) as exc:
        raise OptionError(f"difffuse: unknown mode {mode!r}: {exc}") from None
