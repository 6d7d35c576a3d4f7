"""Ground truth of an archive: ``_truth/labels.csv`` (``path,label``),
``_truth/masks/<path with extension .png>`` (non-zero = anomalous pixel) and, optionally,
``_truth/defects.csv`` (``path,defect``: the kind of each anomalous image's defect, as
``synth --kind texture`` writes, so that evaluation can be split by kind)."""

from __future__ import annotations

import csv
import io
from pathlib import PurePosixPath

import numpy as np
from PIL import Image

from .archive import ArchiveError, open_archive

__all__ = ["read_labels", "read_defects", "read_mask", "mask_path"]


def mask_path(path: str) -> str:
    """Relative path of the mask of image ``path``."""
    return str(PurePosixPath("_truth/masks") / PurePosixPath(path).with_suffix(".png"))


def _truth_csv(uri: str, name: str, columns: tuple[str, str]) -> list[dict[str, str]]:
    """The rows of ``_truth/NAME`` (a CSV whose header has ``columns``); [] when absent."""
    fs, root = open_archive(uri)
    target = f"{root.rstrip('/')}/_truth/{name}"
    if not fs.exists(target):
        return []
    with fs.open(target, "rb") as f:
        reader = csv.DictReader(io.StringIO(f.read().decode("utf-8")))
        if reader.fieldnames is None or not set(columns) <= set(reader.fieldnames):
            raise ArchiveError(f"{uri}/_truth/{name}: needs the header '{','.join(columns)}'")
        return list(reader)


def read_labels(uri: str) -> dict[str, int]:
    """{relative path: 0 normal / 1 anomalous}; {} when the archive has no labels."""
    out: dict[str, int] = {}
    for line, row in enumerate(_truth_csv(uri, "labels.csv", ("path", "label")), start=2):
        try:
            label = int(row["label"])
        except (TypeError, ValueError):
            raise ArchiveError(
                f"{uri}/_truth/labels.csv line {line}: label must be 0 or 1, got {row['label']!r}"
            ) from None
        if label not in (0, 1):
            raise ArchiveError(f"{uri}/_truth/labels.csv line {line}: label must be 0 or 1")
        out[row["path"]] = label
    return out


def read_defects(uri: str) -> dict[str, str]:
    """{relative path: defect kind} from ``_truth/defects.csv``; {} when there is none."""
    rows = _truth_csv(uri, "defects.csv", ("path", "defect"))
    return {row["path"]: row["defect"] for row in rows if row.get("defect")}


def read_mask(uri: str, path: str) -> np.ndarray | None:
    """Boolean mask (H, W) of image ``path``, or None where there is none."""
    fs, root = open_archive(uri)
    target = f"{root.rstrip('/')}/{mask_path(path)}"
    if not fs.exists(target):
        return None
    with fs.open(target, "rb") as f:
        im = Image.open(io.BytesIO(f.read()))
        return np.asarray(im.convert("L")) > 0
