"""The progress callback that long operations take: one line of text per call (the CLI
prints it on stderr; tests collect it)."""

from __future__ import annotations

from collections.abc import Callable

__all__ = ["Log"]

Log = Callable[[str], None]
