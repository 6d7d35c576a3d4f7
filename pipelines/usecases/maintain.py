"""Maintaining the result tables (``flowscore maintain``): compaction, snapshot expiry and
orphan removal (:mod:`pipelines.maintenance`), under a lock of its own, one commit per table.
Also run by the nightly job when its spec says ``[maintain] every = "7d"``."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import UTC, datetime

from ..log import Log
from ..maintenance import MaintainPolicy, TableReport
from ..settings import Settings

__all__ = ["MAINTAIN_LOCK", "MaintainUsageError", "run_maintain", "maintain_tables", "is_due"]

MAINTAIN_LOCK = "flowscore-maintain"
"""The lock's name: one maintenance run at a time over the catalog's tables."""


class MaintainUsageError(ValueError):
    """A bad table name, policy or catalog: exit code 2."""


def _check_tables(names: Sequence[str]) -> list[str]:
    from pipelines import tables

    unknown = [n for n in names if n not in tables.TABLES]
    if unknown:
        raise MaintainUsageError(
            f"unknown table {unknown[0]!r} (the tables are {', '.join(tables.TABLES)})"
        )
    return list(dict.fromkeys(names)) or list(tables.TABLES)


def _fault_hook(settings: Settings | None) -> Callable[[str], None]:
    """Test hook: ``FLOWSCORE_FAULT_MAINTAIN=POINT`` (``Settings.maintain_fault``) kills this
    process (SIGKILL, as a crash or an OOM kill would) at that point of the first table
    maintained there."""
    import os
    import signal

    from ..settings import current

    wanted = (settings or current()).maintain_fault

    def hook(point: str) -> None:
        if wanted and point == wanted:
            os.kill(os.getpid(), signal.SIGKILL)

    return hook


def maintain_tables(
    names: Sequence[str],
    policy: MaintainPolicy,
    log: Log,
    *,
    check: Callable[[], None],
    settings: Settings | None = None,
) -> list[TableReport]:
    """Maintain each table in turn with the lock already held (``check`` is its check)."""
    from pipelines import tables
    from pipelines.maintenance import maintain_table

    catalog = tables.load_catalog_(settings)
    hook = _fault_hook(settings)
    reports = []
    for name in _check_tables(names):
        log(f"maintaining {name} ...")
        reports.append(maintain_table(catalog, name, policy, log, check=check, hook=hook))
    return reports


def is_due(every_s: float, settings: Settings | None = None) -> bool:
    """Whether ``image_scores`` was last maintained more than ``every_s`` ago (or never)."""
    from pipelines import tables
    from pipelines.maintenance import last_maintained

    tbl = tables.load_table(tables.load_catalog_(settings), tables.IMAGE_SCORES)
    if tbl is None:
        return False
    when = last_maintained(tbl)
    return when is None or (datetime.now(UTC) - when).total_seconds() >= every_s


def run_maintain(
    names: Sequence[str],
    policy: MaintainPolicy,
    log: Log,
    out: Callable[[str], None],
    settings: Settings | None = None,
) -> int:
    """The command: take the maintenance lock, maintain the tables, print one line each."""
    from pipelines import tables
    from pipelines.lock import JobLock, LockHeld, LockLost
    from pipelines.settings import SettingError, current

    from .nightly import JobUsageError, lock_lease_s

    names = _check_tables(names)
    try:
        settings = settings or current()
        lease = lock_lease_s(settings)
        tables.load_catalog_(settings)
    except (JobUsageError, tables.TablesError, SettingError) as e:
        raise MaintainUsageError(str(e)) from e
    lock = JobLock(tables.catalog_config(settings)["uri"], MAINTAIN_LOCK, lease_s=lease)
    try:
        lock.acquire()
    except LockHeld as e:
        raise MaintainUsageError(str(e)) from e
    if lock.took_over is not None:
        log(f"took over the maintenance lock of {lock.took_over.holder} (its lease expired)")
    try:
        with lock.fencing(names):
            reports = maintain_tables(names, policy, log, check=lock.check, settings=settings)
    except LockLost as e:
        log(str(e))
        return 4
    finally:
        lock.release()
    for r in reports:
        out(r.line())
    return 0
