"""Table upkeep for archives kept for years: compaction, snapshot expiry, orphan removal.

Every scoring commit adds data files and a snapshot; a year of nightly runs leaves thousands
of both, and every ``query`` and every nightly diff pays for them. :func:`maintain_table`
does three things to one table:

1. **Compaction.** Data files smaller than 3/4 of the target size are packed, per partition
   (per ``model_version`` in ``image_scores``), into groups of at most the target size; each
   group of two or more is read and written again as one file (pyiceberg's own writer, so the
   partition values and column statistics are right). The old files leave and the new ones
   arrive in **one** OVERWRITE snapshot, and the rows are counted on the way: a group whose
   output does not hold exactly its input's rows stops the run before anything is committed.
2. **Snapshot expiry** (pyiceberg's ``ExpireSnapshots``): snapshots older than the retention
   period go, except the newest ``keep_last`` and the current one. Expiry, compaction and the
   table property ``flowscore.maintained-at`` are one transaction: **one catalog commit** per
   table, so a kill leaves the table either as it was or maintained.
3. **Orphan removal**, after that commit: files under the table's ``data/`` and ``metadata/``
   folders that no remaining snapshot, manifest, metadata-log entry or statistics file names,
   and that are older than ``orphan_age_s`` (a writer that is mid-commit has written files
   that no snapshot names *yet*: the age keeps them). Only Iceberg's own kinds of file
   (``.parquet``, ``.avro``, ``.metadata.json``) are ever deleted. A kill here leaves some
   orphans for the next run; it never removes a file a snapshot needs.

pyiceberg 0.12 (pinned) has snapshot expiry but no compaction or orphan API. Compaction uses
its public ``Transaction.update_snapshot().overwrite()`` with ``delete_data_file`` /
``append_data_file``, its ``ArrowScan`` to read a group (schema evolution and field ids
handled there) and its ``_dataframe_to_data_files`` to write one, the same writer its
``append`` uses; orphans compare a listing of pyiceberg's own FileIO file system with the
metadata. A concurrent commit (a nightly run writing meanwhile) makes the catalog refuse
one of the two commits and pyiceberg's conflict checks refuse an overwrite of files that
are gone: the maintenance commit is then planned again from the new snapshot
(:func:`pipelines.tables._retry_commit`).

Rows, their values and the current snapshot's row count are unchanged by a maintenance run,
so ``query`` answers the same before and after; the order of rows within a file may differ.
"""

from __future__ import annotations

import itertools
import re
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from .log import Log
from .tables import TablesError, _retry_commit, qualified

if TYPE_CHECKING:
    from pyiceberg.catalog import Catalog
    from pyiceberg.manifest import DataFile
    from pyiceberg.table import Table

__all__ = [
    "MAINTAINED_PROPERTY",
    "MaintainPolicy",
    "TableReport",
    "parse_duration",
    "plan_compaction",
    "snapshots_to_expire",
    "maintain_table",
    "Hook",
    "last_maintained",
]

MAINTAINED_PROPERTY = "flowscore.maintained-at"
"""Table property set by every maintenance commit: its time, ISO 8601 UTC."""

DAY = 86_400.0
_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": DAY, "w": 7 * DAY}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")
_ICEBERG_FILE = re.compile(r"(\.parquet|\.avro|\.metadata\.json)$")


def parse_duration(text: str) -> float:
    """Seconds in ``"30d"``, ``"12h"``, ``"90m"``, ``"45s"`` or ``"2w"``; ValueError naming
    the accepted forms otherwise."""
    m = _DURATION.match(str(text))
    if not m:
        raise ValueError(f"expected a duration such as 30d, 12h, 90m, 45s or 2w, got {text!r}")
    return float(m.group(1)) * _UNITS[m.group(2)]


@dataclass(frozen=True)
class MaintainPolicy:
    """What a maintenance run does. Defaults: 128 MiB files, snapshots kept 30 days (and
    always the newest 5), orphans removed once 3 days old."""

    target_file_bytes: int = 128 * 2**20
    retain_s: float = 30 * DAY
    keep_last: int = 5
    orphan_age_s: float = 3 * DAY
    dry_run: bool = False

    def __post_init__(self) -> None:
        if self.target_file_bytes < 1:
            raise ValueError(f"target file size must be >= 1 byte, got {self.target_file_bytes}")
        if not self.retain_s >= 0 or not self.orphan_age_s >= 0:
            raise ValueError("retention and orphan age must be >= 0 seconds")
        if self.keep_last < 1:
            raise ValueError(f"keep_last must be >= 1 (the current snapshot), got {self.keep_last}")


@dataclass
class TableReport:
    table: str
    rows: int = 0
    files_before: int = 0
    files_after: int = 0
    groups: int = 0
    snapshots_before: int = 0
    snapshots_after: int = 0
    orphans: int = 0
    orphan_bytes: int = 0
    committed: bool = False
    dry_run: bool = False
    expired: list[int] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def line(self) -> str:
        """One line for the log: what changed (or, in a dry run, what would)."""
        if not self.snapshots_before and self.notes:
            return f"{self.table}: {'; '.join(self.notes)}"
        parts = [
            f"{self.table}: {self.rows} rows",
            f"data files {self.files_before} -> {self.files_after}"
            + (f" ({self.groups} groups compacted)" if self.groups else ""),
            f"snapshots {self.snapshots_before} -> {self.snapshots_after}",
            f"{self.orphans} orphan files ({self.orphan_bytes / 2**20:.1f} MiB)",
        ]
        text = "; ".join(parts) + (f" [{'; '.join(self.notes)}]" if self.notes else "")
        return text + (" (dry run: nothing changed)" if self.dry_run else "")


# ---------------------------------------------------------------- planning (pure)


def plan_compaction(
    files: Iterable[Any],
    target_bytes: int,
    *,
    key: Callable[[Any], Any] = lambda f: (f.spec_id, f.partition),
    size: Callable[[Any], int] = lambda f: int(f.file_size_in_bytes),
    order: Callable[[Any], Any] | None = None,
) -> list[list[Any]]:
    """Groups of small files to rewrite as one each: per ``key`` (spec and partition),
    the files below 3/4 of ``target_bytes`` (Iceberg's default minimum), taken in ``order``
    (default: smallest first) and packed greedily into groups of at most ``target_bytes``;
    groups of one are left alone (rewriting a single file gains nothing). Packing files in
    the order of their first ``image_uri`` keeps a compacted file to neighbouring folders
    (one year, one camera), so a query on one year still skips the other years' files by
    their statistics."""
    small = 0.75 * target_bytes
    by_key: dict[Any, list[Any]] = {}
    for f in files:
        if size(f) < small:
            by_key.setdefault(key(f), []).append(f)
    groups: list[list[Any]] = []
    for members in by_key.values():
        members.sort(key=order or size)
        current: list[Any] = []
        total = 0
        for f in members:
            if current and total + size(f) > target_bytes:
                groups.append(current)
                current, total = [], 0
            current.append(f)
            total += size(f)
        groups.append(current)
    return [g for g in groups if len(g) >= 2]


def snapshots_to_expire(
    snapshots: Sequence[tuple[int, int]],
    *,
    current: int | None,
    protected: Iterable[int] = (),
    now_ms: int,
    retain_s: float,
    keep_last: int,
) -> list[int]:
    """Ids among ``(snapshot_id, timestamp_ms)`` older than ``retain_s``, never the newest
    ``keep_last``, the current snapshot or a ``protected`` one (a branch or tag head)."""
    newest = sorted(snapshots, key=lambda s: (s[1], s[0]), reverse=True)
    keep = {sid for sid, _ in newest[:keep_last]} | set(protected)
    if current is not None:
        keep.add(current)
    cutoff = now_ms - retain_s * 1000.0
    return [sid for sid, ts in newest if ts < cutoff and sid not in keep]


# ---------------------------------------------------------------- one table


def last_maintained(tbl: Table) -> datetime | None:
    """When the table was last maintained (its :data:`MAINTAINED_PROPERTY`), or None."""
    raw = tbl.properties.get(MAINTAINED_PROPERTY)
    if not raw:
        return None
    try:
        return datetime.fromisoformat(raw)
    except ValueError:
        return None


def _path_order(tbl: Table) -> Callable[[Any], Any]:
    """A data file's sort key for packing: the lower bound of its ``image_uri`` column (the
    path, so year= and camera= folders stay together), then its own path."""
    try:
        fid = tbl.schema().find_field("image_uri").field_id
    except ValueError:
        return lambda f: (b"", f.file_path)
    return lambda f: ((f.lower_bounds or {}).get(fid, b""), f.file_path)


def _read_group(tbl: Table, group: Sequence[DataFile]) -> Any:
    from pyiceberg.expressions import AlwaysTrue
    from pyiceberg.io.pyarrow import ArrowScan
    from pyiceberg.table import FileScanTask

    scan = ArrowScan(tbl.metadata, tbl.io, tbl.schema(), AlwaysTrue())
    return scan.to_table([FileScanTask(f) for f in group])


Hook = Callable[[str], None]
"""Called at named points of a run ("written": compacted files written, not committed;
"committed": after the commit; "sweeping": after the first orphan was deleted); the fault
tests kill the process there."""


def _no_hook(point: str) -> None:
    pass


def _commit(
    catalog: Catalog,
    name: str,
    policy: MaintainPolicy,
    report: TableReport,
    log: Log,
    hook: Hook = _no_hook,
) -> None:
    """Compaction, expiry and the maintained-at property in one transaction (retried from
    scratch when another commit got in first)."""
    from pyiceberg.io.pyarrow import _dataframe_to_data_files
    from pyiceberg.table.update.snapshot import ExpireSnapshots

    def attempt() -> None:
        tbl = catalog.load_table(qualified(name))
        report.snapshots_before = len(tbl.metadata.snapshots)
        current = tbl.current_snapshot()
        tasks = list(tbl.scan().plan_files()) if current is not None else []
        report.rows = sum(int(t.file.record_count) for t in tasks)
        report.files_before = report.files_after = len(tasks)
        if any(t.delete_files for t in tasks):
            # flowscore writes copy-on-write only; delete files mean another writer: leave them
            groups: list[list[Any]] = []
            report.notes.append("has delete files: not compacted")
        else:
            default_spec = tbl.metadata.default_spec_id
            groups = [
                g
                for g in plan_compaction(
                    [t.file for t in tasks], policy.target_file_bytes, order=_path_order(tbl)
                )
                if g[0].spec_id == default_spec
            ]
        now = datetime.now(UTC)
        protected = {ref.snapshot_id for ref in tbl.metadata.refs.values()}
        expire = snapshots_to_expire(
            [(s.snapshot_id, s.timestamp_ms) for s in tbl.metadata.snapshots],
            current=current.snapshot_id if current is not None else None,
            protected=protected,
            now_ms=int(now.timestamp() * 1000),
            retain_s=policy.retain_s,
            keep_last=policy.keep_last,
        )
        report.groups = len(groups)
        report.expired = expire
        gone = sum(len(g) for g in groups)
        report.snapshots_after = report.snapshots_before - len(expire) + (1 if groups else 0)
        if policy.dry_run:
            report.files_after = report.files_before - gone + len(groups)
            report.dry_run = True
            return
        written = 0
        with tbl.transaction() as tx:
            if groups:
                props = {"flowscore.operation": "compact"}
                with tx.update_snapshot(snapshot_properties=props).overwrite() as ow:
                    counter = itertools.count(0)
                    for i, group in enumerate(groups):
                        data = _read_group(tbl, group)
                        expected = sum(int(f.record_count) for f in group)
                        if data.num_rows != expected:
                            raise TablesError(
                                f"{name}: compaction read {data.num_rows} rows from "
                                f"{len(group)} files that hold {expected}; nothing committed"
                            )
                        out = list(
                            _dataframe_to_data_files(
                                table_metadata=tx.table_metadata,
                                df=data,
                                io=tbl.io,
                                write_uuid=ow.commit_uuid,
                                counter=counter,
                            )
                        )
                        if sum(int(f.record_count) for f in out) != expected:
                            raise TablesError(
                                f"{name}: compaction wrote a different number of rows than "
                                f"it read ({expected}); nothing committed"
                            )
                        for f in out:
                            ow.append_data_file(f)
                        for f in group:
                            ow.delete_data_file(f)
                        written += len(out)
                        log(
                            f"  {name}: group {i + 1}/{len(groups)}: "
                            f"{len(group)} files -> {len(out)}"
                        )
                hook("written")
            if expire:
                ExpireSnapshots(tx).by_ids(expire).commit()
            tx.set_properties({MAINTAINED_PROPERTY: now.isoformat(timespec="seconds")})
        report.files_after = report.files_before - gone + written
        report.snapshots_after = report.snapshots_before - len(expire) + (1 if groups else 0)
        report.committed = True

    _retry_commit(attempt)
    if report.committed:
        hook("committed")


def _path_key(uri: str) -> str:
    """A location as a file system path key: ``s3://b/k`` -> ``b/k``, ``file:///p`` -> ``/p``."""
    u = urlparse(uri)
    if u.scheme in ("", "file"):
        return u.path or uri
    return f"{u.netloc}{u.path}"


def _referenced(tbl: Table, expired: Iterable[int] = ()) -> set[str]:
    """Every file the table's metadata names: metadata files in its log, each snapshot's
    manifest list, manifests and their data files (deleted entries too), statistics. The
    ``expired`` snapshots are left out (a dry run counts what its expiry would free)."""
    gone = set(expired)
    md = tbl.metadata
    refs = {tbl.metadata_location, *(e.metadata_file for e in md.metadata_log)}
    refs |= {s.statistics_path for s in md.statistics}
    refs |= {s.statistics_path for s in getattr(md, "partition_statistics", [])}
    seen: set[str] = set()
    for snap in md.snapshots:
        if snap.snapshot_id in gone:
            continue
        refs.add(snap.manifest_list)
        for m in snap.manifests(tbl.io):
            if m.manifest_path in seen:
                continue
            seen.add(m.manifest_path)
            refs.add(m.manifest_path)
            for entry in m.fetch_manifest_entry(tbl.io, discard_deleted=False):
                refs.add(entry.data_file.file_path)
    return {_path_key(r) for r in refs}


def _remove_orphans(
    catalog: Catalog,
    name: str,
    policy: MaintainPolicy,
    report: TableReport,
    log: Log,
    hook: Hook = _no_hook,
) -> None:
    from pyarrow.fs import FileSelector, FileType
    from pyiceberg.io.pyarrow import PyArrowFileIO

    tbl = catalog.load_table(qualified(name))
    if not isinstance(tbl.io, PyArrowFileIO):
        report.notes.append(f"orphans not checked ({type(tbl.io).__name__} file IO)")
        return
    loc = urlparse(tbl.location())
    fs = tbl.io.fs_by_scheme(loc.scheme or "file", loc.netloc or None)
    root = _path_key(tbl.location()).rstrip("/")
    refs = _referenced(tbl, report.expired if policy.dry_run else ())
    cutoff = time.time() - policy.orphan_age_s
    for sub in ("data", "metadata"):
        try:
            infos = fs.get_file_info(FileSelector(f"{root}/{sub}", recursive=True))
        except FileNotFoundError:
            continue
        for info in infos:
            if info.type != FileType.File or not _ICEBERG_FILE.search(info.path):
                continue
            if info.path in refs or info.mtime is None or info.mtime.timestamp() > cutoff:
                continue
            report.orphans += 1
            report.orphan_bytes += int(info.size or 0)
            if not policy.dry_run:
                fs.delete_file(info.path)
                if report.orphans == 1:
                    hook("sweeping")
    if report.orphans and not policy.dry_run:
        log(f"  {name}: removed {report.orphans} orphan files")


def maintain_table(
    catalog: Catalog,
    name: str,
    policy: MaintainPolicy,
    log: Log,
    *,
    check: Callable[[], None] = lambda: None,
    hook: Hook = _no_hook,
) -> TableReport:
    """Compact, expire and sweep one table (see the module docstring). ``check`` is called
    before the commit and before the sweep (a lock's :meth:`~pipelines.lock.JobLock.check`);
    ``hook`` at the named points of :data:`Hook`."""
    report = TableReport(table=name)
    if catalog.table_exists(qualified(name)) is False:
        report.notes.append("no such table yet: nothing to do")
        return report
    check()
    _commit(catalog, name, policy, report, log, hook)
    check()
    _remove_orphans(catalog, name, policy, report, log, hook)
    return report
