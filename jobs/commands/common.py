"""What the commands share: exit codes, the usage error, argparse types, the options that
several commands declare (as parent parsers) and the preset names. Imports nothing heavy:
``flowscore --help`` must answer at once."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_ERROR_RATE = 0, 1, 2, 3
# names of flowcore.fit.PRESETS, repeated here so --help needs no torch import (a test checks)
PRESET_NAMES = (
    "grain-full",
    "grain-quarter",
    "grain-fine",
    "grain-multiscale",
    "cnn",
    "cnn-mobilenet",
    "ae-flow",
)


class UsageError(Exception):
    """Bad input from the user: printed without a traceback, exit code 2."""


def parse_only(values: list[str] | None) -> tuple[tuple[str, tuple[str, ...]], ...]:
    out: dict[str, tuple[str, ...]] = {}
    for text in values or []:
        key, sep, vals = text.partition("=")
        if not sep or not key or not vals:
            raise UsageError(f"--only expects KEY=V1[,V2...], e.g. year=2017,2018; got {text!r}")
        out[key.lower()] = tuple(v for v in vals.split(",") if v)  # path keys are lower-cased
    return tuple(out.items())


def int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: an integer >= ``minimum``."""
    what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"

    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            v = minimum - 1
        if v < minimum:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return v

    return parse


positive_int = int_at_least(1)


def positive_float(text: str) -> float:
    """An argparse type: a finite number > 0."""
    try:
        v = float(text)
    except ValueError:
        v = float("nan")
    if not (0 < v < float("inf")):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return v


non_negative_int = int_at_least(0)

MAX_TRANSFORMS = 8  # len(flowcore.scorer.TRANSFORMS); --help must not import torch


def transforms_count(text: str) -> int:
    """An argparse type: a number of test-time transforms, 1 to :data:`MAX_TRANSFORMS`."""
    v = positive_int(text)
    if v > MAX_TRANSFORMS:
        raise argparse.ArgumentTypeError(f"at most {MAX_TRANSFORMS} test-time transforms")
    return v


S3_HELP = (
    "S3 (archive and s3:// warehouse): requests time out after "
    "FLOWSCORE_S3_CONNECT_TIMEOUT_S (default 10) / FLOWSCORE_S3_READ_TIMEOUT_S (60) seconds "
    "and are retried FLOWSCORE_S3_RETRIES (3) times; what still fails is retried with backoff "
    "for FLOWSCORE_S3_RETRY_BUDGET_S (120) seconds. A longer outage ends the run with one "
    "line and exit code 1; chunks committed before it stay, a rerun does the rest."
)


def duration(text: str) -> float:
    """An argparse type: a duration such as 30d, 12h, 90m, 45s or 2w, in seconds."""
    from pipelines.maintenance import parse_duration

    try:
        return parse_duration(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from e


Subparsers = Any  # argparse's _SubParsersAction, a private type


def _parent(flags: tuple[str, ...], **kwargs: Any) -> argparse.ArgumentParser:
    """A parent parser holding one shared option (``add_parser(..., parents=[...])``)."""
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument(*flags, **kwargs)
    return parent


@dataclass(frozen=True)
class Parents:
    """The options several commands share, each declared once as a parent parser."""

    quiet: argparse.ArgumentParser
    cluster: argparse.ArgumentParser
    only: argparse.ArgumentParser
    model: argparse.ArgumentParser

    @classmethod
    def build(cls) -> Parents:
        return cls(
            quiet=_parent(("--quiet",), action="store_true", help="no progress lines"),
            cluster=_parent(
                ("--ray-address",), help="Ray cluster address (default: RAY_ADDRESS or local)"
            ),
            only=_parent(
                ("--only",),
                action="append",
                metavar="KEY=V1,V2",
                help="only the images whose path column KEY is one of the values, e.g. "
                "--only year=2017,2018 (repeatable)",
            ),
            model=_parent(
                ("--model",),
                required=True,
                help="models:/NAME@ALIAS, models:/NAME/VERSION or a bundle dir",
            ),
        )
