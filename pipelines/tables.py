"""The result tables: an Iceberg SQL catalog, the three tables' schemas, and small helpers.

Catalog
    :func:`catalog_config` gives the pyiceberg SQL-catalog properties (all plain strings),
    usable both as ``pyiceberg.catalog.load_catalog(name, **rest)`` and as
    ``catalog_kwargs`` of Ray's ``Dataset.write_iceberg``. Embedded default: catalog
    ``sqlite:///$FLOWSCORE_HOME/catalog.db``, warehouse ``file://$FLOWSCORE_HOME/warehouse``;
    production: ``FLOWSCORE_CATALOG_URI`` (e.g. ``postgresql+psycopg2://…``) and
    ``FLOWSCORE_WAREHOUSE`` (e.g. ``s3://bucket/warehouse``). For an ``s3://`` warehouse the
    endpoint (``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL``) and region (``AWS_REGION`` or
    ``AWS_DEFAULT_REGION``) are passed on as ``s3.endpoint`` / ``s3.region``, and the bounded
    timeouts and retries of ``FLOWSCORE_S3_*`` as FileIO properties (:mod:`pipelines.storage`).
    Credentials are deliberately *not* copied into the properties (they would travel with
    every Ray task and could end up in logs): pyarrow and s3fs take them from the AWS chain
    (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, profiles, instance or pod roles) in every
    process that writes. Further pyiceberg properties can be set without code through
    pyiceberg's own ``PYICEBERG_CATALOG__FLOWSCORE__<KEY>`` environment variables.

Tables (namespace ``flowscore``; columns exactly as DESIGN.md, "Tables")
    ``image_scores``   key (image_uri, etag, model_version); partitioned by identity of
                       ``model_version``. One scoring run writes one model version, so the
                       partitioning never splits a write into more files; it lets readers
                       (Spark, Trino, pyiceberg, the incremental look-up of
                       :func:`existing_keys`) prune whole versions from the manifests, and lets
                       an old model version be dropped by a metadata-only delete.
    ``scoring_errors`` key (image_uri, etag, model_version): one row per failing file
                       version and model version (the latest run's); unpartitioned. Beyond
                       DESIGN's columns it has ``model_version`` and ``retryable`` (true for a
                       ``read`` error: the bytes could not be fetched, e.g. EIO on a NAS, so the
                       nightly job tries the file again; decode and score errors are properties
                       of the bytes and the model, and are not retried). Tables of an older
                       flowscore get both by schema evolution; their old rows read null.
    ``runs``           key run_id; unpartitioned, one row per run. Beyond DESIGN's
                       columns it has ``mlflow_run_id`` (null when MLflow was unavailable)
                       and ``warnings`` (what went wrong without failing the run); a
                       ``runs`` table of an older flowscore gets them by schema evolution.

Key columns are Iceberg *required* fields (identifier fields must be), so the Arrow schemas
here mark them ``nullable=False``; everything else is optional (a ``heatmap`` is null when a
run is told ``--no-heatmaps``). Timestamps are naive UTC with microsecond precision.

Writes: big ones go through Ray's ``write_iceberg`` (see ``pipelines/score.py``); the small
``runs`` rows go through :func:`upsert` in-process. Both are copy-on-write in the versions
pinned here (pyiceberg 0.12's ``Table.upsert``/``delete`` rewrite the affected data files,
and Ray 2.60's UPSERT deletes and rewrites files), so a snapshot never carries delete files
and a reader can take its data files as they are (:func:`snapshot_files`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlparse

import pyarrow as pa

from . import settings as settings_mod
from .errors import one_line
from .paths import flowscore_home
from .redact import redact

if TYPE_CHECKING:
    from pyiceberg.catalog import Catalog
    from pyiceberg.schema import Schema
    from pyiceberg.table import Table

__all__ = [
    "CATALOG_NAME",
    "NAMESPACE",
    "IMAGE_SCORES",
    "SCORING_ERRORS",
    "RUNS",
    "TABLES",
    "TABLE_KEYS",
    "IMAGE_SCORES_FIXED_HEAD",
    "IMAGE_SCORES_FIXED_TAIL",
    "SCORING_ERRORS_SCHEMA",
    "RUNS_SCHEMA",
    "RUN_STATUSES",
    "TablesError",
    "catalog_config",
    "is_local_warehouse",
    "load_catalog_",
    "qualified",
    "image_scores_arrow_schema",
    "path_columns_of",
    "arrow_schema_of",
    "ensure_tables",
    "load_table",
    "conform",
    "upsert",
    "record_run_start",
    "record_run_end",
    "existing_keys",
    "error_keys",
    "settle_errors",
    "mark_dead_runs",
    "snapshot_files",
    "has_delete_files",
    "scan_files",
    "local_path",
]

CATALOG_NAME = "flowscore"
NAMESPACE = "flowscore"
IMAGE_SCORES = "image_scores"
SCORING_ERRORS = "scoring_errors"
RUNS = "runs"
TABLES = (IMAGE_SCORES, SCORING_ERRORS, RUNS)
TABLE_KEYS: dict[str, tuple[str, ...]] = {
    IMAGE_SCORES: ("image_uri", "etag", "model_version"),
    SCORING_ERRORS: ("image_uri", "etag", "model_version"),
    RUNS: ("run_id",),
}
RUN_STATUSES = ("running", "succeeded", "failed")

CATALOG_URI_ENV = settings_mod.CATALOG_URI_ENV
WAREHOUSE_ENV = settings_mod.WAREHOUSE_ENV

_TS = pa.timestamp("us")  # naive UTC, microseconds (Iceberg ``timestamp``)
_F32 = pa.float32()
_I32 = pa.int32()
_STR = pa.string()
_SUMMARY = (
    "ll_mean ll_std ll_min ll_max p01 p05 p10 p25 p50 p75 p90 p95 p99 quality anomaly_score"
).split()


def _expressions(*names: str) -> tuple[Any, ...]:
    """pyiceberg row-filter expression classes by name. They take ``(column, value)``
    positionally at run time; their type annotations (pydantic fields) do not say so."""
    import pyiceberg.expressions as expressions

    return tuple(getattr(expressions, n) for n in names)


def _field(name: str, typ: pa.DataType, key: bool = False) -> pa.Field:
    return pa.field(name, typ, nullable=not key)


# image_scores = HEAD + path columns + TAIL (DESIGN order)
IMAGE_SCORES_FIXED_HEAD: tuple[pa.Field, ...] = (
    _field("image_uri", _STR, key=True),
    _field("etag", _STR, key=True),
    _field("captured_at", _TS),
)
IMAGE_SCORES_FIXED_TAIL: tuple[pa.Field, ...] = (
    _field("width", _I32),
    _field("height", _I32),
    _field("model_name", _STR),
    _field("model_version", _STR, key=True),
    _field("run_id", _STR),
    _field("scored_at", _TS),
    _field("grid_h", _I32),
    _field("grid_w", _I32),
    _field("window", _I32),
    _field("stride", _I32),
    _field("scale", _F32),
    *(_field(c, _F32) for c in _SUMMARY),
    _field("is_anomaly", pa.bool_()),
    _field("heatmap", pa.list_(_F32)),
    # which threshold decided is_anomaly: "global", or "<column>=<value>" for a model
    # calibrated per value of a path column (``train --calibrate-by``); added after the
    # first release, so older tables get it by schema evolution and older rows read null
    _field("threshold_source", _STR),
    # what ``heatmap`` holds: "likelihood" (window log-likelihoods) or "gradient" (minus the
    # gradient map of a CNN model, ``score --heatmap gradient``; flowcore/gradient.py); null
    # without a heatmap and in rows written before it existed (those hold log-likelihoods)
    _field("heatmap_kind", _STR),
)
_FIXED_NAMES = frozenset(f.name for f in IMAGE_SCORES_FIXED_HEAD + IMAGE_SCORES_FIXED_TAIL)

SCORING_ERRORS_SCHEMA = pa.schema(
    [
        _field("image_uri", _STR, key=True),
        _field("etag", _STR, key=True),
        _field("run_id", _STR, key=True),
        _field("stage", _STR),
        _field("error_type", _STR),
        _field("message", _STR),
        _field("at", _TS),
        # added after the first release (older tables get them as optional columns): errors
        # are per model version, and a read error (the bytes could not be fetched) is retried
        _field("model_version", _STR, key=True),
        _field("retryable", pa.bool_()),
    ]
)

RUNS_SCHEMA = pa.schema(
    [
        _field("run_id", _STR, key=True),
        _field("job", _STR),
        _field("model_name", _STR),
        _field("model_version", _STR),
        _field("archive", _STR),
        _field("started_at", _TS),
        _field("finished_at", _TS),
        _field("status", _STR),
        _field("images_listed", pa.int64()),
        _field("images_scored", pa.int64()),
        _field("images_skipped", pa.int64()),
        _field("images_failed", pa.int64()),
        _field("images_per_s", pa.float64()),
        # the MLflow run that tracks this run's metrics; null when MLflow was unavailable
        _field("mlflow_run_id", _STR),
        # what went wrong without failing the run (e.g. "MLflow unavailable at …"); null if
        # nothing did; several warnings are joined with "; "
        _field("warnings", _STR),
    ]
)


class TablesError(RuntimeError):
    """The catalog or a table cannot be used: one line that says what and where."""


# ---------------------------------------------------------------- catalog


def catalog_config(settings: settings_mod.Settings | None = None) -> dict[str, str]:
    """The pyiceberg SQL-catalog properties (see the module docstring), all plain strings.

    Keys: ``name`` (``flowscore``), ``type`` (``sql``), ``uri`` and ``warehouse``; with an
    ``s3://`` warehouse also ``s3.endpoint`` and ``s3.region`` when the environment names them,
    and the FileIO's timeouts and retries from ``FLOWSCORE_S3_*`` (``s3.connect-timeout``,
    ``s3.request-timeout``, ``s3.retry-strategy-impl``; see :mod:`pipelines.storage`).
    Pass it unchanged as ``catalog_kwargs`` to Ray's ``write_iceberg`` (Ray pops ``name``).
    """
    s = settings or settings_mod.current()
    if s.catalog_uri.startswith(f"sqlite:///{s.home}/") or s.warehouse.startswith(
        f"file://{s.home}/"
    ):
        flowscore_home(s)  # the embedded defaults live there: create it
    cfg = {
        "name": CATALOG_NAME,
        "type": "sql",
        "uri": s.catalog_uri,
        "warehouse": s.warehouse,
    }
    if urlparse(cfg["warehouse"]).scheme in ("s3", "s3a", "s3n"):
        if s.s3_endpoint:
            cfg["s3.endpoint"] = s.s3_endpoint
        if s.s3_region:
            cfg["s3.region"] = s.s3_region
        from .storage import iceberg_properties

        cfg.update(iceberg_properties(s.s3))
    return cfg


def is_local_warehouse(location: str) -> bool:
    """True for a ``file://`` URI or a plain path."""
    scheme = urlparse(location).scheme
    return scheme in ("", "file") or len(scheme) == 1


def local_path(location: str) -> str:
    """The local file-system path of a ``file://`` URI (or plain path) as pyiceberg wrote it
    (no percent-decoding: pyiceberg writes the URI's path verbatim)."""
    parsed = urlparse(location)
    if parsed.scheme == "file":
        return (parsed.netloc + parsed.path) if parsed.netloc else parsed.path
    return location


def load_catalog_(settings: settings_mod.Settings | None = None) -> Catalog:
    """The flowscore catalog (creating its SQL tables and namespace ``flowscore`` if
    missing). Raises :class:`TablesError` naming the catalog URI when it cannot be opened."""
    from pyiceberg.catalog import load_catalog

    cfg = catalog_config(settings)
    name = cfg.pop("name")
    for attempt in range(4):
        try:
            catalog = load_catalog(name, **cfg)
            catalog.create_namespace_if_not_exists(NAMESPACE)
            return catalog
        except Exception as e:  # noqa: BLE001 - any driver/IO error: one clear line
            if attempt < 3 and _lost_a_race(e):  # another process is creating it right now
                time.sleep(0.05 * 2**attempt)
                continue
            raise TablesError(
                f"cannot open the Iceberg catalog at {redact(cfg['uri'])} "
                f"(warehouse {redact(cfg['warehouse'])}; set {CATALOG_URI_ENV} / {WAREHOUSE_ENV}): "
                f"{one_line(e)}"
            ) from e
    raise AssertionError("unreachable")  # pragma: no cover


def _lost_a_race(e: BaseException) -> bool:
    """Whether ``e`` says another process created the same catalog table, namespace row or
    table a moment earlier (two runs started at once on a fresh catalog), or held SQLite's
    write lock: worth trying again."""
    text = str(e).lower()
    return any(
        s in text
        for s in ("already exists", "unique constraint", "duplicate key", "database is locked")
    )


def qualified(table: str) -> str:
    """``flowscore.<table>`` for a bare table name; a qualified name is returned as is."""
    return table if "." in table else f"{NAMESPACE}.{table}"


# ---------------------------------------------------------------- schemas


def image_scores_arrow_schema(path_columns: Sequence[str] = ()) -> pa.Schema:
    """The Arrow schema of ``image_scores`` rows with these ``key=value`` path columns
    (strings, in the given order) after ``captured_at``. Key fields are not nullable."""
    seen: set[str] = set()
    cols: list[pa.Field] = []
    for c in path_columns:
        if not c or c in _FIXED_NAMES:
            raise TablesError(
                f"path column {c!r} clashes with a column of image_scores; rename the "
                f"'{c}=…' directories of the archive"
            )
        if c not in seen:
            seen.add(c)
            cols.append(pa.field(c, _STR))
    return pa.schema([*IMAGE_SCORES_FIXED_HEAD, *cols, *IMAGE_SCORES_FIXED_TAIL])


def _base_schema(table: str) -> pa.Schema:
    if table == IMAGE_SCORES:
        return image_scores_arrow_schema(())
    if table == SCORING_ERRORS:
        return SCORING_ERRORS_SCHEMA
    if table == RUNS:
        return RUNS_SCHEMA
    raise TablesError(f"unknown table {table!r} (known: {', '.join(TABLES)})")


def path_columns_of(table: Table) -> list[str]:
    """The ``key=value`` path columns of an ``image_scores`` table, in schema order."""
    return [f.name for f in table.schema().fields if f.name not in _FIXED_NAMES]


def _plain_type(t: pa.DataType) -> pa.DataType:
    """``t`` with large strings/lists made plain (``list<item>``), as this module spells it."""
    if pa.types.is_large_string(t):
        return pa.string()
    if pa.types.is_large_list(t) or pa.types.is_list(t):
        return pa.list_(pa.field("item", _plain_type(t.value_type), t.value_field.nullable))
    return t


def arrow_schema_of(table: Table) -> pa.Schema:
    """The table's current schema as Arrow, spelt as this module spells its schemas (plain
    ``string`` and ``list<item>``, required fields not nullable, no field ids)."""
    from pyiceberg.io.pyarrow import schema_to_pyarrow

    schema = schema_to_pyarrow(table.schema(), include_field_ids=False)
    return pa.schema([pa.field(f.name, _plain_type(f.type), f.nullable) for f in schema])


def _iceberg_type(t: pa.DataType, next_id: Callable[[], int]) -> Any:
    from pyiceberg import types as it

    simple = {
        pa.string(): it.StringType(),
        pa.int32(): it.IntegerType(),
        pa.int64(): it.LongType(),
        pa.float32(): it.FloatType(),
        pa.float64(): it.DoubleType(),
        pa.bool_(): it.BooleanType(),
        _TS: it.TimestampType(),
    }
    if t in simple:
        return simple[t]
    if pa.types.is_list(t):
        return it.ListType(
            element_id=next_id(),
            element_type=_iceberg_type(t.value_type, next_id),
            element_required=not t.value_field.nullable,
        )
    raise TypeError(f"no Iceberg type for Arrow {t}")  # pragma: no cover - fixed schemas


def _iceberg_schema(schema: pa.Schema, key: Sequence[str]) -> Schema:
    """An Iceberg schema for an Arrow schema, with ``key`` as identifier fields."""
    from pyiceberg.schema import Schema
    from pyiceberg.types import NestedField

    counter = iter(range(1, 10_000))

    def next_id() -> int:
        return next(counter)

    fields = []
    ids: dict[str, int] = {}
    for f in schema:
        fid = next_id()
        ids[f.name] = fid
        fields.append(
            NestedField(fid, f.name, _iceberg_type(f.type, next_id), required=not f.nullable)
        )
    return Schema(*fields, identifier_field_ids=[ids[k] for k in key])


_R = TypeVar("_R")


def _retry_commit(action: Callable[[], _R], attempts: int = 5) -> _R:
    """Run ``action``; on a concurrent-commit conflict, back off and run it again."""
    from pyiceberg.exceptions import CommitFailedException

    for i in range(attempts):
        try:
            return action()
        except CommitFailedException:
            if i == attempts - 1:
                raise
            time.sleep(0.05 * 2**i)
    raise AssertionError("unreachable")  # pragma: no cover


def ensure_tables(catalog: Catalog, path_columns: Sequence[str] = ()) -> None:
    """Create ``image_scores``, ``scoring_errors`` and ``runs`` if missing (identifier fields
    set; image_scores partitioned by ``model_version``; each with a first, empty snapshot)
    and add to ``image_scores`` any of ``path_columns`` it lacks, as optional string columns
    placed after the existing path columns (schema evolution: older rows read them as null);
    likewise add to ``scoring_errors`` and ``runs`` the columns a newer flowscore defined.
    Idempotent. Any failure (a missing bucket, a catalog error) raises :class:`TablesError`
    naming the warehouse."""
    image_scores_arrow_schema(path_columns)  # validates the names first
    try:
        _ensure_tables(catalog, path_columns)
    except TablesError:
        raise
    except Exception as e:  # noqa: BLE001 - storage and catalog errors: one clear line
        where = getattr(catalog, "properties", {}).get("warehouse", "the warehouse")
        raise TablesError(
            f"cannot create or update the flowscore tables in {where}: {one_line(e)}"
        ) from e


def _ensure_tables(catalog: Catalog, path_columns: Sequence[str]) -> None:
    arrow_scores = image_scores_arrow_schema(path_columns)
    catalog.create_namespace_if_not_exists(NAMESPACE)
    for name in TABLES:
        tbl = load_table(catalog, name)
        if tbl is None:
            base = arrow_scores if name == IMAGE_SCORES else _base_schema(name)
            if _create_table(catalog, name, base):
                continue
            tbl = catalog.load_table(qualified(name))  # a concurrent process created it
        if tbl.current_snapshot() is None:  # created by an older flowscore
            _ensure_snapshot(catalog, name)
        base = pa.schema(IMAGE_SCORES_FIXED_TAIL) if name == IMAGE_SCORES else _base_schema(name)
        known = {f.name for f in tbl.schema().fields}
        if any(f.name not in known for f in base):  # created by an older flowscore
            _add_missing_columns(catalog, name, base)
    if path_columns:
        _add_path_columns(catalog, list(dict.fromkeys(path_columns)))


def _create_table(catalog: Catalog, name: str, arrow_schema: pa.Schema) -> bool:
    """Create ``flowscore.<name>`` with its first, empty snapshot in one commit (Ray 2.60's
    UPSERT into a table without a snapshot fails: "Cannot scan unknown ref=main"). False if
    the table exists already."""
    from pyiceberg.exceptions import CommitFailedException, TableAlreadyExistsError
    from pyiceberg.io.pyarrow import schema_to_pyarrow
    from pyiceberg.partitioning import PartitionField, PartitionSpec
    from pyiceberg.transforms import IdentityTransform

    schema = _iceberg_schema(arrow_schema, TABLE_KEYS[name])
    spec = PartitionSpec()
    if name == IMAGE_SCORES:
        mv = schema.find_field("model_version")
        spec = PartitionSpec(
            PartitionField(
                source_id=mv.field_id,
                field_id=1000,
                transform=IdentityTransform(),
                name="model_version",
            )
        )
    try:
        txn = catalog.create_table_transaction(
            qualified(name),
            schema=schema,
            partition_spec=spec,
            properties={"write.parquet.compression-codec": "zstd"},
        )
        empty = schema_to_pyarrow(txn.table_metadata.schema(), include_field_ids=True)
        txn.append(empty.empty_table())
        txn.commit_transaction()
    except TableAlreadyExistsError:
        return False
    except CommitFailedException:
        if load_table(catalog, name) is not None:  # a concurrent process created it first
            return False
        raise
    return True


def _ensure_snapshot(catalog: Catalog, name: str) -> None:
    """Give a table without a snapshot an empty one (and so a ``main`` branch)."""

    def commit() -> None:
        tbl = catalog.load_table(qualified(name))
        if tbl.current_snapshot() is None:
            tbl.append(_with_field_ids(tbl).empty_table())

    _retry_commit(commit)


def _add_missing_columns(catalog: Catalog, name: str, arrow_schema: pa.Schema) -> None:
    """Add to ``flowscore.<name>`` the optional columns of ``arrow_schema`` it lacks, at the
    end (schema evolution: older rows read them as null)."""

    def evolve() -> None:
        table = catalog.load_table(qualified(name))
        known = {f.name for f in table.schema().fields}
        new = [f for f in arrow_schema if f.name not in known]
        if not new:
            return
        with table.update_schema() as upd:
            for f in new:
                upd.add_column((f.name,), _iceberg_type(f.type, lambda: 0))

    _retry_commit(evolve)


def _add_path_columns(catalog: Catalog, path_columns: list[str]) -> None:
    from pyiceberg.types import StringType

    def evolve() -> None:
        table = catalog.load_table(qualified(IMAGE_SCORES))
        existing = {f.name: f for f in table.schema().fields}
        for c in path_columns:
            if c in existing and not isinstance(existing[c].field_type, StringType):
                raise TablesError(
                    f"column {c!r} of {qualified(IMAGE_SCORES)} is "
                    f"{existing[c].field_type}, not a string path column"
                )
        new = [c for c in path_columns if c not in existing]
        if not new:
            return
        current = path_columns_of(table)
        after = current[-1] if current else "captured_at"
        with table.update_schema() as upd:
            for c in new:
                upd.add_column((c,), StringType(), doc=f"path segment {c}=…")
                upd.move_after((c,), (after,))
                after = c

    _retry_commit(evolve)


def load_table(catalog: Catalog, table: str) -> Table | None:
    """The table ``flowscore.<table>``, or None if it does not exist yet."""
    from pyiceberg.exceptions import NoSuchTableError

    try:
        return catalog.load_table(qualified(table))
    except NoSuchTableError:
        return None


# ---------------------------------------------------------------- writes


def conform(data: pa.Table, schema: pa.Schema) -> pa.Table:
    """``data`` with exactly ``schema``'s columns, order and types: missing columns become
    nulls, extra columns are an error (they would need schema evolution first)."""
    extra = [c for c in data.column_names if c not in schema.names]
    if extra:
        raise TablesError(f"columns not in the table: {', '.join(extra)}")
    cols = []
    for f in schema:
        if f.name in data.column_names:
            col = data.column(f.name).cast(f.type)
            if not f.nullable and col.null_count:
                raise TablesError(f"key column {f.name!r} has null values")
            cols.append(col)
        elif not f.nullable:
            raise TablesError(f"key column {f.name!r} is missing")
        else:
            cols.append(pa.nulls(data.num_rows, f.type))
    return pa.Table.from_arrays(cols, schema=schema)


def upsert(catalog: Catalog, table: str, data: pa.Table, join_cols: list[str]) -> None:
    """Insert ``data`` into ``flowscore.<table>``, replacing the rows whose ``join_cols``
    match, in one commit (pyiceberg ``Table.upsert``: copy-on-write). In-process, for small
    tables such as ``runs``; big writes go through Ray's ``write_iceberg``. Retried on a
    concurrent-commit conflict. ``data`` must not repeat a key."""
    if data.num_rows == 0:
        return

    def attempt() -> None:
        tbl = catalog.load_table(qualified(table))
        tbl.upsert(conform(data, _with_field_ids(tbl)), join_cols=list(join_cols))

    _retry_commit(attempt)


def _with_field_ids(tbl: Table) -> pa.Schema:
    from pyiceberg.io.pyarrow import schema_to_pyarrow

    return schema_to_pyarrow(tbl.schema(), include_field_ids=True)


def _run_row(catalog: Catalog, run_id: str) -> dict[str, Any] | None:
    (EqualTo,) = _expressions("EqualTo")

    tbl = catalog.load_table(qualified(RUNS))
    rows = tbl.scan(row_filter=EqualTo("run_id", run_id)).to_arrow().to_pylist()
    return rows[-1] if rows else None


def record_run_start(
    catalog: Catalog,
    *,
    run_id: str,
    job: str,
    model_name: str,
    model_version: str,
    archive: str,
    started_at: datetime,
    images_listed: int | None = None,
    mlflow_run_id: str | None = None,
    warnings: str | None = None,
) -> None:
    """Write the ``runs`` row of a run that starts now (status ``running``), with the id of
    the MLflow run tracking it (None if MLflow is unavailable) and any warnings so far."""
    row = {
        "run_id": run_id,
        "job": job,
        "model_name": model_name,
        "model_version": model_version,
        "archive": archive,
        "started_at": started_at,
        "status": "running",
        "images_listed": images_listed,
        "mlflow_run_id": mlflow_run_id,
        "warnings": warnings,
    }
    upsert(catalog, RUNS, pa.Table.from_pylist([row]), ["run_id"])


def record_run_end(
    catalog: Catalog,
    *,
    run_id: str,
    finished_at: datetime,
    status: str,
    images_scored: int,
    images_skipped: int,
    images_failed: int,
    images_per_s: float,
    images_listed: int | None = None,
    mlflow_run_id: str | None = None,
    warnings: str | None = None,
) -> None:
    """Complete the ``runs`` row of ``run_id`` with its end, status (``succeeded`` or
    ``failed``), counts and images/s, keeping what :func:`record_run_start` wrote.
    ``mlflow_run_id`` and ``warnings``, when given, replace what the row held (pass all the
    run's warnings, not only the new ones)."""
    if status not in RUN_STATUSES:
        raise ValueError(f"status must be one of {', '.join(RUN_STATUSES)}, not {status!r}")
    row = _run_row(catalog, run_id) or {"run_id": run_id}
    row.update(
        finished_at=finished_at,
        status=status,
        images_scored=images_scored,
        images_skipped=images_skipped,
        images_failed=images_failed,
        images_per_s=float(images_per_s),
    )
    if images_listed is not None:
        row["images_listed"] = images_listed
    if mlflow_run_id is not None:
        row["mlflow_run_id"] = mlflow_run_id
    if warnings is not None:
        row["warnings"] = warnings
    upsert(catalog, RUNS, pa.Table.from_pylist([row]), ["run_id"])


def mark_dead_runs(catalog: Catalog, job: str, note: str) -> list[str]:
    """Mark every ``running`` row of ``job`` in ``runs`` as ``failed``, appending ``note`` to
    its warnings; the run ids. Called by a run that has just taken over the job's lock from a
    run whose lease expired: no other run of the job can be alive then."""
    And, EqualTo = _expressions("And", "EqualTo")

    tbl = load_table(catalog, RUNS)
    if tbl is None:
        return []
    rows = tbl.scan(row_filter=And(EqualTo("job", job), EqualTo("status", "running")))
    dead = rows.to_arrow().to_pylist()
    for row in dead:
        row["status"] = "failed"
        row["warnings"] = "; ".join(w for w in (row.get("warnings"), note) if w)
    if dead:
        upsert(catalog, RUNS, pa.Table.from_pylist(dead), ["run_id"])
    return [row["run_id"] for row in dead]


# ---------------------------------------------------------------- reads

_IN_LIMIT = 1000  # above this many URIs, filter in Arrow instead of an Iceberg In(...)


def _keys(
    catalog: Catalog, table: str, row_filter: Any, uris: set[str] | None
) -> set[tuple[str, str]]:
    import pyarrow.compute as pc

    And, In = _expressions("And", "In")

    tbl = load_table(catalog, table)
    if tbl is None or (uris is not None and not uris):
        return set()
    if uris is not None and len(uris) <= _IN_LIMIT:
        row_filter = And(row_filter, In("image_uri", uris))
    scanned = tbl.scan(row_filter=row_filter, selected_fields=("image_uri", "etag")).to_arrow()
    if uris is not None and len(uris) > _IN_LIMIT:
        scanned = scanned.filter(pc.is_in(scanned["image_uri"], pa.array(list(uris), _STR)))
    return set(zip(scanned["image_uri"].to_pylist(), scanned["etag"].to_pylist(), strict=True))


def existing_keys(
    catalog: Catalog, model_version: str, uris: set[str] | None = None
) -> set[tuple[str, str]]:
    """``(image_uri, etag)`` pairs already in ``image_scores`` for ``model_version``
    (optionally only for these URIs). Reads two columns of that version's partition."""
    (EqualTo,) = _expressions("EqualTo")

    return _keys(catalog, IMAGE_SCORES, EqualTo("model_version", model_version), uris)


def done_key_batches(catalog: Catalog, model_version: str) -> Iterator[pa.RecordBatch]:
    """``(image_uri, etag)`` batches of everything done under ``model_version``, streamed
    file by file (never the whole key set in memory): the rows of ``image_scores`` of that
    version, then its permanent ``scoring_errors`` (not ``retryable``; rows of an older
    flowscore without a version are not done under any)."""
    from pyiceberg.io.pyarrow import ArrowScan

    And, EqualTo, NotEqualTo = _expressions("And", "EqualTo", "NotEqualTo")

    for table, row_filter in (
        (IMAGE_SCORES, EqualTo("model_version", model_version)),
        (
            SCORING_ERRORS,
            And(EqualTo("model_version", model_version), NotEqualTo("retryable", True)),
        ),
    ):
        tbl = load_table(catalog, table)
        if tbl is None or tbl.current_snapshot() is None:
            continue
        scan = tbl.scan(row_filter=row_filter, selected_fields=("image_uri", "etag"))
        # one data file at a time: pyiceberg's batch reader reads files concurrently and
        # buffers them (about 300 MB at a million rows, measured), this keeps one file's keys
        reader = ArrowScan(tbl.metadata, tbl.io, scan.projection(), row_filter)
        for task in scan.plan_files():
            yield from reader.to_table([task]).to_batches()
            pa.default_memory_pool().release_unused()  # else the allocator keeps each file's


def error_keys(
    catalog: Catalog,
    uris: set[str] | None = None,
    run_id: str | None = None,
    *,
    model_version: str | None = None,
    permanent: bool = False,
) -> set[tuple[str, str]]:
    """``(image_uri, etag)`` pairs in ``scoring_errors``, optionally only: of one run, for
    these URIs, of one model version, and (``permanent``) not ``retryable``: what the
    nightly job must not try again under that version."""
    AlwaysTrue, And, EqualTo, NotEqualTo = _expressions(
        "AlwaysTrue", "And", "EqualTo", "NotEqualTo"
    )

    row_filter: Any = EqualTo("run_id", run_id) if run_id is not None else AlwaysTrue()
    if model_version is not None:
        row_filter = And(row_filter, EqualTo("model_version", model_version))
    if permanent:
        row_filter = And(row_filter, NotEqualTo("retryable", True))
    return _keys(catalog, SCORING_ERRORS, row_filter, uris)


def settle_errors(
    catalog: Catalog, model_version: str, settled: Sequence[tuple[str, str]], errors: pa.Table
) -> None:
    """One commit of ``scoring_errors`` for a chunk of a scoring run under ``model_version``:
    delete the rows of that version (and versionless rows of an older flowscore) for every
    ``(image_uri, etag)`` the chunk ``settled`` (scored, or failed again), and append the
    chunk's new error rows. Made *before* the chunk's ``image_scores`` commit, so a key is
    never in both tables; a crash between the two leaves the scored keys in neither, and the
    next run scores them. No commit when there is nothing to change."""
    And, EqualTo, In, IsNull, Or = _expressions("And", "EqualTo", "In", "IsNull", "Or")

    if not settled and errors.num_rows == 0:
        return
    row_filter = And(
        In("image_uri", {u for u, _ in settled}),
        In("etag", {e for _, e in settled}),
        Or(EqualTo("model_version", model_version), IsNull("model_version")),
    )

    def attempt() -> None:
        tbl = catalog.load_table(qualified(SCORING_ERRORS))
        stale = bool(settled) and tbl.current_snapshot() is not None
        if stale:
            hit = tbl.scan(row_filter=row_filter, selected_fields=("image_uri",), limit=1)
            stale = hit.to_arrow().num_rows > 0
        if not stale and errors.num_rows == 0:
            return
        with tbl.transaction() as tx:
            if stale:
                tx.delete(delete_filter=row_filter)
            if errors.num_rows:
                tx.append(conform(errors, _with_field_ids(tbl)))

    _retry_commit(attempt)


def _plan(table: Table) -> list[Any]:
    return list(table.scan().plan_files()) if table.current_snapshot() is not None else []


def snapshot_files(table: Table) -> list[str]:
    """The data files (as stored: ``file://…`` or ``s3://…``) of the table's current
    snapshot, in scan order; empty for a table without a snapshot."""
    return [task.file.file_path for task in _plan(table)]


def has_delete_files(table: Table) -> bool:
    """Whether the current snapshot has positional or equality delete files (then its data
    files alone are not the table's rows; readers must apply the deletes)."""
    return any(task.delete_files for task in _plan(table))


def scan_files(table: Table) -> tuple[list[str], bool]:
    """``(snapshot_files(table), has_delete_files(table))`` from one scan plan."""
    tasks = _plan(table)
    return [t.file.file_path for t in tasks], any(t.delete_files for t in tasks)
