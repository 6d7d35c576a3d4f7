"""``flowscore train``: the spec from a preset and a TOML file, and progress on stderr; the
use case is :func:`pipelines.usecases.train.run_train`."""

from __future__ import annotations

import sys
from typing import Any

from pipelines.log import Log
from pipelines.usecases.train import TrainUsageError, resolve_spec

__all__ = ["load_spec", "stderr_log"]


def load_spec(
    preset: str,
    config: str | None,
    max_epochs: int | None = None,
    calibrate_by: str | None = None,
) -> Any:
    """The preset's spec with the TOML file's fields replaced. Unknown keys, bad values and
    unreadable files raise TrainUsageError naming the file and key."""
    data = None
    if config:
        from jobs.tomlfile import TomlFileError, read_toml

        try:
            data = read_toml(config, "config file")
        except TomlFileError as e:
            raise TrainUsageError(str(e)) from e
    return resolve_spec(preset, data, str(config), max_epochs, calibrate_by)


def stderr_log(quiet: bool) -> Log:
    """Progress lines on stderr (none with ``quiet``)."""

    def log(msg: str) -> None:
        if not quiet:
            print(msg, file=sys.stderr, flush=True)

    return log
