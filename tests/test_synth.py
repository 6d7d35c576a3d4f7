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

import pipelines.synth as synth
from pipelines.synth import (
    DEFECTS,
    KINDS,
    TEXTURES,
    SynthSummary,
    render_image,
    render_texture,
    write_archive,
)

SMALL = {"height": 96, "width": 128}
NAME = re.compile(r"^year=(\d{4})/camera=(\d+)/img_(\d{8}T\d{6})\.jpg$")
TEX_NAME = re.compile(r"^texture=(brick|grass|gravel)/year=(\d{4})/img_(\d{8}T\d{6})\.jpg$")
SCENES = ("harvest", "factory")  # the kinds whose every anomaly has a mask


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


@pytest.mark.slow  # three archives per kind: about 10 s in all
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


@pytest.mark.parametrize("kind", SCENES)
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


@pytest.mark.parametrize("kind", SCENES)
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


# --------------------------------------------------------------------------- texture


def _grey(rgb: np.ndarray) -> np.ndarray:
    return rgb.astype(np.float64).mean(axis=2)


def _box(a: np.ndarray, r: int) -> np.ndarray:
    k = 2 * r + 1
    p = np.pad(a, r, mode="reflect")
    c = np.cumsum(np.cumsum(p, axis=0), axis=1)
    c = np.pad(c, ((1, 0), (1, 0)))
    return (c[k:, k:] - c[:-k, k:] - c[k:, :-k] + c[:-k, :-k]) / (k * k)


def _dilate(mask: np.ndarray, r: int) -> np.ndarray:
    return _box(mask.astype(np.float64), r) > 1e-9


def _erode(mask: np.ndarray, r: int) -> np.ndarray:
    return _box(mask.astype(np.float64), r) > 1 - 1e-9


def _read_csv(path: Path) -> list[list[str]]:
    with path.open(newline="", encoding="utf-8") as fh:
        return list(csv.reader(fh))


def test_texture_archive_layout_labels_defects_and_masks(tmp_path: Path) -> None:
    n, rate = 18, 0.5
    s = write_archive(tmp_path / "tex", kind="texture", images=n, seed=3, anomaly_rate=rate)
    root = s.root
    labels = _labels(root)
    paths = [p for p, _ in labels]
    assert paths == sorted(paths) == _images_on_disk(root) == s.paths
    assert len(paths) == n and s.anomalous == round(n * rate)
    textures = set()
    for path in paths:
        m = TEX_NAME.match(path)
        assert m, path
        textures.add(m.group(1))
        assert m.group(3).startswith(m.group(2))  # the capture time lies in the year
        with Image.open(root / path) as im:
            assert im.format == "JPEG" and im.mode == "RGB" and im.size == (256, 256)
            rgb = np.asarray(im).astype(np.int64)
        # grey-like: the channels agree up to JPEG rounding
        assert np.abs(rgb[..., 0] - rgb[..., 1]).max() <= 3
        assert np.abs(rgb[..., 1] - rgb[..., 2]).max() <= 3
        assert rgb.std() > 10  # a texture, not a flat field
    assert textures == set(TEXTURES)

    rows = _read_csv(root / "_truth" / "defects.csv")
    assert rows[0] == ["path", "defect"]
    defects = dict((p, d) for p, d in rows[1:])
    assert [p for p, _ in rows[1:]] == sorted(defects)
    assert defects == s.defects
    anomalous = {p for p, label in labels if label == 1}
    assert set(defects) == anomalous
    counts = {d: list(defects.values()).count(d) for d in DEFECTS}
    assert counts == {"local": 3, "dark_smooth": 3, "global": 3}

    mask_root = root / "_truth" / "masks"
    masks = sorted(p.relative_to(mask_root).as_posix() for p in mask_root.rglob("*.png"))
    with_mask = sorted(p[: -len(".jpg")] + ".png" for p, d in defects.items() if d != "global")
    assert masks == with_mask  # local and dark_smooth have masks; global has none
    for rel in masks:
        with Image.open(mask_root / rel) as im:
            assert im.mode == "L" and im.size == (256, 256)
            m = np.asarray(im)
        assert set(np.unique(m).tolist()) <= {0, 255}
        assert 0.0002 <= float((m > 0).mean()) <= 0.05, rel


def test_texture_archive_is_deterministic_and_seed_dependent(tmp_path: Path) -> None:
    kw = {"kind": "texture", "images": 6, "anomaly_rate": 0.5, **SMALL}
    ta = _tree(write_archive(tmp_path / "a", seed=4, **kw).root)
    tb = _tree(write_archive(tmp_path / "b", seed=4, **kw).root)
    tc = _tree(write_archive(tmp_path / "c", seed=5, **kw).root)
    assert ta == tb
    assert "_truth/defects.csv" in ta
    assert not {v for k, v in ta.items() if k.endswith(".jpg")} & {
        v for k, v in tc.items() if k.endswith(".jpg")
    }


@pytest.mark.parametrize("texture", TEXTURES)
def test_texture_render_is_deterministic_and_normal_images_vary(texture: str) -> None:
    a, ma = render_texture(np.random.default_rng(1), texture=texture, defect="local")
    b, mb = render_texture(np.random.default_rng(1), texture=texture, defect="local")
    assert np.array_equal(a, b) and ma is not None and mb is not None and np.array_equal(ma, mb)
    normals = []
    for seed in range(4):
        rgb, mask = render_texture(np.random.default_rng(seed), texture=texture)
        assert mask is None
        assert rgb.shape == (256, 256, 3) and rgb.dtype == np.uint8
        assert np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 1], rgb[..., 2])
        normals.append(_grey(rgb))
    for i in range(len(normals)):
        for j in range(i):
            assert np.abs(normals[i] - normals[j]).mean() > 5  # other crop, light, noise
    means = [g.mean() for g in normals]
    assert np.ptp(means) < 40, means  # one consistent distribution


@pytest.mark.parametrize("texture", TEXTURES)
def test_local_defect_is_brighter_or_darker_than_around_it(texture: str) -> None:
    for seed in range(4):
        rgb, mask = render_texture(np.random.default_rng(seed), texture=texture, defect="local")
        assert mask is not None and mask.any()
        ys, xs = np.nonzero(mask)
        assert 3 <= max(np.ptp(ys), np.ptp(xs)) + 1 <= 40  # small: spots and scratches
        g = _grey(rgb)
        ring = _dilate(mask, 6) & ~mask
        diff = g[mask].mean() - g[ring].mean()
        assert abs(diff) > 25, (seed, diff)


def _shifted_regions(mask: np.ndarray, keep_out: np.ndarray) -> list[np.ndarray]:
    """Copies of ``mask`` moved over the image to places that stay inside it and do not
    touch ``keep_out``: the same shape of region, filled with normal texture."""
    h, w = mask.shape
    ys, xs = np.nonzero(mask)
    out = []
    for dy in range(-int(ys.min()), h - int(ys.max()), 16):
        for dx in range(-int(xs.min()), w - int(xs.max()), 16):
            moved = np.roll(mask, (dy, dx), axis=(0, 1))
            if not (moved & keep_out).any():
                out.append(moved)
    return out


@pytest.mark.parametrize("texture", TEXTURES)
def test_dark_smooth_defect_is_darker_and_flatter_than_the_texture(texture: str) -> None:
    for seed in range(4):
        rgb, mask = render_texture(
            np.random.default_rng(seed), texture=texture, defect="dark_smooth"
        )
        assert mask is not None
        ys, xs = np.nonzero(mask)
        assert 15 <= max(np.ptp(ys), np.ptp(xs)) + 1 <= 70
        g = _grey(rgb)
        inner = _erode(mask, 2)  # the blob without its edge
        assert inner.sum() > 50
        regions = _shifted_regions(inner, _dilate(mask, 3))
        assert len(regions) >= 5
        # the same region elsewhere holds texture: far more variance, and brighter
        normal_std = float(np.median([g[r].std() for r in regions]))
        normal_mean = float(np.median([g[r].mean() for r in regions]))
        assert g[inner].std() < 0.5 * normal_std, (seed, g[inner].std(), normal_std)
        assert g[inner].mean() < normal_mean - 15, (seed, g[inner].mean(), normal_mean)


def test_global_defect_has_no_mask_and_ranges_do_not_overlap_normal_ones() -> None:
    for seed in range(3):
        rgb, mask = render_texture(np.random.default_rng(seed), texture="brick", defect="global")
        assert mask is None and rgb.shape == (256, 256, 3)
    # the normal ranges and the global defect's ranges are disjoint
    assert synth._TEX_ANGLE < synth._TEX_ANGLE_DEFECT[0] <= synth._TEX_ANGLE_DEFECT[1] < 90
    assert synth._TEX_ZOOM[1] < synth._TEX_ZOOM_DEFECT[0]
    assert 1 / synth._TEX_ZOOM_DEFECT[0] < synth._TEX_ZOOM[0]
    assert synth._TEX_CONTRAST_DEFECT[1] < synth._TEX_CONTRAST[0]


def test_global_contrast_defect_lowers_contrast(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(synth, "GLOBAL_CHANGES", ("contrast",))
    for texture in TEXTURES:
        normal = [
            _grey(render_texture(np.random.default_rng(s), texture=texture)[0]).std()
            for s in range(4)
        ]
        low = [
            _grey(
                render_texture(np.random.default_rng(s), texture=texture, defect="global")[0]
            ).std()
            for s in range(4)
        ]
        assert max(low) < min(normal), (texture, low, normal)


def test_render_image_texture_maps_camera_to_texture_and_checks_names() -> None:
    rgb, mask = render_image("texture", np.random.default_rng(0), camera=1, anomalous=False)
    assert rgb.shape == (256, 256, 3) and mask is None
    ref, _ = render_texture(np.random.default_rng(0), texture="brick")
    assert np.array_equal(rgb, ref)
    with pytest.raises(ValueError, match="brick, grass, gravel"):
        render_texture(np.random.default_rng(0), texture="marble")
    with pytest.raises(ValueError, match="local, dark_smooth, global"):
        render_texture(np.random.default_rng(0), texture="brick", defect="hole")


def test_textures_load_without_network(monkeypatch: pytest.MonkeyPatch) -> None:
    import socket

    def refuse(*args: object, **kwargs: object) -> None:
        raise OSError("network disabled by the test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    synth._texture_source.cache_clear()
    for name in TEXTURES:
        arr = synth._texture_source(name)
        assert arr.ndim == 2 and min(arr.shape) >= 256 and arr.std() > 10


def test_kinds_include_texture() -> None:
    assert KINDS == ("harvest", "factory", "texture")
