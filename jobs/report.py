"""``flowscore report --out DIR [--run ID | --job NAME --since 30d]``: one self-contained HTML
page about a scoring run, or about every run of a job in a period.

The page is ``DIR/index.html`` with its pictures in ``DIR/images-<build>/*.png`` (a new
folder per build, swapped in with the page in one rename; earlier builds' folders are then
removed): no external CSS,
JavaScript or fonts, only relative links, so the directory can be zipped, mailed or served
as it is. Everything comes from the tables through :func:`jobs.query.connect` (SQL over the
current Iceberg snapshots); the originals are read again from their ``image_uri``.

Scope: the rows of one run, ``image_scores.run_id = ID``, its ``scoring_errors`` rows and its
``runs`` row; or, with ``--job NAME --since 30d`` (or ``--from``/``--to``), the rows of every
run of that job started in the period, with a table of those runs and a per-day section
(median quality and share of flagged images per day scored, overall and per value of each
small path column, ``daily.png``; and per path column, its values' counts over the period).
Without ``--run``, the most recent run in ``runs`` (by ``started_at``) that
still has rows in ``image_scores``. A rescore UPSERTs rows by (image_uri, etag,
model_version), so an older run may have fewer rows left than it scored; the page says so.
A run with no rows in ``image_scores`` but with error rows is reported (header and errors);
a run with neither, an unknown run id or empty tables raise :class:`ReportUsageError` (the
CLI exits 2), the message listing the recent runs.

Contents (PNG file names):

1. header: run id, job, model name/version, archive, start/end, status, counts and images/s
   from ``runs``, plus the rows this run still has in the tables;
2. the worst and best ``top`` images by ``anomaly_score`` (``worst_NN.png``,
   ``best_NN.png``): original | heatmap overlay (:func:`pipelines.plots.save_overlay`: dark red =
   low likelihood, clipped to the model's ``heatmap_clip`` when the registry has the model,
   else to the (0.1 %, 5 %) quantiles of the window log-likelihoods of up to 500 of the
   run's images), captioned with the path columns, ``captured_at``, ``quality``,
   ``anomaly_score`` and ``is_anomaly``. An original that cannot be read any more shows the
   heatmap over a grey placeholder; a row without a heatmap shows the original alone;
3. ``quality_boxplots.png``: per-image box plots of the window log-likelihoods (the grain
   paper's Figure 2): the run's images with heatmaps in 5 equal-count quality bins, 3 images
   picked from each (lowest, middle, highest quality of the bin), one box per image ordered
   by quality and coloured by bin;
4. ``quality_hist.png`` (distribution of ``quality``), ``quality_trend.png`` (``quality`` over
   ``captured_at``, flagged images in red, with the monthly median when the run spans at least
   3 months, else a rolling median) and ``quality_by_path.png`` (box plots of ``quality`` by
   each path column, i.e. each column of ``image_scores`` that is not one of DESIGN's fixed
   columns; at most 30 values per column, the most frequent);
5. ``errors_by_type.png`` and a table of stage / error type / count with up to 3 example
   messages, or "no errors".

Every text put into the page is HTML-escaped; image files are named by position only.
"""

from __future__ import annotations

import datetime as dt
import html
import math
import os
import re
import shutil
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

import numpy as np

from pipelines.log import Log
from pipelines.report_data import (
    CLIP_QUANTILES,
    CLIP_SAMPLE_IMAGES,
    MAX_GROUPS,
    ReportUsageError,
    Run,
    arrow_table,
    choose_period,
    choose_run,
    daily_counts,
    distinct_values,
    error_groups,
    fmt_day,
    fmt_ts,
    has_gradient_maps,
    heatmaps,
    main_model,
    numpy_column,
    path_columns,
    path_totals,
    registry_clip,
    run_clip,
    select_columns,
    top_rows,
)

if TYPE_CHECKING:
    import duckdb
    import pyarrow as pa

    from flowcore.scorer import Geometry
    from pipelines.settings import Settings

__all__ = ["ReportUsageError", "run_report", "DEFAULT_TOP", "IMAGES_DIR"]


DEFAULT_TOP = 8  # worst and best images shown
IMAGES_DIR = "images"  # subdirectory of the report directory holding the PNGs
PANEL_MAX = 480  # longest side (pixels) of one panel of an overlay picture
QUALITY_BINS = 5
PICKS_PER_BIN = 3
MAX_SCATTER = 20_000  # points in the trend scatter (the median line uses all)
MESSAGE_CHARS = 300


# ---------------------------------------------------------------- small helpers


def _e(value: Any) -> str:
    """HTML-escaped text of a value ("–" for None)."""
    return html.escape("–" if value is None else str(value), quote=True)


def _fmt_num(value: Any, digits: int = 4) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if math.isfinite(value) else str(value)
    return str(value)


def _short_name(uri: str) -> str:
    """The file name of an image URI (flowscore's URIs are not percent-encoded)."""
    path = urlparse(uri).path or uri
    return path.rstrip("/").rsplit("/", 1)[-1] or uri


def _natural_key(text: str) -> tuple[Any, ...]:
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", text))


@dataclass
class _Page:
    """What the HTML is built from."""

    run: Run
    path_columns: list[str]
    notes: dict[str, list[str]] = field(default_factory=dict)
    worst: list[dict[str, Any]] = field(default_factory=list)
    best: list[dict[str, Any]] = field(default_factory=list)
    pictures: dict[str, str] = field(default_factory=dict)  # section -> relative PNG path
    bins: list[str] = field(default_factory=list)
    error_groups: list[dict[str, Any]] = field(default_factory=list)
    clip: tuple[float, float] | None = None
    clip_source: str = ""
    has_heatmaps: bool = False
    path_tables: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # period pages
    images: str = IMAGES_DIR  # this build's folder of PNGs, relative to the report directory

    def note(self, section: str, text: str) -> None:
        self.notes.setdefault(section, []).append(text)


# ---------------------------------------------------------------- choosing the run


# ---------------------------------------------------------------- data


# ---------------------------------------------------------------- heatmap clip


# ---------------------------------------------------------------- pictures


def _geometry(row: dict[str, Any]) -> Geometry | None:
    from flowcore.scorer import Geometry

    if row.get("window") is None or row.get("stride") is None or row.get("scale") is None:
        return None
    if not row["window"] or not row["stride"] or not row["scale"]:
        return None
    return Geometry(int(row["window"]), int(row["stride"]), float(row["scale"]))


def _grid(row: dict[str, Any], clip: tuple[float, float] | None) -> np.ndarray | None:
    hm, gh, gw = row.get("heatmap"), row.get("grid_h"), row.get("grid_w")
    if hm is None or not gh or not gw or len(hm) != gh * gw:
        return None
    grid = np.asarray(hm, dtype=np.float32).reshape(gh, gw)
    lo, hi = clip if clip else (float(np.nanmin(grid)), float(np.nanmax(grid)))
    return np.nan_to_num(grid, nan=hi, neginf=lo, posinf=hi)


def _downscale(rgb: np.ndarray) -> tuple[np.ndarray, float]:
    """``rgb`` with its longest side at most PANEL_MAX, and the factor applied."""
    from PIL import Image

    h, w = rgb.shape[:2]
    f = min(1.0, PANEL_MAX / max(h, w, 1))
    if f >= 1.0:
        return rgb, 1.0
    size = (max(1, round(w * f)), max(1, round(h * f)))
    small = np.asarray(Image.fromarray(rgb).resize(size, Image.Resampling.BILINEAR))
    return small, size[0] / w


def _read_original(uri: str) -> tuple[np.ndarray | None, str | None]:
    from pipelines.archive import decode_image, read_bytes

    try:
        return decode_image(read_bytes(uri)).rgb, None
    except Exception as e:  # noqa: BLE001 - a file gone or changed: show what we have
        first = (str(e).strip().splitlines() or [""])[0][:MESSAGE_CHARS]
        return None, f"{type(e).__name__}: {first}"


def _image_picture(
    row: dict[str, Any], path: Path, clip: tuple[float, float] | None
) -> tuple[bool, str | None]:
    """Write the picture of one row to ``path``: original | overlay, the heatmap over a grey
    placeholder when the original cannot be read, the original alone when the row has no
    heatmap. Returns (written, note for the caption)."""
    from PIL import Image

    from flowcore.scorer import Geometry
    from pipelines.plots import overlay, save_overlay

    geometry = _geometry(row)
    grid = _grid(row, clip) if geometry is not None else None
    rgb, why = _read_original(str(row["image_uri"]))
    if rgb is not None:
        small, f = _downscale(rgb)
        if grid is None or geometry is None:
            Image.fromarray(small).save(path)
            return True, "no heatmap stored for this image (scored with --no-heatmaps)"
        geo = Geometry(geometry.window, geometry.stride, geometry.scale / f)
        save_overlay(path, small, grid, geo, clip)
        return True, None
    if grid is None or geometry is None:
        return False, f"original not readable ({why}) and no heatmap stored"
    h = int(row.get("height") or 0) or round(grid.shape[0] * geometry.stride / geometry.scale)
    w = int(row.get("width") or 0) or round(grid.shape[1] * geometry.stride / geometry.scale)
    f = min(1.0, PANEL_MAX / max(h, w, 1))
    ph, pw = max(1, round(h * f)), max(1, round(w * f))
    grey = np.full((ph, pw, 3), 160, np.uint8)
    geo = Geometry(geometry.window, geometry.stride, geometry.scale / (pw / w))
    Image.fromarray(overlay(grey, grid, geo, clip)).save(path)
    return True, f"original not readable ({why}): heatmap over a grey placeholder"


def _overlays(page: _Page, out: Path, log: Log) -> None:
    missing_heatmaps = 0
    for kind, rows in (("worst", page.worst), ("best", page.best)):
        for i, row in enumerate(rows, 1):
            name = f"{page.images}/{kind}_{i:02d}.png"
            written, note = _image_picture(row, out / name, page.clip)
            row["_picture"] = name if written else None
            row["_note"] = note
            missing_heatmaps += row.get("heatmap") is None
    if missing_heatmaps and page.has_heatmaps:
        page.note(
            "images",
            f"{missing_heatmaps} of these images have no heatmap (the run was scored with "
            "--no-heatmaps): they are shown without an overlay.",
        )
    log(f"report: {len(page.worst) + len(page.best)} worst/best pictures")


def _boxplots(
    con: duckdb.DuckDBPyConnection, page: _Page, data: pa.Table, out: Path, log: Log
) -> None:
    from jobs.render import save_image_boxplots

    quality = numpy_column(data, "quality")
    has = numpy_column(data, "__has_heatmap", dtype=bool).astype(bool)
    ok = np.flatnonzero(has & np.isfinite(quality))
    if ok.size == 0:
        page.note("boxplots", "no heatmaps stored for this run (--no-heatmaps): no box plots.")
        return
    order = ok[np.argsort(quality[ok], kind="stable")]
    n_bins = min(QUALITY_BINS, order.size)
    bins = np.array_split(order, n_bins)
    picks: list[tuple[int, int]] = []  # (row index, bin)
    for b, members in enumerate(bins):
        pos = np.unique(np.linspace(0, members.size - 1, min(PICKS_PER_BIN, members.size)))
        picks.extend((int(members[int(round(p))]), b) for p in pos)
        lo, hi = quality[members[0]], quality[members[-1]]
        page.bins.append(f"Q{b + 1}: {lo:.3g} … {hi:.3g} ({members.size} images)")
    uris = data.column("image_uri").to_pylist()
    etags = data.column("etag").to_pylist()
    keys = [(uris[i], etags[i]) for i, _ in picks]
    maps = heatmaps(con, keys)
    boxes = []
    for (i, b), key in zip(picks, keys, strict=True):
        hm = maps.get(key)
        if hm is None:
            continue
        v = np.asarray(hm, dtype=float)
        v = v[np.isfinite(v)]
        if v.size:
            boxes.append((f"{_short_name(uris[i])[:28]} ({quality[i]:.3g})", v, b))
    if not boxes:
        page.note("boxplots", "the picked images have no finite window log-likelihoods.")
        return
    name = f"{page.images}/quality_boxplots.png"
    save_image_boxplots(
        out / name,
        boxes,
        page.bins,
        f"window log-likelihoods of {len(boxes)} images across {n_bins} quality bins",
    )
    page.pictures["boxplots"] = name
    log(f"report: box plots of {len(boxes)} images in {n_bins} quality bins")


def _median_line(t: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray, str] | None:
    """Monthly medians when ``t`` spans at least 3 calendar months, else a rolling median of
    about a tenth of the points (at least 3)."""
    if t.size < 3:
        return None
    order = np.argsort(t, kind="stable")
    t, v = t[order], v[order]
    months = t.astype("datetime64[M]")
    distinct = np.unique(months)
    if distinct.size >= 3:
        xs: list[np.datetime64] = []
        ys: list[float] = []
        for i, m in enumerate(distinct):
            if i and (m - distinct[i - 1]).astype(int) > 1:  # a gap: break the line
                xs.append(m.astype("datetime64[us]"))
                ys.append(math.nan)
            xs.append(m.astype("datetime64[us]") + np.timedelta64(15, "D"))
            ys.append(float(np.median(v[months == m])))
        return np.array(xs, dtype="datetime64[us]"), np.array(ys), "monthly median"
    k = int(np.clip(t.size // 10, 3, 201))
    if k > t.size:
        return None
    win = np.lib.stride_tricks.sliding_window_view(v, k)
    med = np.median(win, axis=1)
    centre = t[k // 2 : k // 2 + med.size]
    return centre, med, f"rolling median of {k} images"


def _path_panels(
    page: _Page, data: pa.Table, quality: np.ndarray
) -> list[tuple[str, list[tuple[str, np.ndarray]]]]:
    """Per path column, the images' quality by value (the most frequent values only)."""
    panels = []
    for col in page.path_columns:
        values = data.column(col).to_pylist()
        if all(x is None for x in values):
            continue
        groups: dict[str, list[float]] = {}
        for x, q in zip(values, quality, strict=True):
            if math.isfinite(q):
                groups.setdefault("(none)" if x is None else str(x), []).append(float(q))
        if len(groups) > MAX_GROUPS:
            kept = sorted(groups, key=lambda g: -len(groups[g]))[:MAX_GROUPS]
            page.note(
                "quality",
                f"{col}: the {MAX_GROUPS} most frequent of {len(groups)} values are shown.",
            )
            groups = {g: groups[g] for g in kept}
        ordered = sorted(groups, key=_natural_key)
        panels.append((col, [(g, np.asarray(groups[g])) for g in ordered]))
    return panels


def _quality_figures(page: _Page, data: pa.Table, out: Path, log: Log) -> None:
    from jobs.render import save_grouped_boxplots, save_histogram, save_trend

    quality = numpy_column(data, "quality")
    finite = np.isfinite(quality)
    name = f"{page.images}/quality_hist.png"
    save_histogram(
        out / name, quality, f"quality of {int(finite.sum())} images", "quality (higher = better)"
    )
    page.pictures["hist"] = name

    times = data.column("captured_at").cast("timestamp[us]").to_numpy(zero_copy_only=False)
    times = np.asarray(times, dtype="datetime64[us]")
    flagged = np.asarray(
        data.column("is_anomaly").fill_null(False).to_numpy(zero_copy_only=False), dtype=bool
    )
    ok = finite & ~np.isnat(times)
    if ok.sum() < ok.size:
        page.note(
            "quality",
            f"{int(ok.size - ok.sum())} images without captured_at or quality are left out of "
            "the trend.",
        )
    t, v, f = times[ok], quality[ok], flagged[ok]
    line = _median_line(t, v)
    if t.size > MAX_SCATTER:
        keep = np.sort(np.random.default_rng(0).choice(t.size, MAX_SCATTER, replace=False))
        page.note(
            "quality",
            f"the scatter shows {MAX_SCATTER} of {t.size} images; the median uses all.",
        )
        t, v, f = t[keep], v[keep], f[keep]
    name = f"{page.images}/quality_trend.png"
    save_trend(out / name, t, v, f, line, "quality over capture time", "quality")
    page.pictures["trend"] = name

    panels = _path_panels(page, data, quality)
    if panels:
        name = f"{page.images}/quality_by_path.png"
        save_grouped_boxplots(out / name, panels, "quality")
        page.pictures["by_path"] = name
    elif page.path_columns:
        page.note("quality", "the path columns are empty for this run's images.")
    else:
        page.note("quality", "the archive has no key=value path columns.")
    log(f"report: quality histogram, trend and {len(panels)} path-column box plots")


DAILY_LINES = 6  # values of a path column drawn as their own lines in the per-day figure


def _daily(con: duckdb.DuckDBPyConnection, page: _Page, out: Path, log: Log) -> None:
    """Per scoring day: median quality and the share of flagged images, overall and for each
    value of the path columns with at most :data:`DAILY_LINES` values; plus a table of each
    path column's values over the whole period."""
    from jobs.render import save_daily

    overall = daily_counts(con)
    if not overall:
        page.note("daily", "no scored_at in these rows: no per-day figure.")
        return
    days = sorted(overall)
    series = []

    def line(label: str, got: dict[Any, tuple]) -> None:
        rows = [got.get(d, (0, 0, None)) for d in days]
        series.append(
            (
                label,
                np.array([r[0] for r in rows], float),
                np.array([r[1] for r in rows], float),
                np.array([np.nan if r[2] is None else r[2] for r in rows], float),
            )
        )

    line("all images", overall)
    for col in page.path_columns:
        values = distinct_values(con, col)
        if 1 < len(values) <= DAILY_LINES and len(series) < 1 + 2 * DAILY_LINES:
            for v in sorted(values, key=lambda x: _natural_key(str(x))):
                line(f"{col}={v}", daily_counts(con, col, v))
        page.path_tables[col] = path_totals(con, col)
    name = f"{page.images}/daily.png"
    save_daily(
        out / name,
        np.array(days, dtype="datetime64[D]"),
        series,
        f"per day scored: {len(days)} days, {page.run.rows} images",
    )
    page.pictures["daily"] = name
    log(f"report: per-day figure over {len(days)} days ({len(series)} lines)")


def _daily_html(page: _Page) -> str:
    parts = [_notes(page, "daily"), _picture(page, "daily", "quality and flagged per day")]
    for col, rows in page.path_tables.items():
        body = "".join(
            f"<tr><td>{_e(r['value'] if r['value'] is not None else '(none)')}</td>"
            f"<td>{_e(r['images'])}</td><td>{_e(r['flagged'])}</td>"
            f"<td>{100 * r['flagged'] / max(r['images'], 1):.1f} %</td>"
            f"<td>{_e(_fmt_num(r['median_quality'], 4))}</td></tr>\n"
            for r in rows
        )
        parts.append(
            f"<h3>By {_e(col)}</h3>\n<table>\n<tr><th>{_e(col)}</th><th>images</th>"
            f"<th>flagged</th><th>flagged share</th><th>median quality</th></tr>\n"
            f"{body}</table>\n"
        )
    return "".join(parts)


def _errors(con: duckdb.DuckDBPyConnection, page: _Page, out: Path, log: Log) -> None:
    from jobs.render import save_bar_chart

    if page.run.errors == 0:
        return
    groups = error_groups(con)
    page.error_groups = groups
    name = f"{page.images}/errors_by_type.png"
    save_bar_chart(
        out / name,
        [f"{g['stage']} / {g['error_type']}"[:60] for g in groups],
        [int(g["n"]) for g in groups],
        f"errors by stage / type ({page.run.errors} files)",
    )
    page.pictures["errors"] = name
    log(f"report: {page.run.errors} errors in {len(groups)} stage/type groups")


# ---------------------------------------------------------------- HTML

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Helvetica, Arial, sans-serif;
       margin: 1.5em auto; max-width: 1200px; padding: 0 1em; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; border-bottom: 1px solid #ccc;
     padding-bottom: .2em; margin-top: 2em; }
table { border-collapse: collapse; font-size: .9em; }
td, th { border: 1px solid #ddd; padding: .25em .6em; text-align: left; vertical-align: top; }
th { background: #f4f4f4; }
code, .mono { font-family: ui-monospace, Menlo, Consolas, monospace; font-size: .9em;
              word-break: break-all; }
.gallery { display: grid; grid-template-columns: repeat(auto-fill, minmax(460px, 1fr));
           gap: 1em 1.5em; }
figure { margin: 1em 0; } figure img { max-width: 100%; height: auto; border: 1px solid #ddd; }
figcaption { font-size: .85em; color: #333; margin-top: .3em; }
.note { background: #fff8e1; border-left: 4px solid #f0b400; padding: .4em .8em; }
.flag { color: #8b0000; font-weight: bold; }
nav a { margin-right: 1em; }
"""


def _notes(page: _Page, section: str) -> str:
    return "".join(f'<p class="note">{_e(n)}</p>\n' for n in page.notes.get(section, []))


def _period_header(page: _Page) -> str:
    run = page.run
    assert run.period is not None
    p = run.period
    statuses: dict[str, int] = {}
    for r in p.runs:
        statuses[str(r.get("status"))] = statuses.get(str(r.get("status")), 0) + 1

    def total(key: str) -> int:
        return sum(int(r.get(key) or 0) for r in p.runs)

    fields = [
        ("job", _e(p.job)),
        ("period (UTC)", _e(f"{fmt_day(p.start)} to {fmt_day(p.end)}")),
        ("runs", _e(f"{len(p.runs)} (" + ", ".join(f"{n} {k}" for k, n in statuses.items()) + ")")),
        ("images scored", _e(total("images_scored"))),
        ("images failed", _e(total("images_failed"))),
        ("rows in image_scores now", _e(run.rows)),
        ("rows in scoring_errors now", _e(run.errors)),
    ]
    if page.clip is not None:
        lo, hi = page.clip
        fields.append(("heatmap clip", _e(f"{lo:.4g} … {hi:.4g} ({page.clip_source})")))
    body = "".join(f"<tr><th>{k}</th><td>{v}</td></tr>\n" for k, v in fields)
    head = "<tr><th>started</th><th>status</th><th>model version</th><th>scored</th>"
    head += "<th>failed</th><th>skipped</th><th>images/s</th><th>run id</th></tr>\n"
    rows = "".join(
        f"<tr><td>{_e(fmt_ts(r.get('started_at')))}</td><td>{_e(r.get('status'))}</td>"
        f"<td>{_e(r.get('model_version'))}</td><td>{_e(r.get('images_scored'))}</td>"
        f"<td>{_e(r.get('images_failed'))}</td><td>{_e(r.get('images_skipped'))}</td>"
        f"<td>{_e(_fmt_num(r.get('images_per_s'), 4))}</td>"
        f'<td class="mono">{_e(r.get("run_id"))}</td></tr>\n'
        for r in p.runs
    )
    return (
        f"<table>\n{body}</table>\n{_notes(page, 'header')}"
        f"<h3>The {len(p.runs)} runs</h3>\n<table>\n{head}{rows}</table>\n"
    )


def _header(page: _Page) -> str:
    if page.run.period is not None:
        return _period_header(page)
    run, info = page.run, page.run.info or {}
    started, finished = info.get("started_at"), info.get("finished_at")
    duration = "–"
    if isinstance(started, dt.datetime) and isinstance(finished, dt.datetime):
        duration = f"{(finished - started).total_seconds():.1f} s"
    ips = info.get("images_per_s")
    fields = [
        ("run id", f'<span class="mono">{_e(run.run_id)}</span>'),
        ("job", _e(info.get("job"))),
        ("model", f"{_e(info.get('model_name'))} version {_e(info.get('model_version'))}"),
        ("archive", f'<span class="mono">{_e(info.get("archive"))}</span>'),
        ("started", _e(fmt_ts(started))),
        ("finished", _e(fmt_ts(finished))),
        ("duration", _e(duration)),
        ("status", _e(info.get("status"))),
        ("images listed", _e(info.get("images_listed"))),
        ("images scored", _e(info.get("images_scored"))),
        ("images skipped", _e(info.get("images_skipped"))),
        ("images failed", _e(info.get("images_failed"))),
        ("images/s", _e(_fmt_num(ips, 4) if isinstance(ips, float) else ips)),
        ("rows in image_scores now", _e(run.rows)),
        ("rows in scoring_errors now", _e(run.errors)),
    ]
    if info.get("mlflow_run_id"):
        fields.append(("MLflow run", f'<span class="mono">{_e(info["mlflow_run_id"])}</span>'))
    if info.get("warnings"):
        fields.append(("warnings", f'<span class="flag">{_e(info["warnings"])}</span>'))
    if page.clip is not None:
        lo, hi = page.clip
        fields.append(("heatmap clip", _e(f"{lo:.4g} … {hi:.4g} ({page.clip_source})")))
    body = "".join(f"<tr><th>{k}</th><td>{v}</td></tr>\n" for k, v in fields)
    return f"<table>\n{body}</table>\n{_notes(page, 'header')}"


def _caption(row: dict[str, Any], path_columns: Sequence[str]) -> str:
    parts = [f'<span class="mono">{_e(row["image_uri"])}</span>']
    cols = [f"{_e(c)}={_e(row.get(c))}" for c in path_columns if row.get(c) is not None]
    if cols:
        parts.append(" · ".join(cols))
    flag = row.get("is_anomaly")
    parts.append(
        f"captured_at {_e(fmt_ts(row.get('captured_at')))} · quality "
        f"{_e(_fmt_num(row.get('quality')))} · anomaly_score "
        f"{_e(_fmt_num(row.get('anomaly_score')))} · is_anomaly "
        + (f'<span class="flag">{_e(_fmt_num(flag))}</span>' if flag else _e(_fmt_num(flag)))
    )
    if row.get("_note"):
        parts.append(f"<em>{_e(row['_note'])}</em>")
    return "<br>".join(parts)


def _gallery(rows: Sequence[dict[str, Any]], path_columns: Sequence[str]) -> str:
    out = []
    for i, row in enumerate(rows, 1):
        pic = row.get("_picture")
        alt = _e(_short_name(str(row["image_uri"])))
        img = f'<a href="{_e(pic)}"><img src="{_e(pic)}" alt="{alt}"></a>\n' if pic else ""
        out.append(
            f"<figure>{img}<figcaption>{i}. {_caption(row, path_columns)}</figcaption></figure>\n"
        )
    return '<div class="gallery">\n' + "".join(out) + "</div>\n"


def _picture(page: _Page, key: str, alt: str) -> str:
    pic = page.pictures.get(key)
    if not pic:
        return ""
    return f'<figure><img src="{_e(pic)}" alt="{_e(alt)}"></figure>\n'


def _errors_html(page: _Page) -> str:
    if page.run.errors == 0:
        return "<p>no errors: every file this run read was scored.</p>\n"
    rows = []
    for g in page.error_groups:
        ex = "".join(
            f'<li><span class="mono">{_e(uri)}</span>: {_e(msg[:MESSAGE_CHARS])}'
            f"{'…' if len(msg) > MESSAGE_CHARS else ''}</li>"
            for uri, msg in g["examples"]
        )
        rows.append(
            f"<tr><td>{_e(g['stage'])}</td><td>{_e(g['error_type'])}</td>"
            f"<td>{_e(g['n'])}</td><td><ul>{ex}</ul></td></tr>\n"
        )
    table = (
        "<table>\n<tr><th>stage</th><th>error type</th><th>count</th>"
        f"<th>examples</th></tr>\n{''.join(rows)}</table>\n"
    )
    return _picture(page, "errors", "errors by stage and type") + table


def _scored_html(page: _Page, what: str) -> tuple[str, str, str]:
    """The worst/best images, the box plots and the quality sections of a page with rows."""
    images = (
        "<p>Each picture: the original | its heatmap overlay (dark red = low window "
        "log-likelihood, transparent at or above the clip's upper value).</p>\n"
        f"{_notes(page, 'images')}"
        f"<h3>The {len(page.worst)} worst (highest anomaly_score)</h3>\n"
        f"{_gallery(page.worst, page.path_columns)}"
        f"<h3>The {len(page.best)} best (lowest anomaly_score)</h3>\n"
        + (
            _gallery(page.best, page.path_columns)
            if page.best
            else f"<p>all of this {what}'s images are shown above.</p>\n"
        )
    )
    bins = "".join(f"<li>{_e(b)}</li>" for b in page.bins)
    boxplots = (
        "<p>Window log-likelihoods of images picked across equal-count bins of quality "
        f"(up to {PICKS_PER_BIN} per bin), one box per image, ordered by quality and "
        "coloured by bin (as Figure 2 of the grain paper).</p>\n"
        f"{_notes(page, 'boxplots')}{_picture(page, 'boxplots', 'per-image box plots')}"
        + (f"<ul>{bins}</ul>\n" if bins else "")
    )
    quality = (
        "<p>quality = (p25 + p50) / 2 of the window log-likelihoods (lower = worse).</p>\n"
        f"{_notes(page, 'quality')}"
        f"{_picture(page, 'hist', 'quality histogram')}"
        f"{_picture(page, 'trend', 'quality over captured_at')}"
        f"{_picture(page, 'by_path', 'quality by path column')}"
    )
    return images, boxplots, quality


def _html(page: _Page, top: int) -> str:
    run = page.run
    title = f"flowscore report: {run.title}"
    what = "run" if run.period is None else "period"
    generated = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    none = f'<p class="note">this {what} has no rows left in image_scores.</p>\n'
    if run.rows:
        images, boxplots, quality = _scored_html(page, what)
    else:
        images = boxplots = quality = none
    daily = ""
    if run.period is not None:
        daily = '<h2 id="daily">Per day and per path column</h2>\n' + (
            _daily_html(page) if run.rows else none
        )
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{_e(title)}</title>
<style>{_CSS}</style>
</head>
<body>
<h1>{_e(title)}</h1>
<nav><a href="#run">{what}</a>{'<a href="#daily">per day</a>' if daily else ""}
<a href="#images">worst &amp; best</a>
<a href="#boxplots">box plots</a><a href="#quality">quality</a><a href="#errors">errors</a></nav>
<h2 id="run">{what.capitalize()}</h2>
{_header(page)}
{daily}
<h2 id="images">Worst and best images (top {_e(top)})</h2>
{images}
<h2 id="boxplots">Per-image window log-likelihoods by quality bin</h2>
{boxplots}
<h2 id="quality">Quality: distribution, trend and path columns</h2>
{quality}
<h2 id="errors">Errors</h2>
{_notes(page, "errors")}{_errors_html(page)}
<p><small>generated {_e(generated)} by flowscore report</small></p>
</body>
</html>
"""


# ---------------------------------------------------------------- entry point


_IMAGES_RE = re.compile(rf"^{IMAGES_DIR}(-[0-9a-f]{{12}})?$")


def _remove_other_builds(out: Path, keep: str) -> None:
    """Remove the PNG folders of earlier reports (``images``, ``images-<12 hex>``)."""
    for p in out.iterdir():
        if p.name != keep and p.is_dir() and _IMAGES_RE.match(p.name):
            shutil.rmtree(p, ignore_errors=True)


def _check_request(
    run_id: str | None,
    top: int,
    job: str | None,
    start: dt.datetime | None,
    end: dt.datetime | None,
) -> dt.datetime | None:
    """Check what :func:`run_report` was asked for; returns the period's end (now when a
    job's period has none). Raises :class:`ReportUsageError`."""
    if top < 1:
        raise ReportUsageError(f"the number of worst/best images must be >= 1, not {top}")
    if job is None:
        return end
    if run_id is not None:
        raise ReportUsageError("give either --run or --job, not both")
    if start is None:
        raise ReportUsageError("--job needs a period: --since 30d, or --from DATE")
    end = end or dt.datetime.now(dt.UTC).replace(tzinfo=None)
    if not start < end:
        raise ReportUsageError(f"the period is empty: {start} is not before {end}")
    return end


def _header_notes(page: _Page, run: Run) -> None:
    """What the page says when the tables no longer hold all that the run wrote."""
    info = run.info or {}
    scored = info.get("images_scored")
    if run.info is None and run.period is None:
        page.note("header", "this run has no row in the runs table.")
    if isinstance(scored, int) and run.rows < scored:
        page.note(
            "header",
            f"the run scored {scored} images but {run.rows} of its rows remain in "
            "image_scores: a later run rescored the others (UPSERT on image_uri, etag, "
            "model_version).",
        )
    failed = info.get("images_failed")
    if isinstance(failed, int) and run.errors < failed:
        page.note(
            "errors",
            f"the run recorded {failed} failed files, {run.errors} of its error rows "
            "remain (a later run failed or scored the others).",
        )
    if run.rows == 0:
        what = "run" if run.period is None else "period's runs"
        page.note("header", f"this {what} has no rows left in image_scores.")


def _build(
    con: duckdb.DuckDBPyConnection,
    page: _Page,
    out: Path,
    top: int,
    log: Log,
    settings: Settings | None,
) -> Path:
    """Draw the page's pictures into a new folder and write its index.html."""
    run = page.run
    # a new folder per build: the old index.html keeps its pictures until the new one
    # replaces it in one rename, so a reader (or a crash) never sees a page whose PNGs
    # are gone or half-written
    page.images = f"{IMAGES_DIR}-{uuid.uuid4().hex[:12]}"
    images_dir = out / page.images
    images_dir.mkdir(parents=True)
    try:
        if run.rows:
            _scored_sections(con, page, out, top, log, settings)
            if run.period is not None:
                _daily(con, page, out, log)
        _errors(con, page, out, log)
        index = out / "index.html"
        tmp = out / f".index.html.{os.getpid()}.tmp"
        tmp.write_text(_html(page, top), encoding="utf-8")
        os.replace(tmp, index)
    except BaseException:
        shutil.rmtree(images_dir, ignore_errors=True)
        raise
    return index


def run_report(
    out_dir: Path,
    run_id: str | None,
    log: Log,
    *,
    top: int = DEFAULT_TOP,
    job: str | None = None,
    start: dt.datetime | None = None,
    end: dt.datetime | None = None,
    settings: Settings | None = None,
) -> Path:
    """Write the report of run ``run_id`` (default: the most recent run with scored rows),
    or with ``job`` of every run of that job started in ``[start, end)`` (naive UTC; ``end``
    default now), into ``out_dir`` (created if missing) and return the path of its
    ``index.html``.

    Raises :class:`ReportUsageError` for empty tables, an unknown run id, a run with no rows
    left, a job without runs in the period, ``top < 1`` or a catalog that cannot be
    opened."""
    from pipelines.sql import connect
    from pipelines.tables import TablesError

    end = _check_request(run_id, top, job, start, end)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ReportUsageError(f"--out {out} exists and is not a directory")
    try:
        con = connect(settings=settings)
    except TablesError as e:
        raise ReportUsageError(str(e)) from e
    try:
        if job is not None:
            assert start is not None and end is not None
            run = choose_period(con, job, start, end)
        else:
            run = choose_run(con, run_id)
        log(f"report: {run.title}: {run.rows} scored rows, {run.errors} error rows")
        page = _Page(run=run, path_columns=path_columns(con))
        _header_notes(page, run)
        index = _build(con, page, out, top, log, settings)
    finally:
        con.close()
    _remove_other_builds(out, keep=page.images)
    log(f"report: wrote {index}")
    return index


def _scored_sections(
    con: duckdb.DuckDBPyConnection,
    page: _Page,
    out: Path,
    top: int,
    log: Log,
    settings: Settings | None = None,
) -> None:
    data = arrow_table(
        con, f"select {select_columns(page.path_columns, heatmap=False)} from scope_scores", []
    )
    with_maps = int(np.asarray(data.column("__has_heatmap").to_numpy(zero_copy_only=False)).sum())
    page.has_heatmaps = with_maps > 0
    if with_maps:
        first = main_model(con)
        info = page.run.info or {}
        name = info.get("model_name") or first[0]
        version = info.get("model_version") or first[1]
        gradient = has_gradient_maps(con)
        page.clip = (
            None if gradient else registry_clip(str(name or ""), str(version or ""), log, settings)
        )
        page.clip_source = f"heatmap_clip of models:/{name}/{version}"
        if gradient:
            page.note(
                "images",
                "heatmaps of this run are gradient maps (score --heatmap gradient): dark red "
                "where the image's likelihood is most sensitive to its pixels, clipped to the "
                "run's own quantiles; the box plots show minus the map.",
            )
        if page.clip is None:
            page.clip = run_clip(con)
            page.clip_source = (
                f"{CLIP_QUANTILES[0]:.1%} and {CLIP_QUANTILES[1]:.0%} quantiles of the "
                f"run's {'heatmap values' if gradient else 'window log-likelihoods'} "
                f"(up to {CLIP_SAMPLE_IMAGES} images)"
            )
    else:
        page.note(
            "images",
            "this run stored no heatmaps (scored with --no-heatmaps): originals are shown "
            "without overlays.",
        )
    page.worst, page.best = top_rows(con, page.path_columns, top)
    _overlays(page, out, log)
    _boxplots(con, page, data, out, log)
    _quality_figures(page, data, out, log)
