"""Which images of a listing a command works on: one definition of ``--only``, of leaving
out labelled anomalies and of the held-out split, shared by train, evaluate (which must
rebuild a model's training set exactly) and score."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import TypeVar

from .archive import ArchiveEntry

__all__ = ["Only", "apply_only", "without_labelled_anomalies", "training_split"]

Only = tuple[tuple[str, tuple[str, ...]], ...]
"""``--only KEY=V1,V2`` filters: (path key, allowed values) pairs, all of which must hold."""

_E = TypeVar("_E", bound=ArchiveEntry)


def apply_only(entries: Iterable[_E], only: Only | Mapping[str, Sequence[str]]) -> list[_E]:
    """The entries whose path column ``key`` is one of the values, for every filter. Keys are
    compared lower-cased, as the listing stores them (older models may record ``Camera``)."""
    pairs = only.items() if isinstance(only, Mapping) else only
    out = list(entries)
    for key, values in pairs:
        allowed = set(values)
        out = [e for e in out if e.columns.get(key.lower()) in allowed]
    return out


def without_labelled_anomalies(entries: Iterable[_E], labels: Mapping[str, int]) -> list[_E]:
    """The entries that ``_truth/labels.csv`` (``labels``: relative path -> 0/1) does not
    call anomalous."""
    return [e for e in entries if labels.get(e.path, 0) == 0]


def training_split(
    entries: Sequence[_E], val_fraction: float, seed: int
) -> tuple[list[_E], list[_E]]:
    """(training, held-out) whole images: the split ``flowscore train`` makes, seeded by the
    paths, so that evaluate can rebuild a model's training set from what the model records."""
    from flowcore.fit import split_holdout

    train_idx, val_idx = split_holdout([e.path for e in entries], val_fraction, seed)
    return [entries[i] for i in train_idx], [entries[i] for i in val_idx]
