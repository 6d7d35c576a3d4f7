"""Tests for the synthetic archive generator (pipelines.synth)."""

from __future__ import annotations

import csv
import math
import re
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipelines.synth import KINDS, SynthSummary, render_image, write_archive

SMALL = {"height": 96, "width": 128}
NAME = re.compile(r"^year=(\d{4})/camera=(\d+)/img_(\d{8}T\d{6})\.jpg$")


def _tree(root: Path) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _labels(root: Path) -> list[tuple[str, int]]:
    with (root / "_truth" / "labels.csv").open(newline="", encoding="utf-8") as fh:
        reader = csv.reader(fh)
        assert next(reader) == ["path", "label"]
        return [(path, int(label)) for path, label in reader]


def _images_on_disk(root: Path) -> list[str]:
    return sorted(
        p.relative_to(root).as_posix()
        for p in root.rglob("*.jpg")
        if not any(part.startswith(("_", ".")) for part in p.relative_to(root).parts)
    )


@pytest.mark.parametrize("kind", KINDS)
def test_same_seed_is_byte_identical_and_other_seed_differs(tmp_path: Path, kind: str) -> None:
    a = write_archive(tmp_path / "a", kind=kind, images=8, seed=7, anomaly_rate=0.25, **SMALL)
    b = write_archive(tmp_path / "b", kind=kind, images=8, seed=7, anomaly_rate=0.25, **SMALL)
    c = write_archive(tmp_path / "c", kind=kind, images=8, seed=8, anomaly_rate=0.25, **SMALL)
    ta, tb, tc = _tree(a.root), _tree(b.root), _tree(c.root)
    assert list(ta) == list(tb)
    for name in ta:
        assert ta[name] == tb[name], name
    assert a.paths == b.paths
    # another seed: other capture times and other pixels
    assert ta != tc
    jpg_a = [v for k, v in ta.items() if k.endswith(".jpg")]
    jpg_c = [v for k, v in tc.items() if k.endswith(".jpg")]
    assert not set(jpg_a) & set(jpg_c)


def test_layout_labels_and_masks(tmp_path: Path) -> None:
    n, rate = 12, 0.25
    calls: list[tuple[int, int]] = []
    summary = write_archive(
        tmp_path / "arch",
        kind="harvest",
        images=n,
        seed=3,
        anomaly_rate=rate,
        years=(2017, 2018, 2019),
        cameras=2,
        height=120,
        width=160,
        progress=lambda done, total: calls.append((done, total)),
    )
    root = tmp_path / "arch"
    assert isinstance(summary, SynthSummary)
    assert summary.root == root
    assert summary.images == n
    assert calls == [(i, n) for i in range(1, n + 1)]

    labels = _labels(root)
    paths = [p for p, _ in labels]
    assert paths == sorted(paths)
    assert paths == _images_on_disk(root) == summary.paths
    assert len(paths) == n

    per_group: dict[tuple[str, str], list[datetime]] = {}
    for path in paths:
        m = NAME.match(path)
        assert m, path
        year, camera, stamp = m.groups()
        when = datetime.strptime(stamp, "%Y%m%dT%H%M%S")
        assert str(when.year) == year
        assert 8 <= when.month <= 10 and 8 <= when.hour < 18
        assert int(camera) >= 1
        per_group.setdefault((year, camera), []).append(when)
        with Image.open(root / path) as im:
            assert im.format == "JPEG" and im.mode == "RGB"
            assert im.size == (160, 120)
            exif = im.getexif().get_ifd(0x8769)
            assert exif.get(0x9003) == when.strftime("%Y:%m:%d %H:%M:%S")
    # spread evenly: 3 years x 2 cameras, 2 images each, at distinct times
    assert sorted(per_group) == [(y, c) for y in ("2017", "2018", "2019") for c in ("1", "2")]
    assert all(len(v) == 2 and len(set(v)) == 2 for v in per_group.values())

    anomalous = {p for p, label in labels if label == 1}
    assert all(label in (0, 1) for _, label in labels)
    assert len(anomalous) == round(n * rate) == summary.anomalous

    mask_root = root / "_truth" / "masks"
    masks = sorted(p.relative_to(mask_root).as_posix() for p in mask_root.rglob("*.png"))
    assert masks == sorted(p[: -len(".jpg")] + ".png" for p in anomalous)
    for rel in masks:
        with Image.open(mask_root / rel) as im:
            assert im.mode == "L" and im.size == (160, 120)
            m = np.asarray(im)
        assert set(np.unique(m).tolist()) <= {0, 255}
        frac = float((m > 0).mean())
        assert 0.001 <= frac <= 0.05, (rel, frac)


@pytest.mark.parametrize("rate, expected", [(0.0, 0), (1.0, 6), (0.5, 3), (0.1, 1)])
def test_exact_anomaly_count(tmp_path: Path, rate: float, expected: int) -> None:
    s = write_archive(tmp_path / "a", kind="factory", images=6, seed=1, anomaly_rate=rate, **SMALL)
    labels = _labels(s.root)
    assert sum(label for _, label in labels) == expected == s.anomalous
    mask_root = s.root / "_truth" / "masks"
    assert len(list(mask_root.rglob("*.png"))) == expected


@pytest.mark.parametrize("kind", KINDS)
def test_anomalies_differ_from_normal_content(kind: str) -> None:
    for seed in range(6):
        rng = np.random.default_rng(seed)
        rgb, mask = render_image(kind, rng, camera=seed % 3 + 1, anomalous=True, **SMALL)
        assert rgb.shape == (96, 128, 3) and rgb.dtype == np.uint8
        assert mask is not None and mask.shape == (96, 128) and mask.dtype == bool
        assert 0.001 <= mask.mean() <= 0.05
        x = rgb.astype(np.float64)
        inside, outside = x[mask].mean(axis=0), x[~mask].mean(axis=0)
        assert np.linalg.norm(inside - outside) > 15, (seed, inside, outside)


@pytest.mark.parametrize("kind", KINDS)
def test_normal_images_have_no_mask_and_look_alike(kind: str) -> None:
    means = []
    for seed in range(4):
        rgb, mask = render_image(
            kind, np.random.default_rng(seed), camera=1, anomalous=False, **SMALL
        )
        assert mask is None
        means.append(rgb.reshape(-1, 3).mean(axis=0))
    spread = np.ptp(np.stack(means), axis=0)
    assert (spread < 20).all(), spread
    if kind == "harvest":  # golden kernels: red > green > blue
        r, g, b = np.mean(means, axis=0)
        assert r > g > b


def test_render_is_deterministic_and_full_size_by_default() -> None:
    a, ma = render_image("harvest", np.random.default_rng(5), camera=2, anomalous=True)
    b, mb = render_image("harvest", np.random.default_rng(5), camera=2, anomalous=True)
    assert a.shape == (460, 640, 3)
    assert ma is not None and mb is not None
    assert np.array_equal(a, b) and np.array_equal(ma, mb)
    c, _ = render_image("harvest", np.random.default_rng(5), camera=1, anomalous=True)
    assert not np.array_equal(a, c)  # each camera has its own lighting


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"kind": "wheat"}, "harvest, factory"),
        ({"images": 0}, "images"),
        ({"images": 2.5}, "images"),
        ({"seed": -1}, "seed"),
        ({"anomaly_rate": 1.5}, "anomaly_rate"),
        ({"anomaly_rate": -0.1}, "anomaly_rate"),
        ({"anomaly_rate": math.nan}, "anomaly_rate"),
        ({"cameras": 0}, "cameras"),
        ({"years": ()}, "years"),
        ({"years": (2017, 2017)}, "years"),
        ({"years": (17.5,)}, "year"),
        ({"height": 10}, "height"),
        ({"width": 0}, "width"),
    ],
)
def test_argument_validation(tmp_path: Path, kwargs: dict[str, object], match: str) -> None:
    args: dict[str, object] = {"kind": "harvest", "images": 2, "seed": 0, **SMALL}
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        write_archive(tmp_path / "out", **args)  # type: ignore[arg-type]
    assert not (tmp_path / "out").exists()


def test_render_argument_validation() -> None:
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="harvest, factory"):
        render_image("grain", rng, camera=1, anomalous=False)
    with pytest.raises(ValueError, match="camera"):
        render_image("factory", rng, camera=0, anomalous=False)


def test_refuses_non_empty_directory_but_accepts_empty_one(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="empty"):
        write_archive(out, kind="factory", images=1, seed=0, **SMALL)
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]

    empty = tmp_path / "empty"
    empty.mkdir()
    s = write_archive(str(empty), kind="factory", images=2, seed=0, **SMALL)
    assert len(s.paths) == 2 and s.root == empty
