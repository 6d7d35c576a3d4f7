"""``flowscore report``: real Iceberg tables in a fresh FLOWSCORE_HOME, written directly with
``pipelines.tables`` (no Ray), originals as small PNG/JPEG files, synthetic heatmaps."""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import subprocess
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from jobs.report import ReportUsageError, run_report
from pipelines import tables

H, W, WINDOW, STRIDE = 48, 64, 8, 4
GH, GW = (H - WINDOW) // STRIDE + 1, (W - WINDOW) // STRIDE + 1
PCTS = (1, 5, 10, 25, 50, 75, 90, 95, 99)
T0 = datetime(2024, 1, 1, 6, 0, 0)
SCRIPT_MSG = "cannot identify image file <script>alert('x')</script> & more"


def _uri(path: Path) -> str:
    """The image_uri the archive lister writes: ``file://`` + the absolute path, as it is
    (``Path.as_uri()`` would percent-encode the ``=`` of ``year=2019``)."""
    return "file://" + str(path.absolute())


def _heatmap(rng: np.random.Generator, blob: float) -> np.ndarray:
    grid = rng.normal(-5.0, 0.4, (GH, GW)).astype(np.float32)
    if blob:
        i, j = rng.integers(1, GH - 3), rng.integers(1, GW - 4)
        grid[i : i + 3, j : j + 4] -= blob
    return grid


def _row(uri, etag, camera, year, captured, run_id, model, version, grid, heatmaps=True):
    flat = grid.reshape(-1).astype(np.float64)
    pct = dict(zip((f"p{p:02d}" for p in PCTS), np.percentile(flat, PCTS), strict=True))
    return {
        "image_uri": uri,
        "etag": etag,
        "captured_at": captured,
        "camera": camera,
        "year": year,
        "width": W,
        "height": H,
        "model_name": model,
        "model_version": version,
        "run_id": run_id,
        "scored_at": captured + timedelta(days=400),
        "grid_h": GH,
        "grid_w": GW,
        "window": WINDOW,
        "stride": STRIDE,
        "scale": 1.0,
        "ll_mean": flat.mean(),
        "ll_std": flat.std(),
        "ll_min": flat.min(),
        "ll_max": flat.max(),
        **pct,
        "quality": (pct["p25"] + pct["p50"]) / 2,
        "anomaly_score": -pct["p05"],
        "is_anomaly": bool(-pct["p05"] > 8.0),
        "heatmap": grid.reshape(-1).tolist() if heatmaps else None,
    }


def _write_image(path: Path, rng: np.random.Generator) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    base = np.array([150, 110, 60]) + rng.normal(0, 20, (H, W, 3))
    Image.fromarray(np.clip(base, 0, 255).astype(np.uint8)).save(path)


def _upsert_scores(cat, rows):
    schema = tables.image_scores_arrow_schema(["camera", "year"])
    tables.upsert(
        cat,
        "image_scores",
        pa.Table.from_pylist(rows, schema=schema),
        ["image_uri", "etag", "model_version"],
    )


def _record_run(cat, run_id, started, version, n, *, model="grain", failed=0, scored=None):
    tables.record_run_start(
        cat,
        run_id=run_id,
        job="harvest-nightly",
        model_name=model,
        model_version=version,
        archive="file:///archive/<harvest>",
        started_at=started,
        images_listed=n + failed,
    )
    tables.record_run_end(
        cat,
        run_id=run_id,
        finished_at=started + timedelta(seconds=12),
        status="succeeded",
        images_scored=n if scored is None else scored,
        images_skipped=0,
        images_failed=failed,
        images_per_s=n / 12.0,
    )


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    """Tables with four runs:

    - ``r-old`` (2024-02-01): 20 images, all rescored later by ``r-new``: no rows left;
    - ``r-nomaps`` (2024-02-02): 6 images scored with --no-heatmaps (own model version);
    - ``r-single`` (2024-02-03): 1 image of registry model grain version 3;
    - ``r-new`` (2024-02-04, the default): the 20 images again plus one whose original is
      gone, 3 errors (one message with ``<script>``); the worst image has the biggest blob.
    """
    root = tmp_path_factory.mktemp("report")
    home, archive = root / "home", root / "archive"
    old_home = os.environ.get("FLOWSCORE_HOME")
    os.environ["FLOWSCORE_HOME"] = str(home)
    try:
        cat = tables.load_catalog_()
        tables.ensure_tables(cat, ["camera", "year"])
        rng = np.random.default_rng(0)
        images = []
        for k in range(20):
            year, camera = ("2018", "1") if k < 10 else ("2019", str(1 + k % 2))
            ext = "png" if k % 2 else "jpg"
            p = archive / f"year={year}" / f"camera={camera}" / f"img_{k:02d}.{ext}"
            _write_image(p, rng)
            images.append((_uri(p), f"{k}-1", camera, year, T0 + timedelta(days=9 * k)))
        gone = archive / "year=2019" / "camera=2" / "gone.png"
        blobs = [0.0] * 20
        blobs[3], blobs[11], blobs[17] = 40.0, 20.0, 10.0
        common = ("grain", "sha-aaaaaaaaaaaa")
        old = [_row(*im, "r-old", *common, _heatmap(rng, 0.0)) for im in images]
        _upsert_scores(cat, old)
        _record_run(cat, "r-old", datetime(2024, 2, 1), common[1], 20)
        nomaps = [
            _row(*im, "r-nomaps", "grain", "sha-bbbbbbbbbbbb", _heatmap(rng, 0), heatmaps=False)
            for im in images[:6]
        ]
        _upsert_scores(cat, nomaps)
        _record_run(cat, "r-nomaps", datetime(2024, 2, 2), "sha-bbbbbbbbbbbb", 6)
        single = [_row(*images[5], "r-single", "grain", "3", _heatmap(rng, 15.0))]
        _upsert_scores(cat, single)
        _record_run(cat, "r-single", datetime(2024, 2, 3), "3", 1)
        pairs = zip(images, blobs, strict=True)
        new = [_row(*im, "r-new", *common, _heatmap(rng, b)) for im, b in pairs]
        new.append(_row(_uri(gone), "9-9", "2", "2019", T0, "r-new", *common, _heatmap(rng, 15.0)))
        _upsert_scores(cat, new)
        _record_run(cat, "r-new", datetime(2024, 2, 4), common[1], 21, failed=3, scored=21)
        errors = [
            {
                "image_uri": _uri(archive / f"bad_{i}.jpg"),
                "etag": f"e{i}",
                "run_id": "r-new",
                "stage": "decode" if i else "read",
                "error_type": "UnidentifiedImageError" if i else "FileNotFoundError",
                "message": SCRIPT_MSG if i == 1 else f"problem {i}",
                "at": datetime(2024, 2, 4, 0, 0, 5),
                "model_version": common[1],
                "retryable": not i,
            }
            for i in range(3)
        ]
        tables.upsert(
            cat,
            "scoring_errors",
            pa.Table.from_pylist(errors, schema=tables.SCORING_ERRORS_SCHEMA),
            ["image_uri", "etag", "model_version"],
        )
    finally:
        if old_home is None:
            os.environ.pop("FLOWSCORE_HOME", None)
        else:
            os.environ["FLOWSCORE_HOME"] = old_home
    worst = max(new, key=lambda r: r["anomaly_score"])
    return {"home": home, "worst_uri": worst["image_uri"], "archive": archive}


@pytest.fixture
def home(world, monkeypatch) -> dict:
    monkeypatch.setenv("FLOWSCORE_HOME", str(world["home"]))
    return world


def _img_srcs(page: str) -> list[str]:
    return re.findall(r'<img src="([^"]+)"', page)


def _images(index: Path) -> Path:
    """The folder of PNGs the page uses (one per build: ``images-<12 hex>``)."""
    (folder,) = {Path(html.unescape(s)).parent for s in _img_srcs(index.read_text())}
    return index.parent / folder


def _check_images(index: Path) -> list[str]:
    page = index.read_text()
    srcs = [html.unescape(s) for s in _img_srcs(page)]
    assert srcs
    for src in srcs:
        assert not re.match(r"^[a-z]+:", src) and not src.startswith("/"), src
        p = index.parent / src
        assert p.is_file(), src
        with Image.open(p) as im:
            assert im.format == "PNG"
            im.load()
            assert im.width > 10 and im.height > 10
    return srcs


def test_default_run_report(home, tmp_path):
    lines: list[str] = []
    index = run_report(tmp_path / "rep", None, lines.append)
    assert index == tmp_path / "rep" / "index.html"
    page = index.read_text()
    srcs = _check_images(index)
    assert "r-new" in page and "r-old" not in page
    assert html.escape(home["worst_uri"]) in page
    # worst first, 8 worst and 8 best, every figure present
    names = {Path(s).name for s in srcs}
    assert {f"worst_{i:02d}.png" for i in range(1, 9)} <= names
    assert {f"best_{i:02d}.png" for i in range(1, 9)} <= names
    assert {
        "quality_boxplots.png",
        "quality_hist.png",
        "quality_trend.png",
        "quality_by_path.png",
        "errors_by_type.png",
    } <= names
    assert page.index(html.escape(home["worst_uri"])) < page.index("best_01.png")
    # escaping: the error message and the archive name
    assert "<script>" not in page
    assert html.escape(SCRIPT_MSG) in page
    assert "file:///archive/&lt;harvest&gt;" in page
    # the missing original becomes a placeholder with a note; the run clip is the fallback
    assert "original not readable" in page
    assert "quantiles of the run" in page
    assert "UnidentifiedImageError" in page and "FileNotFoundError" in page
    assert any("wrote" in ln for ln in lines)
    # side by side: original | overlay is wider than one panel
    with Image.open(_images(index) / "best_01.png") as im:
        assert im.size == (2 * W + 8, H)


def test_period_report_covers_every_run_of_the_job_in_the_period(home, tmp_path, capsys):
    from jobs.cli import main

    out = tmp_path / "period"
    args = ["report", "--out", str(out), "--job", "harvest-nightly", "--quiet"]
    assert main([*args, "--from", "2024-02-01", "--to", "2024-02-05"]) == 0
    index = out / "index.html"
    page = index.read_text()
    srcs = _check_images(index)
    # r-old's rows were all rescored by r-new: 0 + 6 (r-nomaps) + 1 (r-single) + 21 (r-new)
    assert "job harvest-nightly, 2024-02-01 to 2024-02-05" in page
    assert "<th>rows in image_scores now</th><td>28</td>" in page
    assert "The 4 runs" in page and all(r in page for r in ("r-old", "r-nomaps", "r-single"))
    assert html.escape(home["worst_uri"]) in page  # the worst image of the whole period
    assert {"daily.png", "quality_trend.png", "errors_by_type.png"} <= {Path(s).name for s in srcs}
    assert "By camera" in page and "By year" in page
    # the period's rows by camera: the table's counts add up to the rows in scope
    cams = re.findall(r"<tr><td>(\d)</td><td>(\d+)</td>", page.split("By camera")[1])
    assert sum(int(n) for _, n in cams) == 28
    # one day: r-nomaps alone
    assert main([*args, "--from", "2024-02-02", "--to", "2024-02-03"]) == 0
    page = index.read_text()
    assert "<th>rows in image_scores now</th><td>6</td>" in page and "The 1 runs" in page
    # a job or a period without runs: exit 2, naming the jobs there are
    assert main(["report", "--out", str(out), "--job", "nightly", "--since", "30d"]) == 2
    err = capsys.readouterr().err
    assert "job 'nightly' has no runs" in err and "harvest-nightly (4 runs" in err
    assert main([*args, "--since", "30d"]) == 2  # 2024 is more than 30 days ago
    assert main(["report", "--out", str(out), "--since", "30d"]) == 2
    assert "choose the period of a --job report" in capsys.readouterr().err
    assert main([*args, "--run", "r-new", "--since", "30d"]) == 2
    assert "either --run or --job" in capsys.readouterr().err


def test_unknown_run_lists_recent_runs(home, tmp_path):
    with pytest.raises(ReportUsageError, match="unknown run id 'nope'") as exc:
        run_report(tmp_path / "rep", "nope", lambda _: None)
    assert "r-new" in str(exc.value) and "r-single" in str(exc.value)


def test_run_with_no_rows_left(home, tmp_path):
    with pytest.raises(ReportUsageError, match="no rows left"):
        run_report(tmp_path / "rep", "r-old", lambda _: None)


def test_null_heatmaps(home, tmp_path):
    index = run_report(tmp_path / "rep", "r-nomaps", lambda _: None)
    page = index.read_text()
    srcs = _check_images(index)
    assert "--no-heatmaps" in page
    assert "quality_boxplots.png" not in " ".join(srcs)
    assert "no errors" in page
    with Image.open(_images(index) / "worst_01.png") as im:
        assert im.size == (W, H)  # the original alone


def test_single_image_with_registry_clip(home, tmp_path, monkeypatch):
    """The clip comes from the real registry: model grain, version 3, in the home's MLflow."""
    from flowcore.bundle import FORMAT, FORMAT_VERSION
    from pipelines import tracking

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "featurizer": {},
        "flow": {},
        "heatmap_clip": [-20.0, -6.0],
    }
    (bundle / "flowscore.json").write_text(json.dumps(meta))
    c = tracking.client()
    exp = tracking.ensure_experiment(c, "report-test")
    if not c.search_registered_models("name = 'grain'"):
        for _ in range(3):
            run = c.create_run(exp)
            c.log_artifacts(run.info.run_id, str(bundle), "bundle")
            tracking.register_bundle(c, run.info.run_id, "bundle", "grain", promote=True)
    index = run_report(tmp_path / "rep", "r-single", lambda _: None)
    page = index.read_text()
    _check_images(index)
    assert "heatmap_clip of models:/grain/3" in page and "-20" in page
    assert "all of this run" in page  # no separate best list


@pytest.mark.slow
def test_registry_unreachable_falls_back(home, tmp_path, monkeypatch):
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    lines: list[str] = []
    index = run_report(tmp_path / "rep", "r-single", lines.append)
    assert "quantiles of the run" in index.read_text()
    assert any("not available" in ln and "TrackingError" in ln for ln in lines)


def test_empty_tables(tmp_path, monkeypatch):
    monkeypatch.setenv("FLOWSCORE_HOME", str(tmp_path / "empty-home"))
    with pytest.raises(ReportUsageError, match="no scored images"):
        run_report(tmp_path / "rep", None, lambda _: None)


# ---------------------------------------------------------------- in a real browser

_CHECK_PAGE = """<!DOCTYPE html><html><body><pre id="result">pending</pre>
<iframe id="f" src="index.html" width="1200" height="800"></iframe>
<script>
document.getElementById("f").addEventListener("load", async () => {
  const out = document.getElementById("result");
  try {
    const doc = document.getElementById("f").contentDocument;
    const imgs = Array.from(doc.images);
    await Promise.all(imgs.map(im => im.complete ? Promise.resolve() : new Promise(r => {
      im.addEventListener("load", r); im.addEventListener("error", r); })));
    out.textContent = JSON.stringify({
      title: doc.title,
      images: imgs.map(im => ({src: im.getAttribute("src"), w: im.naturalWidth,
                               h: im.naturalHeight, ok: im.complete && im.naturalWidth > 0})),
    });
  } catch (e) { out.textContent = "ERROR " + e; }
});
</script></body></html>
"""


def _browser() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return None


def _render_in_chromium(index: Path, tmp_path: Path) -> dict:
    """Load ``index`` in headless Chromium inside a checking page; every <img> the page names
    must have loaded. Returns the title and images the browser saw."""
    browser = _browser()
    if browser is None:
        pytest.skip(
            "chromium not installed: no chromium, chromium-browser or google-chrome on PATH "
            "(apt-get install -y --no-install-recommends chromium)"
        )
    expected = _img_srcs(index.read_text())
    check = index.parent / "_browser_check.html"
    check.write_text(_CHECK_PAGE)
    profile = tmp_path / "profile"
    cmd = [
        browser,
        "--headless=new",
        "--disable-gpu",
        "--no-sandbox",
        "--no-first-run",
        "--disable-extensions",
        f"--user-data-dir={profile}",
        "--allow-file-access-from-files",
        "--virtual-time-budget=5000",
        "--dump-dom",
    ]
    env = {**os.environ, "HOME": str(tmp_path)}
    res = subprocess.run(
        [*cmd, check.as_uri()], capture_output=True, text=True, timeout=120, env=env
    )
    assert res.returncode == 0, res.stderr[-2000:]
    m = re.search(r'<pre id="result">(.*?)</pre>', res.stdout, re.S)
    assert m, res.stdout[-2000:]
    text = html.unescape(m.group(1))
    assert text.startswith("{"), text
    result = json.loads(text)
    assert [i["src"] for i in result["images"]] == [html.unescape(s) for s in expected]
    bad = [i for i in result["images"] if not i["ok"]]
    assert not bad, bad
    # the page alone parses and keeps its content
    res = subprocess.run(
        [*cmd, index.as_uri()], capture_output=True, text=True, timeout=120, env=env
    )
    assert res.returncode == 0 and result["title"] in res.stdout
    return result


@pytest.mark.slow
def test_report_renders_in_headless_chromium(home, tmp_path):
    index = run_report(tmp_path / "rep", None, lambda _: None)
    result = _render_in_chromium(index, tmp_path)
    assert result["title"] == "flowscore report: run r-new"


@pytest.mark.slow
def test_period_report_renders_in_headless_chromium(home, tmp_path):
    index = run_report(
        tmp_path / "rep",
        None,
        lambda _: None,
        job="harvest-nightly",
        start=datetime(2024, 2, 1),
        end=datetime(2024, 2, 5),
    )
    result = _render_in_chromium(index, tmp_path)
    assert result["title"] == "flowscore report: job harvest-nightly, 2024-02-01 to 2024-02-05"
    assert any(i["src"].endswith("/daily.png") for i in result["images"])


def test_dollar_signs_in_paths_and_a_rebuild_that_leaves_no_stale_pictures(tmp_path, monkeypatch):
    """File names and path values with ``$…$`` are labels, not mathtext formulas; a second
    report into the same folder replaces the first whole: one folder of pictures, every
    picture the page names exists."""
    monkeypatch.setenv("FLOWSCORE_HOME", str(tmp_path / "home"))
    cat = tables.load_catalog_()
    tables.ensure_tables(cat, ["camera", "year"])
    rng = np.random.default_rng(1)
    rows = []
    for k in range(8):
        p = (
            tmp_path
            / "archive"
            / f"year=$20{k % 2}$"
            / f"camera=$x^{k}$"
            / f"img_$\\nocommand{k}$.png"
        )
        _write_image(p, rng)
        cam, year = f"$x^{k}$", f"$20{k % 2}$"
        rows.append(
            _row(
                _uri(p),
                f"{k}-1",
                cam,
                year,
                T0 + timedelta(days=k),
                "r-dollar",
                "grain",
                "sha-cccccccccccc",
                _heatmap(rng, 10.0 * (k == 3)),
            )
        )
    _upsert_scores(cat, rows)
    _record_run(cat, "r-dollar", datetime(2024, 3, 1), "sha-cccccccccccc", 8)
    out = tmp_path / "rep"
    first = _images(run_report(out, None, lambda _: None))
    index = run_report(out, None, lambda _: None)
    second = _images(index)
    assert first != second and not first.exists()
    assert [p.name for p in out.iterdir() if p.is_dir()] == [second.name]
    _check_images(index)
