"""Reading the TOML files users hand to flowscore (job specs, training configs), and writing
the strings of the ones it writes for them (the demo's)."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any

__all__ = ["TomlFileError", "read_toml", "toml_string"]


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


def toml_string(value: str) -> str:
    """``value`` as a TOML basic string, quotes included: a path with ``"``, a backslash or
    a control character reads back unchanged. (JSON's escapes are a subset of TOML's; TOML
    also wants DEL escaped.)"""
    return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")
