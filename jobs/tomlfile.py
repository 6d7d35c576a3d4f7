"""Reading the TOML files users hand to flowscore (job specs, training configs)."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

__all__ = ["TomlFileError", "read_toml"]


class TomlFileError(ValueError):
    """A file that cannot be read as TOML; the message names the file and why."""


def read_toml(path: str | Path, what: str) -> dict[str, Any]:
    """Parse ``path``; ``what`` names the file's role in errors ("job spec", "config file")."""
    try:
        return tomllib.loads(Path(path).read_text())
    except FileNotFoundError:
        raise TomlFileError(f"{path}: {what} not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise TomlFileError(f"{path}: cannot read ({e})") from e
    except tomllib.TOMLDecodeError as e:
        raise TomlFileError(f"{path}: not valid TOML ({e})") from e
