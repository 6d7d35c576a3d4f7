"""``flowscore query "SQL" [--format table|csv|json]``: read-only SQL over the result tables.

One in-memory DuckDB connection gets three views, ``image_scores``, ``scoring_errors`` and
``runs``, over the *current* snapshots of the Iceberg tables (columns as in the tables'
schemas, path columns included). DuckDB's iceberg extension is not needed:

- local (``file://``) warehouse: each view is ``read_parquet([the snapshot's data files],
  union_by_name=true)`` (the file list comes from pyiceberg's scan plan), so DuckDB pushes
  projections and filters into the Parquet scan and skips row groups by their statistics.
  Columns added by schema evolution are null for files written before them. This is exact
  because every writer here is copy-on-write (no delete files); should a snapshot ever
  carry delete files, that table falls back to the next mode.
- ``s3://`` (any non-local) warehouse, or a snapshot with delete files: the table is read
  with pyiceberg (``scan().to_arrow()``, which applies deletes) and registered as an Arrow
  view. That reads the whole table into memory: fine for a laptop-sized table; for big S3
  tables point Trino, Spark or DuckDB with its iceberg extension at the same catalog.
- a table that does not exist yet (fresh ``FLOWSCORE_HOME``) is an empty view with the right
  columns, so ``select count(*) from image_scores`` answers 0.

Read-only: exactly one statement, of DuckDB's statement type SELECT (which covers WITH,
VALUES, FROM-first queries, DESCRIBE, SHOW and SUMMARIZE) or an EXPLAIN [ANALYZE] of one;
anything else (INSERT, DELETE, CREATE, COPY, ATTACH, SET, PRAGMA, CALL, several statements)
is refused with exit code 2 before anything runs. On top of that the connection is locked:
file access only to the current snapshots' data files themselves (not their directories,
which also hold superseded files of old snapshots), DuckDB's spill files in a private
temporary directory removed afterwards (not ``.tmp`` under the working directory), no
extension loading, and configuration frozen. A query DuckDB rejects prints DuckDB's message
on stderr, exit code 2. A query is interrupted after ``--timeout`` seconds (default 300) and
prints at most ``--max-rows`` rows (default 1 000 000; a note on stderr says when it cut).

Formats: ``table`` (psql-style aligned text with a header and a row count; long cells such
as heatmaps are cut at 60 characters), ``csv`` (header + rows; NULL is an empty field; lists
and structs as JSON text), ``json`` (one JSON array of row objects; timestamps as ISO 8601
strings, NaN and infinities as null, lists as arrays). 32-bit floats are printed with the
fewest digits that read back as the same float32.
"""

from __future__ import annotations

import base64
import csv
import datetime as dt
import decimal
import json
import math
import re
import shutil
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, TextIO

import pyarrow as pa

if TYPE_CHECKING:
    import duckdb
    from pyiceberg.catalog import Catalog

    from pipelines.settings import Settings

__all__ = [
    "FORMATS",
    "QueryRefused",
    "check_read_only",
    "connect",
    "run_query",
    "format_table",
]

FORMATS = ("table", "csv", "json")
EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
MAX_CELL = 60  # characters of one cell in the table format
_BATCH = 10_000
_GLOB_CHARS = frozenset("*?[{")


class QueryRefused(ValueError):
    """The SQL is not a single read-only statement."""


# ---------------------------------------------------------------- read-only check

_EXPLAIN = re.compile(
    r"^\s*explain\s+(?:analy[sz]e\s+)?(?:\([^()]*\)\s*)?(?P<inner>.*)$", re.I | re.S
)
_ALLOWED = "SELECT (also WITH, VALUES, FROM ..., DESCRIBE, SHOW, SUMMARIZE) or EXPLAIN of one"


def check_read_only(sql: str) -> None:
    """Raise :class:`QueryRefused` unless ``sql`` is one read-only statement (see module
    docstring); a syntax error raises DuckDB's ``ParserException``."""
    import duckdb

    statements = duckdb.extract_statements(sql)
    if len(statements) != 1:
        raise QueryRefused(
            f"give exactly one SQL statement, not {len(statements)}; allowed: {_ALLOWED}"
        )
    st = statements[0]
    kind = st.type
    if kind == duckdb.StatementType.SELECT:
        return
    if kind == duckdb.StatementType.EXPLAIN:
        m = _EXPLAIN.match(st.query)
        inner = duckdb.extract_statements(m.group("inner")) if m else []
        if len(inner) == 1 and inner[0].type == duckdb.StatementType.SELECT:
            return
        raise QueryRefused(f"EXPLAIN is allowed only of a SELECT; allowed: {_ALLOWED}")
    name = getattr(kind, "name", str(kind))
    raise QueryRefused(
        f"flowscore query is read-only: {name} statements are refused; allowed: {_ALLOWED}"
    )


# ---------------------------------------------------------------- views


def _quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _quote_str(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _null_as(name: str, duck_type: Any) -> str:
    return f"CAST(NULL AS {duck_type}) AS {_quote_ident(name)}"


def _empty_view(con: duckdb.DuckDBPyConnection, name: str, schema: pa.Schema) -> None:
    types = con.from_arrow(schema.empty_table()).types
    cols = ", ".join(_null_as(f.name, t) for f, t in zip(schema, types, strict=True))
    con.execute(f"CREATE VIEW {_quote_ident(name)} AS SELECT {cols} WHERE false")


def _table_view(
    con: duckdb.DuckDBPyConnection, catalog: Catalog, name: str, allowed: set[str]
) -> str:
    """Create view ``name``; returns how (``parquet``, ``arrow`` or ``empty``)."""
    from pipelines import tables as T

    tbl = T.load_table(catalog, name)
    if tbl is None:
        base = T.image_scores_arrow_schema(()) if name == T.IMAGE_SCORES else None
        base = base or (T.SCORING_ERRORS_SCHEMA if name == T.SCORING_ERRORS else T.RUNS_SCHEMA)
        _empty_view(con, name, base)
        return "empty"
    schema = T.arrow_schema_of(tbl)
    files, deletes = T.scan_files(tbl)
    if not files:
        _empty_view(con, name, schema)
        return "empty"
    paths = [T.local_path(f) for f in files]
    local = all(T.is_local_warehouse(f) for f in files)
    if not local or deletes or any(_GLOB_CHARS & set(p) for p in paths):
        data = tbl.scan().to_arrow()  # applies delete files; reads the table into memory
        con.register(f"__arrow_{name}", data)
        cols = ", ".join(_quote_ident(c) for c in schema.names)
        src = _quote_ident(f"__arrow_{name}")
        con.execute(f"CREATE VIEW {_quote_ident(name)} AS SELECT {cols} FROM {src}")
        return "arrow"
    # hive_partitioning=false: the model_version=… directories must not override (and
    # retype) the column stored in the files
    files_sql = ", ".join(_quote_str(p) for p in paths)
    source = f"read_parquet([{files_sql}], union_by_name=true, hive_partitioning=false)"
    present = {row[0] for row in con.execute(f"DESCRIBE SELECT * FROM {source}").fetchall()}
    types = con.from_arrow(schema.empty_table()).types
    cols = ", ".join(
        _quote_ident(f.name) if f.name in present else _null_as(f.name, t)
        for f, t in zip(schema, types, strict=True)
    )
    con.execute(f"CREATE VIEW {_quote_ident(name)} AS SELECT {cols} FROM {source}")
    allowed.update(paths)
    return "parquet"


def connect(
    catalog: Catalog | None = None,
    *,
    lock: bool = True,
    temp_dir: str | None = None,
    settings: Settings | None = None,
) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB connection with views ``image_scores``, ``scoring_errors`` and
    ``runs`` over the current snapshots (see the module docstring). With ``lock`` (default)
    the connection can then read only the current snapshots' data files, load no extension
    and change no setting. ``temp_dir``: where DuckDB may spill (the caller's private
    directory; default: none, DuckDB keeps everything in memory). ``settings``: the
    command's (the catalog when none is given; None: read from the environment). Raises
    :class:`pipelines.tables.TablesError` if the catalog cannot be opened."""
    import duckdb

    from pipelines import tables as T

    if catalog is None:
        catalog = T.load_catalog_(settings)
    config: dict[str, Any] = {
        "autoinstall_known_extensions": False,
        "autoload_known_extensions": False,
        "temp_directory": temp_dir or "",
    }
    con = duckdb.connect(":memory:", config=config)
    allowed: set[str] = set()
    for name in T.TABLES:
        _table_view(con, catalog, name, allowed)
    if lock:
        if allowed:
            files = ", ".join(_quote_str(p) for p in sorted(allowed))
            con.execute(f"SET allowed_paths = [{files}]")
        con.execute("SET enable_external_access = false")
        con.execute("SET lock_configuration = true")
    return con


# ---------------------------------------------------------------- formatting


def _f32_to_text_type(t: pa.DataType) -> pa.DataType | None:
    """The type to cast ``t`` to so that its float32 values become shortest decimal text,
    or None when ``t`` holds no float32."""
    if pa.types.is_float32(t) or pa.types.is_float16(t):
        return pa.string()
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        inner = _f32_to_text_type(t.value_type)
        return None if inner is None else pa.list_(inner)
    if pa.types.is_fixed_size_list(t):
        inner = _f32_to_text_type(t.value_type)
        return None if inner is None else pa.list_(inner)
    return None


def _text_to_float(v: Any) -> Any:
    if v is None:
        return None
    if isinstance(v, list):
        return [_text_to_float(x) for x in v]
    return float(v)


def _column_values(col: pa.ChunkedArray | pa.Array) -> list[Any]:
    """Python values of one column; float32 values as the Python float of their shortest
    decimal text (so that ``repr`` prints ``0.1``, not ``0.10000000149011612``)."""
    target = _f32_to_text_type(col.type)
    if target is None:
        return col.to_pylist()
    return [_text_to_float(v) for v in col.cast(target).to_pylist()]


def _jsonable(v: Any) -> Any:
    """A JSON-ready value: ISO timestamps, NaN/inf as None, decimals as numbers."""
    if v is None or isinstance(v, bool | int | str):
        return v
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, dt.datetime | dt.date | dt.time):
        return v.isoformat()
    if isinstance(v, decimal.Decimal):
        if not v.is_finite():
            return None
        return int(v) if v == v.to_integral_value() else float(v)
    if isinstance(v, list | tuple):
        return [_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, bytes | bytearray | memoryview):
        return base64.b64encode(bytes(v)).decode("ascii")
    return str(v)


def _text(v: Any) -> str:
    """One value as text for csv/table (NULL handled by the caller)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return repr(v) if math.isfinite(v) else str(v)
    if isinstance(v, dt.datetime | dt.date | dt.time):
        return v.isoformat()
    if isinstance(v, list | tuple | dict):
        return json.dumps(_jsonable(v))
    if isinstance(v, bytes | bytearray | memoryview):
        return base64.b64encode(bytes(v)).decode("ascii")
    return str(v)


class _Capped:
    """The rows of a reader, at most ``limit`` of them; ``cut`` once a row was left out."""

    def __init__(self, reader: pa.RecordBatchReader, limit: int) -> None:
        self.reader, self.limit, self.cut = reader, limit, False

    def __iter__(self) -> Iterator[list[Any]]:
        left = self.limit
        for batch in self.reader:
            if batch.num_rows > left:
                self.cut = True
                batch = batch.slice(0, left)
            left -= batch.num_rows
            cols = [_column_values(batch.column(i)) for i in range(batch.num_columns)]
            yield from (list(r) for r in zip(*cols, strict=True))
            if self.cut or left == 0:
                self.cut = self.cut or self._more()
                return

    def _more(self) -> bool:
        for batch in self.reader:
            if batch.num_rows:
                return True
        return False


def _rows(reader: pa.RecordBatchReader) -> Iterator[list[Any]]:
    return iter(_Capped(reader, 2**62))


def _is_numeric(t: pa.DataType) -> bool:
    return pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t)


def _cell(v: Any) -> str:
    if v is None:
        return "NULL"
    s = _text(v).replace("\r", "\\r").replace("\n", "\\n").replace("\t", "\\t")
    return s if len(s) <= MAX_CELL else s[: MAX_CELL - 1] + "…"


def format_table(schema: pa.Schema, rows: list[list[Any]]) -> str:
    """psql-style aligned text: header, rule, rows (numbers right-aligned), ``(N rows)``."""
    names = [f.name for f in schema]
    cells = [[_cell(v) for v in r] for r in rows]
    widths = [max([len(n), *(len(r[i]) for r in cells)]) for i, n in enumerate(names)]
    right = [_is_numeric(f.type) for f in schema]
    lines = [" " + " | ".join(n.center(w) for n, w in zip(names, widths, strict=True)).rstrip()]
    lines.append("-" + "-+-".join("-" * w for w in widths) + "-")
    for r in cells:
        parts = [
            c.rjust(w) if rj else c.ljust(w) for c, w, rj in zip(r, widths, right, strict=True)
        ]
        lines.append((" " + " | ".join(parts)).rstrip())
    lines.append(f"({len(rows)} row{'' if len(rows) == 1 else 's'})")
    return "\n".join(lines) + "\n"


def _write(reader: pa.RecordBatchReader, fmt: str, out: TextIO, max_rows: int = 2**62) -> bool:
    """Write the result; True if it had more than ``max_rows`` rows (the rest not written)."""
    schema = reader.schema
    rows = _Capped(reader, max_rows)
    if fmt == "table" and schema.names == ["explain_key", "explain_value"]:
        for _key, plan in rows:  # EXPLAIN: the plan as DuckDB draws it
            out.write(f"{plan}\n")
    elif fmt == "table":
        out.write(format_table(schema, list(rows)))
    elif fmt == "csv":
        w = csv.writer(out, lineterminator="\n")
        w.writerow(schema.names)
        for r in rows:
            w.writerow(["" if v is None else _text(v) for v in r])
    else:  # json: one array, streamed row by row
        out.write("[")
        first = True
        for r in rows:
            obj = {n: _jsonable(v) for n, v in zip(schema.names, r, strict=True)}
            out.write(("\n" if first else ",\n") + json.dumps(obj, ensure_ascii=False))
            first = False
        out.write("]\n" if first else "\n]\n")
    return rows.cut


def _reader(rel: Any) -> pa.RecordBatchReader:
    """A record-batch reader over a DuckDB relation (DuckDB 2.x and 1.x spellings)."""
    fn = getattr(rel, "to_arrow_reader", None) or rel.fetch_arrow_reader
    return fn(_BATCH)


# ---------------------------------------------------------------- entry point


DEFAULT_TIMEOUT_S = 300.0
DEFAULT_MAX_ROWS = 1_000_000


def run_query(
    sql: str,
    fmt: str = "table",
    out: TextIO | None = None,
    err: TextIO | None = None,
    *,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    max_rows: int = DEFAULT_MAX_ROWS,
    settings: Settings | None = None,
) -> int:
    """Run one read-only SQL statement over the tables and print the result to ``out``
    (default stdout) as ``table``, ``csv`` or ``json``, at most ``max_rows`` rows (a note on
    ``err`` when it cuts), interrupting it after ``timeout_s`` seconds. Returns the exit
    code: 0; 2 for a refused statement, a query DuckDB rejects, an unknown format, a bad
    limit or a catalog that cannot be opened; 1 when a table's files cannot be read or the
    query ran out of time. Messages go to ``err`` (default stderr)."""
    import duckdb

    out = out if out is not None else sys.stdout
    err = err if err is not None else sys.stderr

    def fail(msg: str) -> int:
        print(f"flowscore: error: {msg}", file=err)
        return EXIT_USAGE

    if fmt not in FORMATS:
        return fail(f"--format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    if not (math.isfinite(timeout_s) and timeout_s > 0) or max_rows < 1:
        return fail(f"--timeout must be > 0 and --max-rows >= 1, got {timeout_s}, {max_rows}")
    try:
        check_read_only(sql)
    except QueryRefused as e:
        return fail(str(e))
    except duckdb.Error as e:
        return fail(str(e))
    spill = tempfile.mkdtemp(prefix="flowscore-query-")  # private (0700), removed below
    try:
        return _run(sql, fmt, out, err, spill, timeout_s, max_rows, fail, settings)
    finally:
        shutil.rmtree(spill, ignore_errors=True)


def _run(
    sql: str,
    fmt: str,
    out: TextIO,
    err: TextIO,
    spill: str,
    timeout_s: float,
    max_rows: int,
    fail: Callable[[str], int],
    settings: Settings | None = None,
) -> int:
    import duckdb

    from pipelines.tables import TablesError

    try:
        con = connect(temp_dir=spill, settings=settings)
    except TablesError as e:  # the catalog cannot be opened: configuration
        return fail(str(e))
    except Exception as e:  # noqa: BLE001 - a table that cannot be read (missing files, …)
        fail(f"cannot read the tables: {type(e).__name__}: {e}")
        return EXIT_FAILED
    timer = threading.Timer(timeout_s, con.interrupt)
    timer.daemon = True
    timer.start()
    try:
        rel = con.sql(sql)
        if rel is None:  # pragma: no cover - check_read_only lets only queries through
            return fail("the statement returned no result")
        cut = _write(_reader(rel), fmt, out, max_rows)
    except duckdb.InterruptException:
        print(
            f"flowscore: error: the query ran longer than {timeout_s:g} s and was stopped "
            "(--timeout)",
            file=err,
        )
        return EXIT_FAILED
    except duckdb.Error as e:
        return fail(str(e))
    finally:
        timer.cancel()
        con.close()
    out.flush()
    if cut:
        print(
            f"flowscore: note: the result has more than {max_rows} rows; only the first "
            f"{max_rows} were printed (--max-rows)",
            file=err,
        )
    return EXIT_OK
