"""Numbers from ``FLOWSCORE_*`` environment variables, checked in one place: a value that is
not a finite number in range is one clear error naming the variable (exit code 2), never a
traceback and never silently 0 or negative."""

from __future__ import annotations

import math
import os

__all__ = ["SettingError", "env_number"]


class SettingError(ValueError):
    """A ``FLOWSCORE_*`` variable has a bad value (exit code 2)."""


def env_number(
    name: str,
    default: float,
    *,
    minimum: float,
    integer: bool = False,
    above: bool = False,
    error: type[SettingError] = SettingError,
) -> float:
    """``name``'s value, or ``default`` when unset or blank. It must be a finite number (an
    integer if ``integer``) ``>= minimum`` (``> minimum`` if ``above``); else ``error``."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value: float | None = int(raw) if integer else float(raw)
    except ValueError:
        value = None
    ok = value is not None and math.isfinite(value)
    ok = ok and (value > minimum if above else value >= minimum)  # type: ignore[operator]
    if not ok:
        kind = "an integer" if integer else "a number"
        bound = f"> {minimum:g}" if above else f">= {minimum:g}"
        raise error(f"{name} must be {kind} {bound}, got {raw!r}")
    assert value is not None
    return value
