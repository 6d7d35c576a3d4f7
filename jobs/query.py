"""``flowscore query "SQL" [--format table|csv|json]``: read-only SQL over the result tables
(the connection and its views: :mod:`pipelines.sql`), printed.

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
import shutil
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, TextIO

import pyarrow as pa

from pipelines.sql import QueryRefused, check_read_only, connect

if TYPE_CHECKING:
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
