"""Modules renamed for what they hold keep their old name for a while: the old module warns once and forwards every
name to the new one."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from types import ModuleType
from typing import Any

REMOVED_IN = "0.2.0"
"""The release without the old module names (`hf_recover.moved_modules` and the renamed modules' old names)."""


def forward_to(old: str, new: ModuleType) -> Callable[[str], Any]:
    """Warn that the module `old` moved to `new` (a `DeprecationWarning` at its import); return the module
    `__getattr__` that gives every name of `new`."""
    warnings.warn(
        f"{old} moved to {new.__name__}; import it from there (the old path is removed in hf_recover {REMOVED_IN}).",
        DeprecationWarning,
        stacklevel=3,
    )

    def __getattr__(name: str) -> Any:
        return getattr(new, name)

    return __getattr__
