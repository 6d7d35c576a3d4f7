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


def read_labels(uri: str) -> dict[str, int]:
    """{relative path: 0 normal / 1 anomalous}; {} when the archive has no labels."""
    fs, root = open_archive(uri)
    target = f"{root.rstrip('/')}/_truth/labels.csv"
    if not fs.exists(target):
        return {}
    with fs.open(target, "rb") as f:
        text = f.read().decode("utf-8")
    reader = csv.DictReader(io.StringIO(text))
    if reader.fieldnames is None or not {"path", "label"} <= set(reader.fieldnames):
        raise ArchiveError(f"{uri}/_truth/labels.csv: needs the header 'path,label'")
    out: dict[str, int] = {}
    for line, row in enumerate(reader, start=2):
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
    fs, root = open_archive(uri)
    target = f"{root.rstrip('/')}/_truth/defects.csv"
    if not fs.exists(target):
        return {}
    with fs.open(target, "rb") as f:
        reader = csv.DictReader(io.StringIO(f.read().decode("utf-8")))
        if reader.fieldnames is None or not {"path", "defect"} <= set(reader.fieldnames):
            raise ArchiveError(f"{uri}/_truth/defects.csv: needs the header 'path,defect'")
        return {row["path"]: row["defect"] for row in reader if row.get("defect")}


def read_mask(uri: str, path: str) -> np.ndarray | None:
    """Boolean mask (H, W) of image ``path``, or None where there is none."""
    fs, root = open_archive(uri)
    target = f"{root.rstrip('/')}/{mask_path(path)}"
    if not fs.exists(target):
        return None
    with fs.open(target, "rb") as f:
        im = Image.open(io.BytesIO(f.read()))
        return np.asarray(im.convert("L")) > 0
