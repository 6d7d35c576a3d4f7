"""``flowscore bench --tables N``: the result tables at archive scale.

1. **Fill** a scratch catalog (never the user's) with ``N`` rows of ``image_scores`` in
   ``--commits`` commits, as a year of nightly runs leaves them: realistic columns, path
   columns ``year`` and ``camera``, a heatmap of ``--heatmap-cells`` float32 per row; one
   ``scoring_errors`` row per 1,000 images and one ``runs`` row per night.
2. **Measure**, each step in a fresh child process so that its peak RSS is its own:

   * ``idle``: the nightly job's subtraction (``pipelines.incremental.pending``, the very
     code ``flowscore run`` calls) over a listing of every file, which finds nothing new.
     The listing is built in the child as ``list_archive_columns`` builds it (its memory is
     reported apart: ``listing_mb``), and its time is not counted: listing S3 is the
     store's cost, not the tables'.
   * ``new``: the same with 1 % new files, then their rows committed by the scoring job's
     own UPSERT (``pipelines.score.upsert_scores``: Ray Data ``write_iceberg``) in chunks of
     5,000 as ``commit_every`` does; Ray's start is not counted.
   * ``query``: ``flowscore query``'s code on two typical questions (the 20 worst images of
     a year; the monthly average quality by camera).

   then ``maintain`` (keeping the last 30 snapshots: a month of nights), and the three
   steps again.

Wall times are seconds; ``rss_mb`` is the child's peak RSS (the driver; Ray's workers are
other processes), ``base_mb`` the same child's RSS after its imports.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from pipelines.log import Log
from pipelines.settings import Settings, current, scratch_env

__all__ = ["run_table_bench", "QUERIES"]

VERSION = "1"
PATH_COLUMNS = ["year", "camera"]
ERRORS_PER = 1000  # one scoring_errors row per this many images
NEW_FRACTION = 0.01
CHUNK = 5000  # rows per commit of the "new" step, as commit_every
START = datetime(2019, 1, 1)
QUERIES = {
    "worst 20 of a year": "select image_uri, anomaly_score from image_scores "
    "where year = '2019' order by anomaly_score desc limit 20",
    "monthly mean by camera": "select camera, date_trunc('month', captured_at) as month, "
    "avg(quality) as quality, count(*) as n from image_scores group by 1, 2 order by 1, 2",
}


def _rss_mb() -> float:
    """This process's peak RSS (VmHWM: unlike ``ru_maxrss``, not inherited over exec)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _uri(i: int, night: int) -> str:
    day = START + timedelta(days=night)
    return (
        f"s3://bench-archive/year={day.year}/camera={1 + i % 2}/"
        f"{day:%Y-%m-%d}_{(i * 7919) % 86400:05d}_{i:09d}.jpg"
    )


def _etag(i: int) -> str:
    return f"{(i * 2654435761) % 2**64:016x}{i:016x}"


def _nights(rows: int, commits: int) -> Iterator[tuple[int, int, int]]:
    """(night, first image index, images) for each commit."""
    per, extra = divmod(rows, commits)
    i = 0
    for night in range(commits):
        n = per + (1 if night < extra else 0)
        yield night, i, n
        i += n


def _scores(first: int, n: int, night: int, cells: int, rng: np.random.Generator) -> pa.Table:
    from pipelines import tables

    schema = tables.image_scores_arrow_schema(PATH_COLUMNS)
    idx = np.arange(first, first + n)
    day = START + timedelta(days=night)
    summary = {
        c: rng.normal(-300, 20, n).astype(np.float32)
        for c in "ll_mean ll_std ll_min ll_max p01 p05 p10 p25 p50 p75 p90 p95 p99".split()
    }
    quality = rng.normal(-280, 15, n).astype(np.float32)
    heat = rng.normal(-300, 20, n * cells).astype(np.float32)
    cols: dict[str, Any] = {
        "image_uri": [_uri(int(i), night) for i in idx],
        "etag": [_etag(int(i)) for i in idx],
        "captured_at": [day + timedelta(seconds=int(i * 7919) % 86400) for i in idx],
        "year": [str(day.year)] * n,
        "camera": [str(1 + int(i) % 2) for i in idx],
        "width": np.full(n, 640, np.int32),
        "height": np.full(n, 460, np.int32),
        "model_name": ["bench"] * n,
        "model_version": [VERSION] * n,
        "run_id": [f"night-{night:05d}"] * n,
        "scored_at": [day + timedelta(hours=23)] * n,
        "grid_h": np.full(n, 1, np.int32),
        "grid_w": np.full(n, cells, np.int32),
        "window": np.full(n, 46, np.int32),
        "stride": np.full(n, 8, np.int32),
        "scale": np.full(n, 0.5, np.float32),
        **summary,
        "quality": quality,
        "anomaly_score": -quality,
        "is_anomaly": quality < -310,
        "heatmap": pa.ListArray.from_arrays(
            pa.array(np.arange(0, (n + 1) * cells, cells, dtype=np.int32)), pa.array(heat)
        ),
        "threshold_source": ["global"] * n,
        "heatmap_kind": ["likelihood"] * n,
    }
    return pa.table({f.name: pa.array(cols[f.name], f.type) for f in schema}, schema=schema)


def _errors(first: int, n: int, night: int) -> pa.Table:
    from pipelines import tables

    day = START + timedelta(days=night)
    rows = [
        {
            "image_uri": _uri(i, night).replace(".jpg", "_bad.jpg"),
            "etag": _etag(i),
            "run_id": f"night-{night:05d}",
            "stage": "decode",
            "error_type": "UnidentifiedImageError",
            "message": "cannot identify image file",
            "at": day + timedelta(hours=23),
            "model_version": VERSION,
            "retryable": False,
        }
        for i in range(first, first + n, ERRORS_PER)
    ]
    return pa.Table.from_pylist(rows, schema=tables.SCORING_ERRORS_SCHEMA)


def _run_row(night: int, n: int) -> pa.Table:
    from pipelines import tables

    day = START + timedelta(days=night)
    row = {
        "run_id": f"night-{night:05d}",
        "job": "bench",
        "model_name": "bench",
        "model_version": VERSION,
        "archive": "s3://bench-archive",
        "started_at": day + timedelta(hours=22),
        "finished_at": day + timedelta(hours=23),
        "status": "succeeded",
        "images_listed": n,
        "images_scored": n,
        "images_skipped": 0,
        "images_failed": 0,
        "images_per_s": 50.0,
    }
    return pa.Table.from_pylist([row], schema=tables.RUNS_SCHEMA)


def fill(rows: int, commits: int, cells: int, log: Log, settings: Settings) -> dict[str, Any]:
    """Fill the catalog of ``settings``; one commit per night per table."""
    from pipelines import tables

    cat = tables.load_catalog_(settings)
    tables.ensure_tables(cat, PATH_COLUMNS)
    handles = {t: cat.load_table(tables.qualified(t)) for t in tables.TABLES}
    schemas = {t: tables._with_field_ids(h) for t, h in handles.items()}
    rng = np.random.default_rng(0)
    t0 = last = time.perf_counter()
    for night, first, n in _nights(rows, commits):
        for t, data in (
            (tables.IMAGE_SCORES, _scores(first, n, night, cells, rng)),
            (tables.SCORING_ERRORS, _errors(first, n, night)),
            (tables.RUNS, _run_row(night, n)),
        ):
            if data.num_rows:
                handles[t].append(tables.conform(data, schemas[t]))
        if time.perf_counter() - last > 10:
            last = time.perf_counter()
            log(f"bench: filled {first + n:,} of {rows:,} rows ({night + 1} commits)")
    return {"fill_s": round(time.perf_counter() - t0, 1)}


def _listing(rows: int, commits: int, extra: int, extra_night: int) -> Any:
    """The archive as ``list_archive_columns`` lists an S3 prefix: every scored file, every
    file that failed, and ``extra`` new files of one more night (the same builder)."""
    from pipelines.archive import ListingBuilder

    prefix = "s3://bench-archive/"
    builder = ListingBuilder(prefix, with_etags=True)

    def add(uri: str, i: int, night: int) -> None:
        mtime = START + timedelta(days=night, hours=1)
        ns = int((mtime - datetime(1970, 1, 1)).total_seconds()) * 1_000_000_000
        builder.add(uri.removeprefix(prefix), 150_000, ns, _etag(i))

    for night, first, n in _nights(rows, commits):
        for i in range(first, first + n):
            add(_uri(i, night), i, night)
        for i in range(first, first + n, ERRORS_PER):
            add(_uri(i, night).replace(".jpg", "_bad.jpg"), i, night)
    for i in range(rows + extra_night * 10**7, rows + extra_night * 10**7 + extra):
        add(_uri(i, extra_night), i, extra_night)
    return builder.build()


def _step(step: str, rows: int, commits: int, cells: int, extra_night: int) -> dict[str, Any]:
    """One measurement in this (fresh) process; returns its figures."""
    from pipelines import tables
    from pipelines.incremental import pending

    base = _current_rss_mb()
    out: dict[str, Any] = {"base_mb": round(base)}
    if step == "query":
        from pipelines.sql import check_read_only, connect

        for name, sql in QUERIES.items():  # what `flowscore query` does, less the printing
            t0 = time.perf_counter()
            check_read_only(sql)
            with tempfile.TemporaryDirectory(prefix="flowscore-query-") as spill:
                con = connect(temp_dir=spill)
                con.sql(sql).fetch_arrow_table()
                con.close()
            out[f"{name} s"] = round(time.perf_counter() - t0, 2)
        out["rss_mb"] = round(_rss_mb())
        return out
    extra = round(rows * NEW_FRACTION) if step == "new" else 0
    listed = _listing(rows, commits, extra, extra_night)
    out["listed"] = len(listed)
    out["listing_mb"] = round(_current_rss_mb() - base)
    catalog = tables.load_catalog_()
    t0 = time.perf_counter()
    todo = pending(catalog, VERSION, listed)
    out["diff_s"] = round(time.perf_counter() - t0, 2)
    out["todo"] = len(todo)
    if len(todo) != extra:
        raise RuntimeError(f"bench: the diff found {len(todo)} new files, expected {extra}")
    if step == "new":
        from pipelines.raycluster import ensure_ray
        from pipelines.score import upsert_scores

        ensure_ray(None)
        rng = np.random.default_rng(1)
        first = rows + extra_night * 10**7
        kwargs = tables.catalog_config()
        t0 = time.perf_counter()
        for k in range(0, extra, CHUNK):
            n = min(CHUNK, extra - k)
            upsert_scores(_scores(first + k, n, extra_night, cells, rng), kwargs)
        out["commit_s"] = round(time.perf_counter() - t0, 2)
        out["commits"] = -(-extra // CHUNK)
    out["rss_mb"] = round(_rss_mb())
    return out


def _child(home: Path, step: str, args: list[str]) -> dict[str, Any]:
    env = scratch_env(home, RAY_DATA_DISABLE_PROGRESS_BARS="1")
    cmd = [sys.executable, "-m", "pipelines.usecases.bench_tables", step, *args]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"bench step {step} failed:\n{done.stderr[-3000:]}")
    figures: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return figures


def _table_shape(settings: Settings) -> dict[str, Any]:
    from pipelines import tables

    tbl = tables.load_catalog_(settings).load_table(tables.qualified(tables.IMAGE_SCORES))
    files = [t.file for t in tbl.scan().plan_files()]
    return {
        "data_files": len(files),
        "snapshots": len(tbl.snapshots()),
        "data_gb": round(sum(f.file_size_in_bytes for f in files) / 1e9, 2),
    }


@contextlib.contextmanager
def _workdir(path: str | None) -> Iterator[Path]:
    if path:
        p = Path(path)
        p.mkdir(parents=True, exist_ok=True)
        yield p
        return
    p = Path(tempfile.mkdtemp(prefix="flowscore-bench-tables-"))
    try:
        yield p
    finally:
        shutil.rmtree(p, ignore_errors=True)


def run_table_bench(
    rows: int,
    *,
    commits: int = 365,
    cells: int = 300,
    workdir: str | None = None,
    settings: Settings | None = None,
    log: Log,
) -> dict[str, Any]:
    """Fill (unless ``workdir`` already holds a filled catalog of this size), measure, maintain,
    measure again. See the module docstring."""
    from pipelines.maintenance import MaintainPolicy
    from pipelines.usecases.maintain import maintain_tables

    if commits > rows:
        raise ValueError(f"--commits ({commits}) must not exceed the rows ({rows})")
    args = ["--rows", str(rows), "--commits", str(commits), "--cells", str(cells)]
    result: dict[str, Any] = {"rows": rows, "commits": commits, "heatmap_cells": cells}
    with _workdir(workdir) as root:
        home = root / f"home-{rows}-{commits}-{cells}"
        scratch = (settings or current()).scratch(home)
        if not (home / "filled").exists():
            shutil.rmtree(home, ignore_errors=True)
            log(f"bench: filling a scratch catalog with {rows:,} rows in {commits} commits")
            result.update(fill(rows, commits, cells, log, scratch))
            (home / "filled").write_text("")
        for phase in ("before", "after"):
            if phase == "after":
                log("bench: flowscore maintain (keeping the last 30 snapshots)")
                t0 = time.perf_counter()
                maintain_tables(
                    ["image_scores", "scoring_errors", "runs"],
                    MaintainPolicy(retain_s=0, keep_last=30),
                    log,
                    check=lambda: None,
                    settings=scratch,
                )
                result["maintain_s"] = round(time.perf_counter() - t0, 1)
            result[f"shape_{phase}"] = _table_shape(scratch)
            night = commits + (0 if phase == "before" else 1)
            for step in ("idle", "new", "query"):
                log(f"bench: {step} ({phase} maintain) ...")
                figures = _child(home, step, [*args, "--night", str(night)])
                result[f"{step}_{phase}"] = figures
                log(f"bench: {step} ({phase}): {figures}")
    return result


def _main(argv: list[str]) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m pipelines.usecases.bench_tables")
    p.add_argument("step", choices=["idle", "new", "query"])
    p.add_argument("--rows", type=int, required=True)
    p.add_argument("--commits", type=int, required=True)
    p.add_argument("--cells", type=int, required=True)
    p.add_argument("--night", type=int, required=True)
    a = p.parse_args(argv)
    figures = _step(a.step, a.rows, a.commits, a.cells, a.night)
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
