"""How much of a structure a width prune keeps: a count of its units (an int) or the fraction kept (a float)."""

from __future__ import annotations


def kept_fraction(name: str, value: int | float, units: str) -> float | None:
    """The fraction of `units` that `value` keeps when it is a float in (0, 1), None when it is a count (an int).

    Anything else (a bool, a string, a float outside (0, 1)) is a `ValueError` naming `name`; the caller checks a
    count against the structure it prunes."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(
            f"{name} must be a count of {units} (int) or the fraction kept (float in (0, 1)), got {value!r}."
        )
    if isinstance(value, float) and not 0 < value < 1:
        raise ValueError(f"{name}={value} as a float is the fraction of {units} kept and must be in (0, 1).")
    return value if isinstance(value, float) else None
