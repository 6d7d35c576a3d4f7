"""``flowscore score`` end to end on real Ray Data, a real Iceberg catalog (SQLite + local
warehouse) and S3 through moto_server: every listed image lands in exactly one table, with
the schema of DESIGN.md, summaries equal to the in-process scorer's, and no key twice."""

from __future__ import annotations

import io
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from conftest import png_bomb
from PIL import Image

from flowcore.bundle import save_bundle
from flowcore.scorer import SUMMARY_COLUMNS
from jobs.cli import main
from pipelines import tables
from pipelines.archive import decode_image, list_archive, read_bytes
from pipelines.synth import write_archive

pytestmark = [pytest.mark.ray, pytest.mark.timeout(600)]


def _encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def _texture(h: int, w: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = np.array([150.0, 110.0, 60.0]) + rng.normal(0, 20, (h, w, 3))
    return np.clip(base, 0, 255).astype(np.uint8)


def bad_corpus(root: Path) -> tuple[set[str], dict[str, tuple[int, int]]]:
    """Files that must become error rows, and odd-mode files that must be scored (with
    their expected (height, width) after conversion and EXIF rotation)."""
    d = root / "year=2020" / "camera=9"
    d.mkdir(parents=True)
    good = _encode(Image.fromarray(_texture(64, 96, 1)), "JPEG", quality=90)
    bad = {
        "truncated.jpg": good[: len(good) // 2],
        "empty.jpg": b"",
        "noise.jpg": np.random.default_rng(0).bytes(3000),
        "bomb.png": png_bomb(12000, 12000),
    }
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° on display: 96×64 stored -> 64 wide × 96 high shown
    odd = {
        "cmyk.jpg": (
            _encode(Image.fromarray(_texture(64, 96, 2)).convert("CMYK"), "JPEG"),
            (64, 96),
        ),
        "sixteen.png": (
            _encode(Image.fromarray(_texture(64, 96, 3)[..., 0].astype(np.uint16) * 256), "PNG"),
            (64, 96),
        ),
        "palette.png": (
            _encode(Image.fromarray(_texture(64, 96, 4)).convert("P"), "PNG"),
            (64, 96),
        ),
        "rgba.png": (
            _encode(Image.fromarray(_texture(64, 96, 5)).convert("RGBA"), "PNG"),
            (64, 96),
        ),
        "rotated.jpg": (
            _encode(Image.fromarray(_texture(64, 96, 6)), "JPEG", exif=exif.tobytes()),
            (96, 64),
        ),
    }
    for name, data in bad.items():
        (d / name).write_bytes(data)
    for name, (data, _) in odd.items():
        (d / name).write_bytes(data)
    uris = {e.image_uri: e for e in list_archive(str(root))}
    bad_uris = {u for u in uris if u.rsplit("/", 1)[1] in bad}
    odd_shapes = {u: odd[u.rsplit("/", 1)[1]][1] for u in uris if u.rsplit("/", 1)[1] in odd}
    return bad_uris, odd_shapes


@pytest.fixture(scope="module")
def bundle(tmp_path_factory, small_scorer) -> Path:
    return save_bundle(small_scorer, tmp_path_factory.mktemp("model") / "bundle")


def _read(name: str) -> pa.Table:
    cat = tables.load_catalog_()
    return cat.load_table(f"flowscore.{name}").scan().to_arrow()


def _keys(t: pa.Table, cols: list[str]) -> list[tuple]:
    return list(zip(*(t.column(c).to_pylist() for c in cols), strict=True))


def _score(archive: str, bundle: Path, *extra: str) -> int:
    return main(
        ["score", "--archive", archive, "--model", str(bundle), "--commit-every", "6", *extra]
    )


def test_score_local_archive_with_bad_files(
    ray_session, tmp_path, monkeypatch, bundle, small_scorer
):
    monkeypatch.setenv("FLOWSCORE_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    archive = tmp_path / "archive"
    write_archive(archive, kind="harvest", images=10, seed=2, height=64, width=96)
    bad_uris, odd_shapes = bad_corpus(archive)
    listed = {e.image_uri: e for e in list_archive(str(archive))}
    assert _score(str(archive), bundle, "--quiet") == 0

    scores, errors = _read("image_scores"), _read("scoring_errors")
    # the schema of DESIGN.md, path columns after captured_at
    assert scores.schema.names == tables.image_scores_arrow_schema(["camera", "year"]).names
    s_uris = scores.column("image_uri").to_pylist()
    e_uris = errors.column("image_uri").to_pylist()
    assert set(s_uris) | set(e_uris) == set(listed)
    assert not set(s_uris) & set(e_uris)
    assert len(s_uris) == len(set(s_uris)) and len(e_uris) == len(set(e_uris))
    assert set(e_uris) == bad_uris
    by_uri = {r["image_uri"]: r for r in errors.to_pylist()}
    assert by_uri[next(u for u in bad_uris if u.endswith("bomb.png"))]["error_type"] == (
        "DecompressionBombError"
    )
    assert by_uri[next(u for u in bad_uris if u.endswith("empty.jpg"))]["error_type"] == "EmptyFile"
    assert all(r["stage"] in ("read", "decode") for r in errors.to_pylist())

    rows = {r["image_uri"]: r for r in scores.to_pylist()}
    for uri, (h, w) in odd_shapes.items():
        assert (rows[uri]["height"], rows[uri]["width"]) == (h, w)
    # summaries and heatmaps equal the in-process scorer's on the same decoded images
    for uri, r in rows.items():
        assert len(r["heatmap"]) == r["grid_h"] * r["grid_w"]
        assert r["etag"] == listed[uri].etag and r["model_version"].startswith("sha-")
        assert r["year"] == listed[uri].columns["year"]
    some = sorted(rows)[:4]
    for uri in some:
        img = decode_image(read_bytes(uri)).rgb
        sb = small_scorer.score(img[None])
        r = rows[uri]
        np.testing.assert_allclose(
            np.asarray(r["heatmap"], np.float32).reshape(r["grid_h"], r["grid_w"]),
            sb.grid[0],
            rtol=1e-4,
            atol=1e-3,
        )
        for c in SUMMARY_COLUMNS:
            assert r[c] == pytest.approx(float(sb.summary[c][0]), rel=1e-4, abs=1e-3)
        assert r["is_anomaly"] == bool(sb.is_anomaly[0])

    runs = _read("runs").to_pylist()
    assert len(runs) == 1 and runs[0]["status"] == "succeeded"
    assert runs[0]["images_listed"] == len(listed)
    assert runs[0]["images_scored"] == len(rows) and runs[0]["images_failed"] == len(bad_uris)

    # scoring again doubles nothing
    assert _score(str(archive), bundle, "--quiet", "--no-heatmaps") == 0
    scores2 = _read("image_scores")
    keys = _keys(scores2, ["image_uri", "etag", "model_version"])
    assert len(keys) == len(set(keys)) == len(rows)
    assert len(_read("scoring_errors")) == len(bad_uris)
    assert len(_read("runs")) == 2


@pytest.mark.s3
def test_score_from_s3(ray_session, s3_server, tmp_path, monkeypatch, bundle, small_scorer):
    from conftest import make_bucket

    monkeypatch.setenv("FLOWSCORE_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    local = tmp_path / "archive"
    write_archive(local, kind="factory", images=8, seed=3, height=64, width=96)
    make_bucket("score-archive")
    import s3fs

    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_server})
    fs.put(str(local) + "/", "score-archive/factory/", recursive=True)
    # scored under 3 test-time transforms by the actors
    assert _score("s3://score-archive/factory", bundle, "--quiet", "--test-transforms", "3") == 0
    scores = _read("image_scores")
    uris = sorted(scores.column("image_uri").to_pylist())
    assert len(uris) == 8 and all(u.startswith("s3://score-archive/factory/") for u in uris)
    etags = set(scores.column("etag").to_pylist())
    listed = {e.etag for e in list_archive("s3://score-archive/factory")}
    assert etags == listed
    row = next(r for r in scores.to_pylist() if r["image_uri"] == uris[0])
    img = decode_image(read_bytes(str(local / uris[0].split("/factory/", 1)[1]))).rgb
    try:
        small_scorer.transforms = 3
        want = small_scorer.score(img[None]).grid[0]
    finally:
        small_scorer.transforms = 1
    np.testing.assert_allclose(
        np.asarray(row["heatmap"], np.float32).reshape(row["grid_h"], row["grid_w"]),
        want,
        rtol=1e-4,
        atol=1e-3,
    )


def _summaries(t: pa.Table) -> dict[str, tuple]:
    cols = ["etag", "model_version", *SUMMARY_COLUMNS, "is_anomaly", "grid_h", "grid_w"]
    return {r["image_uri"]: tuple(r[c] for c in cols) for r in t.to_pylist()}


@pytest.mark.faults
def test_killing_a_scoring_actor_changes_nothing(ray_session, tmp_path, monkeypatch, bundle):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    archive = tmp_path / "archive"
    write_archive(archive, kind="harvest", images=40, seed=7, height=64, width=96)
    monkeypatch.setenv("FLOWSCORE_HOME", str(tmp_path / "calm"))
    assert _score(str(archive), bundle, "--quiet", "--commit-every", "20") == 0
    calm = _summaries(_read("image_scores"))

    monkeypatch.setenv("FLOWSCORE_HOME", str(tmp_path / "stormy"))
    pids = tmp_path / "pids"
    pids.mkdir()
    monkeypatch.setenv("FLOWSCORE_TEST_ACTOR_PID_DIR", str(pids))
    killed: list[int] = []

    def assassin() -> None:
        deadline = time.time() + 120
        while time.time() < deadline and not killed:
            found = sorted(pids.iterdir())
            if found:
                pid = int(found[0].name)
                time.sleep(0.3)
                try:
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
                except ProcessLookupError:
                    found[0].unlink()
            time.sleep(0.05)

    t = threading.Thread(target=assassin, daemon=True)
    t.start()
    assert _score(str(archive), bundle, "--quiet", "--commit-every", "20") == 0
    t.join(timeout=5)
    assert killed, "no scorer actor was seen to kill"
    stormy = _read("image_scores")
    keys = _keys(stormy, ["image_uri", "etag", "model_version"])
    assert len(keys) == len(set(keys))
    assert _summaries(stormy) == calm
    assert len(_read("scoring_errors")) == 0
