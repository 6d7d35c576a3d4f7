"""Where flowscore keeps its embedded state on this machine.

Everything the embedded defaults write (the MLflow SQLite store and its artifacts, the
Iceberg SQL catalog and warehouse, the model cache) lives under one directory,
``$FLOWSCORE_HOME``, which defaults to ``~/.flowscore`` (see "Embedded defaults" in
DESIGN.md). This module imports nothing heavy: no MLflow, no Ray, no torch.
"""

from __future__ import annotations

from pathlib import Path

from .settings import HOME_ENV, Settings, current

__all__ = ["FLOWSCORE_HOME_ENV", "flowscore_home"]

FLOWSCORE_HOME_ENV = HOME_ENV


def flowscore_home(settings: Settings | None = None) -> Path:
    """Return flowscore's home directory, creating it if it does not exist.

    The directory is ``$FLOWSCORE_HOME`` when that variable is set and non-empty, else
    ``~/.flowscore``; ``~`` and environment variables in it are expanded and the result is
    made absolute (relative to the current working directory), so every later path derived
    from it is absolute too.
    """
    home = (settings or current()).home
    home.mkdir(parents=True, exist_ok=True)
    return home
