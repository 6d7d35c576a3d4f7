"""The report's data: which rows a report is about and what it reads of them, in SQL over the
read-only DuckDB views of :mod:`pipelines.sql` (the HTML, pictures and printing are
``jobs/report.py``'s).

A page is about one run or every run of a job in a period (:class:`Run`); :func:`set_scope`
makes the temp views ``scope_scores`` and ``scope_errors`` of its rows, which every other read
here uses. A bad choice (no rows, an unknown run id) is a :class:`ReportUsageError` whose
message lists what there is.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from pipelines.log import Log
from pipelines.sql import quote_ident

if TYPE_CHECKING:
    import duckdb
    import pyarrow as pa

    from pipelines.settings import Settings

__all__ = [
    "ERROR_EXAMPLES",
    "daily_counts",
    "distinct_values",
    "error_groups",
    "main_model",
    "CLIP_QUANTILES",
    "CLIP_SAMPLE_IMAGES",
    "MAX_GROUPS",
    "Period",
    "RECENT_RUNS",
    "ROW_COLUMNS",
    "ReportUsageError",
    "Run",
    "arrow_table",
    "choose_period",
    "choose_run",
    "dicts",
    "fmt_day",
    "fmt_ts",
    "has_gradient_maps",
    "heatmaps",
    "jobs_line",
    "numpy_column",
    "path_columns",
    "path_totals",
    "recent_runs",
    "registry_clip",
    "run_clip",
    "run_info",
    "select_columns",
    "set_scope",
    "top_rows",
]


RECENT_RUNS = 10  # runs listed in a usage error


CLIP_SAMPLE_IMAGES = 500  # images whose windows give the fallback heatmap clip


CLIP_QUANTILES = (0.001, 0.05)


MAX_GROUPS = 30  # values per path column in the box plots
ERROR_EXAMPLES = 3  # example files per stage/type group of errors


class ReportUsageError(ValueError):
    """Bad input for a report: empty tables, an unknown run id, a run with no rows. The
    message says what and lists the recent runs."""


def fmt_ts(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, dt.datetime):
        return value.strftime("%Y-%m-%d %H:%M:%S") + " UTC"
    return str(value)


def fmt_day(value: dt.datetime) -> str:
    return f"{value:%Y-%m-%d %H:%M}" if (value.hour or value.minute) else f"{value:%Y-%m-%d}"


@dataclass
class Period:
    """The runs of one job in a period (``--job NAME --since 30d``)."""

    job: str
    start: dt.datetime
    end: dt.datetime
    runs: list[dict[str, Any]]  # their ``runs`` rows, oldest first


@dataclass
class Run:
    """What the page is about: one run, or every run of a job in a period. The rows in
    scope are the DuckDB views ``scope_scores`` and ``scope_errors`` (:func:`set_scope`)."""

    run_id: str  # the run; empty for a period
    info: dict[str, Any] | None  # its ``runs`` row, None when it has none (or a period)
    rows: int  # rows in scope in image_scores
    errors: int  # rows in scope in scoring_errors
    period: Period | None = None

    @property
    def title(self) -> str:
        if self.period is None:
            return f"run {self.run_id}"
        p = self.period
        return f"job {p.job}, {fmt_day(p.start)} to {fmt_day(p.end)}"


def recent_runs(con: duckdb.DuckDBPyConnection) -> str:
    """The most recent runs with their row counts, as one line for a usage error."""
    rows = con.execute(
        f"""
        with s as (select run_id, count(*) as n from image_scores group by run_id),
             r as (select run_id, started_at, status from runs
                   union all
                   select run_id, null, null from s where run_id not in (select run_id
                   from runs where run_id is not null))
        select r.run_id, r.started_at, r.status, coalesce(s.n, 0)
        from r left join s using (run_id)
        order by r.started_at desc nulls last, r.run_id
        limit {RECENT_RUNS}
        """
    ).fetchall()
    if not rows:
        return "the tables hold no runs yet; score an archive first (`flowscore score ...`)"
    parts = [
        f"{rid} ({fmt_ts(started)}, {status or 'no runs row'}, {n} rows)"
        for rid, started, status, n in rows
    ]
    return "recent runs: " + "; ".join(parts)


def run_info(con: duckdb.DuckDBPyConnection, run_id: str) -> dict[str, Any] | None:
    res = con.execute("select * from runs where run_id = ? limit 1", [run_id])
    names = [d[0] for d in res.description]
    row = res.fetchone()
    return dict(zip(names, row, strict=True)) if row else None


def set_scope(con: duckdb.DuckDBPyConnection, run_ids: Sequence[str]) -> tuple[int, int]:
    """Views ``scope_scores`` / ``scope_errors``: the rows of these runs; their counts."""
    con.execute("create or replace temp table _scope_runs (run_id varchar)")
    if run_ids:
        con.executemany("insert into _scope_runs values (?)", [[r] for r in run_ids])
    for view, table in (("scope_scores", "image_scores"), ("scope_errors", "scoring_errors")):
        con.execute(
            f"create or replace temp view {view} as select * from {table} "
            "where run_id in (select run_id from _scope_runs)"
        )
    (rows,) = con.execute("select count(*) from scope_scores").fetchone() or (0,)
    (errors,) = con.execute("select count(*) from scope_errors").fetchone() or (0,)
    return int(rows), int(errors)


def jobs_line(con: duckdb.DuckDBPyConnection) -> str:
    rows = con.execute(
        "select job, count(*), max(started_at) from runs where job is not null "
        "group by job order by 3 desc nulls last limit 10"
    ).fetchall()
    if not rows:
        return "the runs table names no job yet (flowscore run JOB.toml writes them)"
    return "jobs: " + "; ".join(f"{j} ({n} runs, last {fmt_ts(t)})" for j, n, t in rows)


def choose_period(
    con: duckdb.DuckDBPyConnection, job: str, start: dt.datetime, end: dt.datetime
) -> Run:
    res = con.execute(
        "select * from runs where job = ? and started_at >= ? and started_at < ? "
        "order by started_at, run_id",
        [job, start, end],
    )
    runs = dicts(res)
    if not runs:
        raise ReportUsageError(
            f"job {job!r} has no runs between {fmt_day(start)} and {fmt_day(end)} (UTC); "
            f"{jobs_line(con)}"
        )
    rows, errors = set_scope(con, [str(r["run_id"]) for r in runs])
    period = Period(job, start, end, runs)
    return Run(run_id="", info=None, rows=rows, errors=errors, period=period)


def choose_run(con: duckdb.DuckDBPyConnection, run_id: str | None) -> Run:
    if run_id is not None:
        run_id = run_id.strip()
        if not run_id:
            raise ReportUsageError(f"--run is empty; {recent_runs(con)}")
    else:
        found = con.execute(
            """
            select r.run_id from runs r
            where exists (select 1 from image_scores s where s.run_id = r.run_id)
            order by r.started_at desc nulls last, r.run_id desc limit 1
            """
        ).fetchone()
        if found is None:  # rows written without a runs row: the latest scored
            found = con.execute(
                "select run_id from image_scores where run_id is not null "
                "group by run_id order by max(scored_at) desc nulls last limit 1"
            ).fetchone()
        if found is None:
            raise ReportUsageError(
                "no scored images in the tables; score an archive first "
                f"(`flowscore score --archive URI --model URI`); {recent_runs(con)}"
            )
        run_id = str(found[0])
    info = run_info(con, run_id)
    rows, errors = set_scope(con, [run_id])
    if info is None and rows == 0 and errors == 0:
        raise ReportUsageError(f"unknown run id {run_id!r}; {recent_runs(con)}")
    if rows == 0 and errors == 0:
        raise ReportUsageError(
            f"run {run_id!r} has no rows left in image_scores or scoring_errors (a later run "
            f"may have rescored its images); {recent_runs(con)}"
        )
    return Run(run_id=run_id, info=info, rows=rows, errors=errors)


def path_columns(con: duckdb.DuckDBPyConnection) -> list[str]:
    """Columns of ``image_scores`` that are not DESIGN's fixed columns, in table order."""
    from pipelines.tables import IMAGE_SCORES_FIXED_HEAD, IMAGE_SCORES_FIXED_TAIL

    fixed = {f.name for f in (*IMAGE_SCORES_FIXED_HEAD, *IMAGE_SCORES_FIXED_TAIL)}
    names = [r[0] for r in con.execute("describe image_scores").fetchall()]
    return [n for n in names if n not in fixed]


ROW_COLUMNS = (
    "image_uri etag captured_at width height model_name model_version grid_h grid_w window "
    "stride scale quality anomaly_score is_anomaly"
).split()


def select_columns(path_columns: Sequence[str], heatmap: bool) -> str:
    cols = [quote_ident(c) for c in (*ROW_COLUMNS[:3], *path_columns, *ROW_COLUMNS[3:])]
    cols.append("heatmap" if heatmap else "heatmap is not null as __has_heatmap")
    return ", ".join(cols)


def dicts(res: duckdb.DuckDBPyConnection) -> list[dict[str, Any]]:
    names = [d[0] for d in res.description]
    return [dict(zip(names, r, strict=True)) for r in res.fetchall()]


def arrow_table(con: duckdb.DuckDBPyConnection, sql: str, params: list[Any]) -> pa.Table:
    """The result of ``sql`` as an Arrow table (DuckDB 2.x ``to_arrow_table``, 1.x
    ``arrow``), through a relation: no extra copy of the rows."""
    rel = con.sql(sql, params=params)
    fn = getattr(rel, "to_arrow_table", None) or rel.arrow
    return fn()


def numpy_column(table: pa.Table, name: str, dtype: Any = float) -> np.ndarray:
    col = table.column(name)
    if dtype is float:
        return np.asarray(col.to_numpy(zero_copy_only=False), dtype=float)
    return np.asarray(col.to_numpy(zero_copy_only=False))


def heatmaps(
    con: duckdb.DuckDBPyConnection, keys: Sequence[tuple[str, str]]
) -> dict[tuple[str, str], list[float] | None]:
    if not keys:
        return {}
    uris = sorted({u for u, _ in keys})
    res = con.execute(
        "select image_uri, etag, heatmap from scope_scores where list_contains(?, image_uri)",
        [uris],
    ).fetchall()
    want = set(keys)
    return {(u, e): h for u, e, h in res if (u, e) in want}


def top_rows(
    con: duckdb.DuckDBPyConnection, path_columns: Sequence[str], top: int
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    sel = select_columns(path_columns, heatmap=True)
    base = f"select {sel} from scope_scores where isfinite(anomaly_score)"
    worst = dicts(con.execute(f"{base} order by anomaly_score desc, image_uri limit ?", [top]))
    seen = {(r["image_uri"], r["etag"]) for r in worst}
    best = dicts(
        con.execute(f"{base} order by anomaly_score asc, image_uri limit ?", [top + len(seen)])
    )
    best = [r for r in best if (r["image_uri"], r["etag"]) not in seen][:top]
    return worst, best


def path_totals(con: duckdb.DuckDBPyConnection, col: str) -> list[dict[str, Any]]:
    """A path column's most frequent values over the period: images, flagged, median quality."""
    table = con.execute(
        f"""
        select {quote_ident(col)} as value, count(*) as n,
               count(*) filter (where is_anomaly) as flagged, median(quality) as q
        from scope_scores group by 1 order by n desc limit {MAX_GROUPS}
        """
    ).fetchall()
    return [{"value": v, "images": n, "flagged": f, "median_quality": q} for v, n, f, q in table]


def registry_clip(
    model_name: str, model_version: str, log: Log, settings: Settings | None = None
) -> tuple[float, float] | None:
    """The model's ``heatmap_clip`` from the registry, or None (never raises)."""
    if not model_name or not model_version or model_version.startswith("sha-"):
        return None  # a local bundle: not in the registry
    uri = f"models:/{model_name}/{model_version}"
    try:
        from flowcore.bundle import read_meta
        from pipelines.tracking import resolve_model

        clip = read_meta(resolve_model(uri, settings=settings).path).get("heatmap_clip")
        if clip is None:
            return None
        lo, hi = float(clip[0]), float(clip[1])
        if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
            return None
        return lo, hi
    except Exception as e:  # noqa: BLE001 - any failure: fall back to the run's quantiles
        first = (str(e).strip().splitlines() or [""])[0][:200]
        log(f"report: heatmap clip of {uri} not available ({type(e).__name__}: {first})")
        return None


def has_gradient_maps(con: duckdb.DuckDBPyConnection) -> bool:
    """Whether rows in scope hold gradient maps (``heatmap_kind``; a table from before the
    column has none), whose values are not log-likelihoods: the model's clip does not fit."""
    cols = {r[0] for r in con.execute("describe scope_scores").fetchall()}
    if "heatmap_kind" not in cols:
        return False
    row = con.execute(
        "select count(*) from scope_scores where heatmap_kind = 'gradient'"
    ).fetchone()
    return bool(row and row[0])


def run_clip(con: duckdb.DuckDBPyConnection) -> tuple[float, float] | None:
    """(0.1 %, 5 %) quantiles of the window log-likelihoods of up to 500 of the images in
    scope (a repeatable reservoir sample)."""
    row = con.execute(
        f"""
        select quantile_cont(v, [{CLIP_QUANTILES[0]}, {CLIP_QUANTILES[1]}]) from (
            select unnest(heatmap) as v from (
                select heatmap from scope_scores where heatmap is not null
            ) using sample reservoir({CLIP_SAMPLE_IMAGES} rows) repeatable (7)
        ) where isfinite(v)
        """
    ).fetchone()
    if not row or not row[0] or row[0][0] is None:
        return None
    lo, hi = float(row[0][0]), float(row[0][1])
    return (lo, hi) if hi > lo else (lo, lo + 1e-3)


def daily_counts(
    con: duckdb.DuckDBPyConnection, column: str | None = None, value: Any = None
) -> dict[Any, tuple[int, int, float | None]]:
    """Per scoring day of the rows in scope (of those whose path ``column`` is ``value``,
    when given): day -> (images, flagged, median quality)."""
    where, params = ("true", []) if column is None else (f"{quote_ident(column)} = ?", [value])
    res = con.execute(
        f"""
        select cast(scored_at as date) as day, count(*) as n,
               count(*) filter (where is_anomaly) as flagged, median(quality) as q
        from scope_scores where {where} and scored_at is not null group by 1 order by 1
        """,
        params,
    ).fetchall()
    return {d: (n, f, q) for d, n, f, q in res}


def distinct_values(con: duckdb.DuckDBPyConnection, column: str) -> list[Any]:
    """The values of path ``column`` among the rows in scope (NULL left out)."""
    q = quote_ident(column)
    sql = f"select distinct {q} from scope_scores where {q} is not null"
    return [v for (v,) in con.execute(sql).fetchall()]


def error_groups(con: duckdb.DuckDBPyConnection) -> list[dict[str, Any]]:
    """The errors in scope by stage and type, most frequent first: ``stage``, ``error_type``,
    ``n`` and ``examples``, up to :data:`ERROR_EXAMPLES` (image URI, message) pairs."""
    groups = dicts(
        con.execute(
            """
            select coalesce(stage, '?') as stage, coalesce(error_type, '?') as error_type,
                   count(*) as n
            from scope_errors group by all order by n desc, 1, 2
            """
        )
    )
    examples = con.execute(
        f"""
        select stage, error_type, image_uri, message from (
            select coalesce(stage, '?') as stage, coalesce(error_type, '?') as error_type,
                   image_uri, message,
                   row_number() over (partition by coalesce(stage, '?'),
                                      coalesce(error_type, '?') order by image_uri) as k
            from scope_errors
        ) where k <= {ERROR_EXAMPLES} order by stage, error_type, k
        """
    ).fetchall()
    by_group: dict[tuple[str, str], list[tuple[str, str]]] = {}
    for stage, etype, uri, msg in examples:
        by_group.setdefault((stage, etype), []).append((uri, msg or ""))
    for g in groups:
        g["examples"] = by_group.get((g["stage"], g["error_type"]), [])
    return groups


def main_model(con: duckdb.DuckDBPyConnection) -> tuple[Any, Any]:
    """(model_name, model_version) of most rows in scope; (None, None) when there are none."""
    row = con.execute(
        "select model_name, model_version from scope_scores "
        "group by all order by count(*) desc limit 1"
    ).fetchone()
    return (row[0], row[1]) if row else (None, None)
