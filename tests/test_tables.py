"""The result tables (real pyiceberg SQL catalog on SQLite, real Parquet files) and
``flowscore query`` (real DuckDB). Every test gets a fresh ``FLOWSCORE_HOME``."""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from jobs.query import run_query
from pipelines import tables as T
from pipelines.sql import QueryRefused, check_read_only, connect

# DESIGN.md, "Tables": written out here, independently of pipelines/tables.py
SUMMARY = "ll_mean ll_std ll_min ll_max p01 p05 p10 p25 p50 p75 p90 p95 p99 quality anomaly_score"
TS = pa.timestamp("us")
SCORES_HEAD = [("image_uri", pa.string()), ("etag", pa.string()), ("captured_at", TS)]
SCORES_TAIL = [
    ("width", pa.int32()),
    ("height", pa.int32()),
    ("model_name", pa.string()),
    ("model_version", pa.string()),
    ("run_id", pa.string()),
    ("scored_at", TS),
    ("grid_h", pa.int32()),
    ("grid_w", pa.int32()),
    ("window", pa.int32()),
    ("stride", pa.int32()),
    ("scale", pa.float32()),
    *((c, pa.float32()) for c in SUMMARY.split()),
    ("is_anomaly", pa.bool_()),
    ("heatmap", pa.list_(pa.float32())),
    # beyond DESIGN.md (the detection issue): which threshold decided is_anomaly
    ("threshold_source", pa.string()),
    # what the heatmap holds: likelihood or gradient (score --heatmap)
    ("heatmap_kind", pa.string()),
]
ERRORS_COLS = [
    *((c, pa.string()) for c in ("image_uri", "etag", "run_id", "stage", "error_type", "message")),
    ("at", TS),
    ("model_version", pa.string()),  # beyond DESIGN's columns: errors are per model version
    ("retryable", pa.bool_()),
]
RUNS_COLS = [
    *((c, pa.string()) for c in ("run_id", "job", "model_name", "model_version", "archive")),
    ("started_at", TS),
    ("finished_at", TS),
    ("status", pa.string()),
    *((c, pa.int64()) for c in ("images_listed", "images_scored", "images_skipped")),
    ("images_failed", pa.int64()),
    ("images_per_s", pa.float64()),
    ("mlflow_run_id", pa.string()),  # beyond DESIGN: null when MLflow was unavailable
    ("warnings", pa.string()),
]
KEY = ["image_uri", "etag", "model_version"]
CAPTURED = dt.datetime(2017, 5, 1, 12, 30, 15, 250000)


@pytest.fixture
def home(flowscore_home, monkeypatch):
    monkeypatch.delenv("FLOWSCORE_CATALOG_URI", raising=False)
    monkeypatch.delenv("FLOWSCORE_WAREHOUSE", raising=False)
    return flowscore_home


def cols(schema: pa.Schema) -> list[tuple[str, pa.DataType]]:
    """(name, type) with list element names normalised (``item`` vs ``element``)."""
    out = []
    for f in schema:
        t = f.type
        if pa.types.is_list(t) or pa.types.is_large_list(t):
            t = pa.list_(t.value_type)
        elif pa.types.is_large_string(t):
            t = pa.string()
        out.append((f.name, t))
    return out


def score_rows(n, start=0, version="1", path=None, quality0=0.0, heat=True):
    path = path if path is not None else {"year": "2017"}
    schema = T.image_scores_arrow_schema(list(path))
    rows = []
    for i in range(start, start + n):
        row = {
            "image_uri": f"file:///arch/{i:04d}.png",
            "etag": f"e{i}",
            "captured_at": CAPTURED,
            "width": 64,
            "height": 48,
            "model_name": "grain",
            "model_version": version,
            "run_id": "r1",
            "scored_at": dt.datetime(2026, 1, 2, 3, 4, 5),
            "grid_h": 2,
            "grid_w": 3,
            "window": 8,
            "stride": 4,
            "scale": 0.25,
            "quality": quality0 + i * 0.1,
            "anomaly_score": float(i),
            "is_anomaly": i % 3 == 0,
            "heatmap": [0.1 * k - i for k in range(6)] if heat else None,
            **path,
        }
        rows.append(row)
    return pa.Table.from_pylist(rows, schema=schema)


def query(sql, fmt="table"):
    out, err = io.StringIO(), io.StringIO()
    rc = run_query(sql, fmt, out=out, err=err)
    return rc, out.getvalue(), err.getvalue()


def query_json(sql):
    rc, out, err = query(sql, "json")
    assert rc == 0, err
    return json.loads(out)


def filled(path=None, n=6):
    cat = T.load_catalog_()
    T.ensure_tables(cat, list(path if path is not None else {"year": "2017"}))
    T.upsert(cat, T.IMAGE_SCORES, score_rows(n, path=path), KEY)
    return cat


# ---------------------------------------------------------------- catalog and schemas


def test_catalog_config_defaults_and_s3(home, monkeypatch):
    cfg = T.catalog_config()
    assert cfg == {
        "name": "flowscore",
        "type": "sql",
        "uri": f"sqlite:///{home}/catalog.db",
        "warehouse": f"file://{home}/warehouse",
    }
    monkeypatch.setenv("FLOWSCORE_WAREHOUSE", "s3://bucket/wh")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "very-secret")
    cfg = T.catalog_config()
    assert cfg["warehouse"] == "s3://bucket/wh"
    assert cfg["s3.endpoint"] == "http://127.0.0.1:9" and cfg["s3.region"] == "us-east-1"
    assert all(isinstance(v, str) for v in cfg.values())
    assert "very-secret" not in json.dumps(cfg)  # credentials stay in the AWS chain


def test_unopenable_catalog_is_one_clear_error(home, monkeypatch):
    monkeypatch.setenv("FLOWSCORE_CATALOG_URI", "sqlite:////nonexistent-dir/x/catalog.db")
    with pytest.raises(T.TablesError, match="sqlite:////nonexistent-dir/x/catalog.db"):
        T.load_catalog_()
    monkeypatch.setenv("FLOWSCORE_CATALOG_URI", "nosuchdb://bob:hunter2@host/db")
    with pytest.raises(T.TablesError) as e:
        T.load_catalog_()
    assert "nosuchdb://***@host/db" in str(e.value) and "hunter2" not in str(e.value)
    rc, _, err = query("select 1")
    assert rc == 2 and "nosuchdb://" in err


def test_ensure_tables_creates_design_schemas(home):
    cat = T.load_catalog_()
    T.ensure_tables(cat, ["year", "camera"])
    T.ensure_tables(cat, ["year", "camera"])  # idempotent
    expect = {
        "image_scores": SCORES_HEAD
        + [("year", pa.string()), ("camera", pa.string())]
        + SCORES_TAIL,
        "scoring_errors": ERRORS_COLS,
        "runs": RUNS_COLS,
    }
    keys = {
        "image_scores": {"image_uri", "etag", "model_version"},
        "scoring_errors": {"image_uri", "etag", "model_version"},
        "runs": {"run_id"},
    }
    for name in T.TABLES:
        tbl = cat.load_table(f"flowscore.{name}")
        assert cols(T.arrow_schema_of(tbl)) == expect[name], name
        schema = tbl.schema()
        ids = {schema.find_column_name(i) for i in schema.identifier_field_ids}
        assert ids == keys[name]
        assert all(schema.find_field(k).required for k in keys[name])
        assert tbl.current_snapshot() is not None  # Ray's UPSERT needs a main branch
    # the module's Arrow schemas are the same
    assert cols(T.image_scores_arrow_schema(["year", "camera"])) == expect["image_scores"]
    assert cols(T.SCORING_ERRORS_SCHEMA) == ERRORS_COLS
    assert cols(T.RUNS_SCHEMA) == RUNS_COLS
    spec = cat.load_table("flowscore.image_scores").spec()
    assert [f.name for f in spec.fields] == ["model_version"]


def test_path_column_may_not_shadow_a_column(home):
    with pytest.raises(T.TablesError, match="model_version"):
        T.image_scores_arrow_schema(["year", "model_version"])


def test_new_path_column_by_schema_evolution(home):
    cat = filled({"year": "2017"}, n=3)
    T.ensure_tables(cat, ["camera", "year"])
    tbl = cat.load_table("flowscore.image_scores")
    names = [f.name for f in tbl.schema().fields]
    assert names[:5] == ["image_uri", "etag", "captured_at", "year", "camera"]
    assert T.path_columns_of(tbl) == ["year", "camera"]
    T.upsert(
        cat, T.IMAGE_SCORES, score_rows(2, start=10, path={"year": "2018", "camera": "2"}), KEY
    )
    old = tbl.refresh().scan().to_arrow().sort_by("image_uri").to_pylist()
    assert [(r["year"], r["camera"]) for r in old] == [("2017", None)] * 3 + [("2018", "2")] * 2
    rows = query_json("select year, camera, count(*) n from image_scores group by all order by 1")
    assert rows == [
        {"year": "2017", "camera": None, "n": 3},
        {"year": "2018", "camera": "2", "n": 2},
    ]


# ---------------------------------------------------------------- writes


def test_upsert_twice_leaves_no_duplicate_keys(home):
    cat = filled(n=6)
    T.upsert(cat, T.IMAGE_SCORES, score_rows(6, start=3, quality0=100.0, heat=False), KEY)
    T.upsert(cat, T.IMAGE_SCORES, score_rows(2, start=0, version="2"), KEY)
    (r,) = query_json(
        "select count(*) n, count(distinct (image_uri, etag, model_version)) d from image_scores"
    )
    assert r == {"n": 11, "d": 11}
    got = query_json(
        "select image_uri, quality, heatmap from image_scores where model_version = '1' "
        "order by image_uri"
    )
    assert [g["quality"] for g in got] == pytest.approx(
        [0, 0.1, 0.2, 100.3, 100.4, 100.5, 100.6, 100.7, 100.8], rel=1e-6
    )
    assert [g["heatmap"] is None for g in got] == [False] * 3 + [True] * 6
    tbl = cat.load_table("flowscore.image_scores")
    assert not T.has_delete_files(tbl)  # copy-on-write: data files are the table
    assert T.existing_keys(cat, "2") == {
        ("file:///arch/0000.png", "e0"),
        ("file:///arch/0001.png", "e1"),
    }
    assert T.existing_keys(cat, "1", {"file:///arch/0004.png", "nope"}) == {
        ("file:///arch/0004.png", "e4")
    }
    assert T.existing_keys(cat, "9") == set()


def test_runs_rows_and_error_keys(home):
    cat = T.load_catalog_()
    T.ensure_tables(cat, [])
    start = dt.datetime(2026, 3, 1, 10, 0, 0)
    T.record_run_start(
        cat,
        run_id="r1",
        job="nightly",
        model_name="grain",
        model_version="3",
        archive="s3://a/b",
        started_at=start,
        images_listed=10,
    )
    (row,) = query_json("select * from runs")
    assert row["status"] == "running" and row["finished_at"] is None
    T.record_run_end(
        cat,
        run_id="r1",
        finished_at=start + dt.timedelta(seconds=4),
        status="succeeded",
        images_scored=7,
        images_skipped=2,
        images_failed=1,
        images_per_s=2.0,
    )
    (row,) = query_json("select * from runs")
    assert row == {
        "run_id": "r1",
        "job": "nightly",
        "model_name": "grain",
        "model_version": "3",
        "archive": "s3://a/b",
        "started_at": "2026-03-01T10:00:00",
        "finished_at": "2026-03-01T10:00:04",
        "status": "succeeded",
        "images_listed": 10,
        "images_scored": 7,
        "images_skipped": 2,
        "images_failed": 1,
        "images_per_s": 2.0,
        "mlflow_run_id": None,
        "warnings": None,
    }
    errors = pa.Table.from_pylist(
        [
            {
                "image_uri": "u1",
                "etag": "e",
                "run_id": "r1",
                "stage": "decode",
                "error_type": "OSError",
                "message": "truncated",
                "at": start,
                "model_version": "1",
                "retryable": False,
            }
        ],
        schema=T.SCORING_ERRORS_SCHEMA,
    )
    T.upsert(cat, T.SCORING_ERRORS, errors, ["image_uri", "etag", "model_version"])
    T.upsert(cat, T.SCORING_ERRORS, errors, ["image_uri", "etag", "model_version"])
    assert T.error_keys(cat) == {("u1", "e")}
    assert T.error_keys(cat, run_id="other") == set()
    assert query_json("select count(*) n from scoring_errors") == [{"n": 1}]


def test_runs_table_of_an_older_flowscore_gets_the_new_columns(home):
    """A ``runs`` table without ``mlflow_run_id``/``warnings`` (as an older flowscore made
    it) gets them by schema evolution; its old rows read them as null."""
    cat = T.load_catalog_()
    old_schema = pa.schema(
        [f for f in T.RUNS_SCHEMA if f.name not in ("mlflow_run_id", "warnings")]
    )
    T._create_table(cat, T.RUNS, old_schema)
    old = {"run_id": "old", "job": "j", "status": "succeeded", "images_scored": 3}
    cat.load_table("flowscore.runs").append(pa.Table.from_pylist([old], schema=old_schema))
    T.ensure_tables(cat, [])
    assert cols(T.arrow_schema_of(cat.load_table("flowscore.runs"))) == RUNS_COLS
    T.ensure_tables(cat, [])  # idempotent: no second evolution
    T.record_run_start(
        cat,
        run_id="new",
        job="j",
        model_name="m",
        model_version="1",
        archive="a",
        started_at=dt.datetime(2026, 3, 1),
        mlflow_run_id="abc",
        warnings="w1",
    )
    T.record_run_end(
        cat,
        run_id="new",
        finished_at=dt.datetime(2026, 3, 1, 0, 1),
        status="succeeded",
        images_scored=1,
        images_skipped=0,
        images_failed=0,
        images_per_s=1.0,
        warnings="w1; w2",
    )
    rows = query_json("select run_id, mlflow_run_id, warnings from runs order by run_id")
    assert rows == [
        {"run_id": "new", "mlflow_run_id": "abc", "warnings": "w1; w2"},
        {"run_id": "old", "mlflow_run_id": None, "warnings": None},
    ]


# ---------------------------------------------------------------- query


def test_query_fresh_home_counts_zero(home):
    assert query_json("select count(*) n from image_scores") == [{"n": 0}]
    assert query_json("select count(*) n from scoring_errors") == [{"n": 0}]
    rc, out, _ = query("select count(*) as n from runs")
    assert rc == 0 and out.splitlines()[-1] == "(1 row)" and " 0" in out
    names = [r["column_name"] for r in query_json("describe image_scores")]
    assert names == [c for c, _ in SCORES_HEAD + SCORES_TAIL]


def test_query_formats_round_trip(home):
    cat = filled(n=6)
    src = cat.load_table("flowscore.image_scores").scan().to_arrow().sort_by("image_uri")
    want = src.select(["image_uri", "year", "quality", "heatmap", "captured_at", "is_anomaly"])
    sql = (
        "select image_uri, year, quality, heatmap, captured_at, is_anomaly from image_scores "
        "order by image_uri"
    )

    rc, out, err = query(sql, "json")
    assert rc == 0, err
    rows = json.loads(out)
    assert isinstance(rows, list) and len(rows) == 6
    for got, exp in zip(rows, want.to_pylist(), strict=True):
        assert got["image_uri"] == exp["image_uri"] and got["year"] == "2017"
        assert np.float32(got["quality"]) == np.float32(exp["quality"])
        assert np.array_equal(np.float32(got["heatmap"]), np.float32(exp["heatmap"]))
        assert got["captured_at"] == CAPTURED.isoformat() == exp["captured_at"].isoformat()
        assert got["is_anomaly"] is exp["is_anomaly"]
    assert '"quality": 0.1,' in out  # float32 printed with the fewest digits

    rc, out, err = query(sql, "csv")
    assert rc == 0, err
    recs = list(csv.DictReader(io.StringIO(out)))
    assert list(recs[0]) == want.column_names and len(recs) == 6
    for got, exp in zip(recs, want.to_pylist(), strict=True):
        assert got["image_uri"] == exp["image_uri"]
        assert np.float32(float(got["quality"])) == np.float32(exp["quality"])
        assert np.array_equal(np.float32(json.loads(got["heatmap"])), np.float32(exp["heatmap"]))
        assert dt.datetime.fromisoformat(got["captured_at"]) == CAPTURED
        assert got["is_anomaly"] == ("true" if exp["is_anomaly"] else "false")

    rc, out, _ = query("select image_uri, quality from image_scores order by 1 limit 2")
    lines = out.splitlines()
    assert rc == 0 and lines[0].split("|")[0].strip() == "image_uri"
    assert set(lines[1]) <= {"-", "+"} and lines[-1] == "(2 rows)"
    assert "file:///arch/0001.png" in lines[3] and lines[3].endswith("0.1")


def test_query_filters_on_path_column_read_parquet(home):
    cat = filled({"year": "2017", "camera": "1"}, n=4)
    T.upsert(
        cat,
        T.IMAGE_SCORES,
        score_rows(3, start=20, version="7", path={"year": "2018", "camera": "2"}),
        KEY,
    )
    assert query_json("select count(*) n from image_scores where year = '2018'") == [{"n": 3}]
    assert query_json(
        "select model_version, typeof(model_version) t, count(*) n from image_scores "
        "group by all order by 1"
    ) == [
        {"model_version": "1", "t": "VARCHAR", "n": 4},
        {"model_version": "7", "t": "VARCHAR", "n": 3},
    ]  # not a hive-partition BIGINT
    con = connect(cat)
    (view_sql,) = con.execute(
        "select sql from duckdb_views() where view_name = 'image_scores'"
    ).fetchone()
    con.close()
    assert "read_parquet" in view_sql  # local warehouse: DuckDB scans the Parquet files


def test_query_bad_sql_is_exit_2_with_duckdbs_message(home):
    filled(n=2)
    rc, out, err = query("select no_such_column from image_scores")
    assert rc == 2 and out == "" and "Binder Error" in err and "no_such_column" in err
    rc, _, err = query("selec 1")
    assert rc == 2 and "Parser Error" in err
    rc, _, err = query("select 1", fmt="xml")
    assert rc == 2 and "--format" in err


WRITES = [
    "delete from image_scores",
    "create table x as select * from image_scores",
    "insert into image_scores select * from image_scores",
    "update image_scores set quality = 0",
    "drop view image_scores",
    "copy image_scores to 'out.csv'",
    "select 1; delete from image_scores",
    "explain analyze delete from image_scores",
    "attach 'other.db'",
    "pragma version",
    "set threads = 1",
]


def test_query_refuses_writes(home):
    cat = filled(n=3)
    before = cat.load_table("flowscore.image_scores").current_snapshot().snapshot_id
    for sql in WRITES:
        rc, out, err = query(sql)
        assert rc == 2 and out == "" and "flowscore: error:" in err, sql
    assert cat.load_table("flowscore.image_scores").current_snapshot().snapshot_id == before
    assert query_json("select count(*) n from image_scores") == [{"n": 3}]


@pytest.mark.parametrize(
    "sql",
    [
        "select 1",
        "with a as (select 1) select * from a",
        "from image_scores",
        "describe image_scores",
        "show tables",
        "summarize runs",
        "explain select * from image_scores where quality > 1",
        "EXPLAIN ANALYZE select count(*) from runs",
    ],
)
def test_read_statements_allowed(sql):
    check_read_only(sql)


@pytest.mark.parametrize("sql", ["", "insert into t values (1)", "explain copy t to 'x'"])
def test_read_only_check_refuses(sql):
    with pytest.raises(QueryRefused):
        check_read_only(sql)


def test_locked_connection_reads_no_other_files(home, tmp_path):
    filled(n=1)
    (tmp_path / "secret.csv").write_text("a\n1\n")
    rc, _, err = query(f"select * from read_csv('{tmp_path / 'secret.csv'}')")
    assert rc == 2 and "Permission Error" in err


def test_superseded_files_and_spill_folders_are_out_of_reach(home, tmp_path, monkeypatch):
    """Only the current snapshot's data files are readable: a file of an older snapshot, in
    the very same folder, is refused. DuckDB spills into a private folder, not ``.tmp``
    under the working directory, and the folder is gone afterwards."""
    cat = filled(n=3)
    old = T.snapshot_files(cat.load_table("flowscore.image_scores"))
    rows = score_rows(3)
    rows = rows.set_column(
        rows.schema.get_field_index("quality"), "quality", pa.array([9.5] * 3, pa.float32())
    )
    T.upsert(cat, T.IMAGE_SCORES, rows, KEY)  # changed rows: rewritten into new files
    new = T.snapshot_files(cat.load_table("flowscore.image_scores"))
    stale = [T.local_path(f) for f in old if f not in new]
    assert stale and Path(stale[0]).exists()
    assert any(Path(T.local_path(f)).parent == Path(stale[0]).parent for f in new)
    rc, _, err = query(f"select count(*) from read_parquet('{stale[0]}')")
    assert rc == 2 and "Permission Error" in err
    assert query_json("select count(*) n from image_scores") == [{"n": 3}]
    monkeypatch.chdir(tmp_path)
    made: list[str] = []
    real = tempfile.mkdtemp
    monkeypatch.setattr(tempfile, "mkdtemp", lambda **kw: made.append(real(**kw)) or made[-1])
    assert query("select 1")[0] == 0
    assert not (tmp_path / ".tmp").exists()
    assert made and not Path(made[0]).exists()


def test_query_row_cap_and_timeout(home):
    filled(n=5)
    out, err = io.StringIO(), io.StringIO()
    assert run_query("select image_uri from image_scores", "json", out, err, max_rows=2) == 0
    assert len(json.loads(out.getvalue())) == 2  # still one valid JSON array
    assert "more than 2 rows" in err.getvalue()
    out, err = io.StringIO(), io.StringIO()
    assert run_query("select image_uri from image_scores", "csv", out, err, max_rows=5) == 0
    assert len(out.getvalue().splitlines()) == 6 and err.getvalue() == ""
    out, err = io.StringIO(), io.StringIO()
    slow = "select count(*) from range(10000000000) a where a.range % 7 = 3"
    assert run_query(slow, "table", out, err, timeout_s=0.5) == 1
    assert "longer than 0.5 s" in err.getvalue()


@pytest.mark.s3
def test_s3_warehouse_query_falls_back_to_arrow(home, s3_server, monkeypatch):
    from conftest import make_bucket

    make_bucket("flowscore-tables")
    monkeypatch.setenv("FLOWSCORE_WAREHOUSE", "s3://flowscore-tables/wh")
    assert T.catalog_config()["s3.endpoint"] == s3_server
    cat = filled(n=4)
    T.upsert(cat, T.IMAGE_SCORES, score_rows(2, start=3), KEY)
    assert query_json("select count(*) n, count(distinct image_uri) d from image_scores") == [
        {"n": 5, "d": 5}
    ]
    assert query_json("select count(*) n from runs") == [{"n": 0}]


def test_image_scores_of_an_older_flowscore_gets_threshold_source(home):
    """An ``image_scores`` table made before ``threshold_source`` existed gets it at the end
    by schema evolution (path columns still in their place); old rows read it as null."""
    cat = T.load_catalog_()
    new_schema = T.image_scores_arrow_schema(["year"])
    old_schema = pa.schema(
        [f for f in new_schema if f.name not in ("threshold_source", "heatmap_kind")]
    )
    T._create_table(cat, T.IMAGE_SCORES, old_schema)
    old = {"image_uri": "a.jpg", "etag": "1", "model_version": "1", "year": "2017"}
    tbl = cat.load_table("flowscore.image_scores")
    tbl.append(pa.Table.from_pylist([old], schema=T._with_field_ids(tbl)))
    T.ensure_tables(cat, ["year"])
    got = T.arrow_schema_of(cat.load_table("flowscore.image_scores"))
    assert got.names == new_schema.names
    T.ensure_tables(cat, ["year"])  # idempotent
    assert query_json("select image_uri, threshold_source, heatmap_kind from image_scores") == [
        {"image_uri": "a.jpg", "threshold_source": None, "heatmap_kind": None}
    ]


def _error_row(uri: str, version: str | None, stage: str = "decode") -> dict:
    return {
        "image_uri": uri,
        "etag": "e",
        "run_id": "r0",
        "stage": stage,
        "error_type": "OSError",
        "message": "m",
        "at": dt.datetime(2026, 1, 1),
        "model_version": version,
        "retryable": stage == "read",
    }


def test_errors_are_per_model_version_and_settled_in_one_commit(home, monkeypatch):
    """Error keys are per model version; a read error is retryable (not a permanent key);
    settling a chunk's keys removes that version's rows (and versionless rows of an older
    flowscore) and appends the chunk's new errors in one snapshot."""
    cat = T.load_catalog_()
    # a scoring_errors table of an older flowscore (no model_version, no retryable) with a row
    old = pa.schema(
        [f for f in T.SCORING_ERRORS_SCHEMA if f.name not in ("model_version", "retryable")]
    )
    with monkeypatch.context() as m:
        m.setitem(T.TABLE_KEYS, T.SCORING_ERRORS, ("image_uri", "etag"))
        assert T._create_table(cat, T.SCORING_ERRORS, old)
    legacy = {k: v for k, v in _error_row("u4", None).items() if k in old.names}
    cat.load_table("flowscore.scoring_errors").append(pa.Table.from_pylist([legacy], schema=old))
    T.ensure_tables(cat)  # schema evolution adds the two columns; the old row reads null
    rows = [_error_row("u1", "A"), _error_row("u2", "A", "read"), _error_row("u3", "B")]
    T.settle_errors(cat, "A", [], pa.Table.from_pylist(rows, schema=T.SCORING_ERRORS_SCHEMA))
    assert T.error_keys(cat, model_version="A") == {("u1", "e"), ("u2", "e")}
    assert T.error_keys(cat, model_version="A", permanent=True) == {("u1", "e")}
    assert T.error_keys(cat, model_version="C") == set()
    assert ("u4", "e") in T.error_keys(cat)

    def commits() -> int:  # catalog commits (a transaction may add several snapshots)
        return len(cat.load_table("flowscore.scoring_errors").metadata.metadata_log)

    snaps = commits()
    # u1 and u4 scored now under A, u2 failed again under A (a fresh row replaces the old)
    again = pa.Table.from_pylist([_error_row("u2", "A", "read")], schema=T.SCORING_ERRORS_SCHEMA)
    T.settle_errors(cat, "A", [("u1", "e"), ("u4", "e"), ("u2", "e")], again)
    tbl = cat.load_table("flowscore.scoring_errors")
    assert commits() == snaps + 1  # one atomic commit
    left = sorted((r["image_uri"], r["model_version"]) for r in tbl.scan().to_arrow().to_pylist())
    assert left == [("u2", "A"), ("u3", "B")]
    # nothing to change: no commit
    T.settle_errors(cat, "A", [("u9", "e")], again.slice(0, 0))
    assert commits() == snaps + 1


def test_a_read_error_row_is_retryable_and_a_decode_error_is_not(tmp_path):
    """decode_task on a file that vanished after listing (read) and one that is not an image
    (decode): the error rows, in scoring_errors' schema, say which is tried again."""
    from pipelines.score import _select, decode_task

    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    gone = tmp_path / "gone.jpg"
    rows = [
        {"image_uri": p.as_uri(), "etag": "1-1", "path": p.name, "mtime": None} for p in (gone, bad)
    ]
    out = decode_task(pa.Table.from_pylist(rows))
    assert out.column("stage").to_pylist() == ["read", "decode"]
    errors = _select(
        out.append_column("model_version", pa.array(["v"] * 2)),
        T.SCORING_ERRORS_SCHEMA,
        errors=True,
        run_id="r",
    )
    assert errors.schema == T.SCORING_ERRORS_SCHEMA
    assert errors.column("retryable").to_pylist() == [True, False]
    assert errors.column("model_version").to_pylist() == ["v", "v"]


def test_a_file_above_the_size_limit_is_not_read_and_not_retried(tmp_path, monkeypatch):
    """The listed size is checked before any byte is read: an error row, not retryable
    (the same file would be refused again); the limit comes from FLOWSCORE_MAX_FILE_MB."""
    from pipelines.score import _select, decode_task, max_file_bytes

    big = tmp_path / "big.jpg"
    big.write_bytes(b"\xff\xd8" + b"0" * 3000)
    monkeypatch.setenv("FLOWSCORE_MAX_FILE_MB", "0.001")  # 1048 bytes
    limit = max_file_bytes()
    assert limit == int(0.001 * 2**20)
    row = {"image_uri": big.as_uri(), "etag": "1", "path": "big.jpg", "mtime": None, "size": 3002}
    out = decode_task(pa.Table.from_pylist([row]), max_bytes=limit)
    assert out.column("error_type").to_pylist() == ["FileTooLarge"]
    assert "above the limit" in out.column("message")[0].as_py()
    out = out.append_column("model_version", pa.array(["v"]))
    errors = _select(out, T.SCORING_ERRORS_SCHEMA, errors=True, run_id="r")
    assert errors.column("retryable").to_pylist() == [False]


@pytest.mark.parametrize("value", ["abc", "0", "-5", "nan", "inf"])
def test_flowscore_numbers_are_checked(monkeypatch, value):
    """Every FLOWSCORE_* number: a bad value is one clear error naming the variable."""
    from pipelines.score import max_file_bytes, stream_buffer_per_actor
    from pipelines.settings import SettingError
    from pipelines.storage import s3_settings
    from pipelines.usecases.nightly import JobUsageError, lock_lease_s

    for name, read, error in (
        ("FLOWSCORE_LOCK_LEASE_S", lock_lease_s, JobUsageError),
        ("FLOWSCORE_MAX_FILE_MB", max_file_bytes, SettingError),
        ("FLOWSCORE_STREAM_BUFFER_MB", stream_buffer_per_actor, SettingError),
        ("FLOWSCORE_S3_CONNECT_TIMEOUT_S", s3_settings, SettingError),
    ):
        with monkeypatch.context() as m:
            m.setenv(name, value)
            with pytest.raises(error, match=name):
                read()


def test_pending_subtracts_what_is_done_under_the_version(home):
    """The nightly job's subtraction (digests of the done keys): scored under this version
    and permanent errors under it are done; a read error, another version's rows, a
    replaced file (new etag) and a new file are not."""
    from pipelines.archive import ArchiveEntry
    from pipelines.incremental import done_digests, key_digest, pending

    cat = T.load_catalog_()
    T.ensure_tables(cat, ["year"])
    T.upsert(cat, T.IMAGE_SCORES, score_rows(4, version="7"), KEY)  # 0..3 done under 7
    T.upsert(cat, T.IMAGE_SCORES, score_rows(2, start=4, version="6"), KEY)  # 4, 5: v6 only

    def error(i: int, version: str, retryable: bool | None) -> dict:
        return {
            "image_uri": f"file:///arch/{i:04d}.png",
            "etag": f"e{i}",
            "run_id": "r",
            "stage": "read" if retryable else "decode",
            "error_type": "OSError",
            "message": "m",
            "at": CAPTURED,
            "model_version": version,
            "retryable": retryable,
        }

    errs = [error(6, "7", False), error(7, "7", True), error(8, "6", False), error(9, "7", None)]
    cat.load_table("flowscore.scoring_errors").append(
        pa.Table.from_pylist(errs, schema=T.SCORING_ERRORS_SCHEMA)
    )

    def entry(i: int, etag: str | None = None) -> ArchiveEntry:
        return ArchiveEntry(
            image_uri=f"file:///arch/{i:04d}.png",
            etag=etag or f"e{i}",
            size=1,
            mtime=None,
            path=f"{i:04d}.png",
        )

    listed = [entry(i) for i in range(11)] + [entry(0, etag="replaced")]
    todo = pending(cat, "7", listed)
    # 6 (a decode error) is done; 7 (a read error), 8 (an error under version 6) and 9 (an
    # older flowscore's row without the retryable flag: tried again) are not
    assert [(e.path, e.etag) for e in todo] == [
        ("0004.png", "e4"),
        ("0005.png", "e5"),
        ("0007.png", "e7"),
        ("0008.png", "e8"),
        ("0009.png", "e9"),
        ("0010.png", "e10"),
        ("0000.png", "replaced"),
    ]
    assert len(done_digests(cat, "7")) == 4 + 1
    # the same answer as the key sets the nightly job subtracted before
    uris = {e.image_uri for e in listed}
    done = T.existing_keys(cat, "7", uris) | T.error_keys(
        cat, uris, model_version="7", permanent=True
    )
    assert todo == [e for e in listed if (e.image_uri, e.etag) not in done]
    assert key_digest("file:///arch/0000.png", "e0") != key_digest("file:///arch/0000.png", "e1")
    assert pending(cat, "8", listed) == listed  # nothing done under a version never scored
