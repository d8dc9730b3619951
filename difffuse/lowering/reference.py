"""The reference lowering: the pure-PyTorch `difffuse::*` ops, on any device."""
from __future__ import annotations

from .ops import REFERENCE as IMPLS  # noqa: F401


def supports(site) -> None:
    """The reference ops take every site a pattern accepts (any typed site record)."""
    return None
