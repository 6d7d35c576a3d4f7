"""Read-only SQL over the result tables: one in-memory DuckDB connection with a view per
table (``flowscore query`` and the report read through it).

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
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

import pyarrow as pa

if TYPE_CHECKING:
    import duckdb
    from pyiceberg.catalog import Catalog

    from pipelines.settings import Settings

__all__ = ["QueryRefused", "check_read_only", "connect"]

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


def quote_ident(name: str) -> str:
    """A quoted SQL identifier."""
    return '"' + name.replace('"', '""') + '"'


def _quote_str(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _null_as(name: str, duck_type: Any) -> str:
    return f"CAST(NULL AS {duck_type}) AS {quote_ident(name)}"


def _empty_view(con: duckdb.DuckDBPyConnection, name: str, schema: pa.Schema) -> None:
    types = con.from_arrow(schema.empty_table()).types
    cols = ", ".join(_null_as(f.name, t) for f, t in zip(schema, types, strict=True))
    con.execute(f"CREATE VIEW {quote_ident(name)} AS SELECT {cols} WHERE false")


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
        cols = ", ".join(quote_ident(c) for c in schema.names)
        src = quote_ident(f"__arrow_{name}")
        con.execute(f"CREATE VIEW {quote_ident(name)} AS SELECT {cols} FROM {src}")
        return "arrow"
    # hive_partitioning=false: the model_version=… directories must not override (and
    # retype) the column stored in the files
    files_sql = ", ".join(_quote_str(p) for p in paths)
    source = f"read_parquet([{files_sql}], union_by_name=true, hive_partitioning=false)"
    present = {row[0] for row in con.execute(f"DESCRIBE SELECT * FROM {source}").fetchall()}
    types = con.from_arrow(schema.empty_table()).types
    cols = ", ".join(
        quote_ident(f.name) if f.name in present else _null_as(f.name, t)
        for f, t in zip(schema, types, strict=True)
    )
    con.execute(f"CREATE VIEW {quote_ident(name)} AS SELECT {cols} FROM {source}")
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
