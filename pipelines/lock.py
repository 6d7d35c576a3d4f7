"""A lease lock per job, kept in the catalog's SQL database, with fencing.

Two runs of one job must never interleave (DESIGN promise 6). The lock is a row of table
``flowscore_job_locks`` in the same database as the Iceberg SQL catalog (SQLite by default,
PostgreSQL in production), so it works whatever the warehouse is (local or ``s3://``) and
needs no extra service. Every time in it is the **database's** clock (``now()`` read in the
same transaction), so hosts with skewed clocks that share a PostgreSQL catalog agree on
whether a lease has expired. Taking it is one atomic statement:

* ``INSERT`` a row for the job: succeeds only if no row exists;
* else ``UPDATE … WHERE job = ? AND expires_at < now``: takes over a lock whose lease
  expired, which happens only when its holder died or stopped (a live holder renews the
  lease every ``lease_s / 3`` seconds from a background thread).

Each holder has a random token. **Fencing**, in two layers:

* :meth:`JobLock.fencing` makes the token check part of the commit itself. While it is
  active, every Iceberg commit of a guarded table through a SQL catalog on the lock's
  database (pyiceberg's ``UPDATE iceberg_tables … WHERE metadata_location = <old>``) first
  renews this run's lease *on the same connection, in the same transaction*, and only if the
  lock row still carries this run's token; otherwise :class:`LockLost` is raised there and
  the transaction rolls back: the snapshot is never published. The renewal's row write
  serialises it with a takeover (SQLite's write lock, PostgreSQL's row lock), so a takeover
  either happened before (the commit fails) or waits until the commit is over.
* :meth:`JobLock.check`, called before a commit's data files are written, stops a run that
  has lost its lock early, with the same message; the renewal thread also notices
  (:attr:`JobLock.lost`).

A run that was paused (SIGSTOP, a long GC, a network partition) past its lease and whose
lock was taken over therefore commits nothing more, wherever the pause fell.

Release deletes the row only if the token still matches.
"""

from __future__ import annotations

import os
import socket
import threading
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

__all__ = ["LockHeld", "LockLost", "JobLock", "LockInfo"]

TABLE = "flowscore_job_locks"


class LockHeld(RuntimeError):
    """Another live run holds the job's lock."""


class LockLost(RuntimeError):
    """This run's lease expired and another run took the lock over: it must commit nothing
    more."""


@dataclass(frozen=True)
class LockInfo:
    job: str
    holder: str
    acquired_at: datetime
    expires_at: datetime


_FENCING = "flowscore_fencing"  # Connection.info flag: the fence's own statements


def _values(parameters: Any) -> Iterator[Any]:
    """The bound values of a statement's parameters (a tuple, a dict or a list of them)."""
    if isinstance(parameters, dict):
        yield from parameters.values()
    elif isinstance(parameters, list | tuple):
        for p in parameters:
            if isinstance(p, dict | list | tuple):
                yield from _values(p)
            else:
                yield p


def _naive_utc(value: Any) -> datetime:
    """A database timestamp as naive UTC (SQLite gives text, PostgreSQL an aware datetime)."""
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    if not isinstance(value, datetime):
        raise TypeError(f"the database returned {value!r} for the current time")
    if value.tzinfo is not None:
        value = value.astimezone(UTC).replace(tzinfo=None)
    return value


class JobLock:
    """``with JobLock(uri, job):`` holds the job's lock for the block, renewing its lease;
    call :meth:`check` before each commit."""

    def __init__(self, db_uri: str, job: str, *, lease_s: float = 120.0) -> None:
        from sqlalchemy import Column, DateTime, MetaData, String, Table, create_engine
        from sqlalchemy.exc import OperationalError, ProgrammingError

        if not lease_s > 0:
            raise ValueError(f"the lock lease must be > 0 seconds, got {lease_s!r}")
        self.job = job
        self.lease_s = lease_s
        self.token = uuid.uuid4().hex
        self.holder = f"{socket.gethostname()}:{os.getpid()}"
        self.engine = create_engine(db_uri)
        meta = MetaData()
        self.table = Table(
            TABLE,
            meta,
            Column("job", String(255), primary_key=True),
            Column("holder", String(255), nullable=False),
            Column("token", String(64), nullable=False),
            Column("acquired_at", DateTime, nullable=False),
            Column("expires_at", DateTime, nullable=False),
        )
        try:
            meta.create_all(self.engine, checkfirst=True)
        except (OperationalError, ProgrammingError):
            # another run created the table between the check and the CREATE: it is there now
            meta.create_all(self.engine, checkfirst=True)
        self.took_over: LockInfo | None = None
        self.lost: str | None = None  # why, once the renewal thread found the lock lost
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _db_now(self, con: Any) -> datetime:
        """The database's current time (naive UTC), read on ``con``."""
        from sqlalchemy import func, select, text

        if self.engine.dialect.name == "sqlite":  # CURRENT_TIMESTAMP has whole seconds only
            value = con.execute(text("SELECT strftime('%Y-%m-%d %H:%M:%f', 'now')")).scalar_one()
        else:
            value = con.execute(select(func.now())).scalar_one()
        return _naive_utc(value)

    def current(self) -> LockInfo | None:
        from sqlalchemy import select

        with self.engine.connect() as con:
            row = con.execute(select(self.table).where(self.table.c.job == self.job)).first()
        if row is None:
            return None
        return LockInfo(row.job, row.holder, row.acquired_at, row.expires_at)

    def acquire(self) -> None:
        from sqlalchemy import insert, update
        from sqlalchemy.exc import IntegrityError

        def values(now: datetime) -> dict[str, Any]:
            return {
                "holder": self.holder,
                "token": self.token,
                "acquired_at": now,
                "expires_at": now + timedelta(seconds=self.lease_s),
            }

        try:
            with self.engine.begin() as con:
                con.execute(insert(self.table).values(job=self.job, **values(self._db_now(con))))
        except IntegrityError:
            before = self.current()
            with self.engine.begin() as con:
                now = self._db_now(con)
                res = con.execute(
                    update(self.table)
                    .where(self.table.c.job == self.job, self.table.c.expires_at < now)
                    .values(**values(now))
                )
            if res.rowcount != 1:
                held = self.current()
                who = held.holder if held else "another run"
                since = f" since {held.acquired_at:%Y-%m-%d %H:%M:%S} UTC" if held else ""
                raise LockHeld(
                    f"job {self.job!r} is already running ({who}{since}); "
                    "this run exits without doing anything"
                ) from None
            self.took_over = before
        self._thread = threading.Thread(target=self._renew, daemon=True)
        self._thread.start()

    def _extend_on(self, con: Any) -> bool:
        """Renew the lease on ``con`` (in its transaction) if the row still carries this run's
        token; False if it does not."""
        from sqlalchemy import update

        now = self._db_now(con)
        res = con.execute(
            update(self.table)
            .where(self.table.c.job == self.job, self.table.c.token == self.token)
            .values(expires_at=now + timedelta(seconds=self.lease_s))
        )
        return bool(res.rowcount == 1)

    def _extend(self) -> bool:
        with self.engine.begin() as con:
            return self._extend_on(con)

    def _lost_message(self, con: Any = None) -> str:
        from sqlalchemy import select

        query = select(self.table.c.holder).where(self.table.c.job == self.job)
        if con is None:
            with self.engine.connect() as c:
                holder = c.execute(query).scalar()
        else:
            holder = con.execute(query).scalar()
        who = f" by {holder}" if holder else ""
        return (
            f"job {self.job!r}: this run lost its lock (its {self.lease_s:g} s lease expired "
            f"and the lock was taken over{who}); it commits nothing more"
        )

    def _renew(self) -> None:
        while not self._stop.wait(self.lease_s / 3):
            try:
                if not self._extend():
                    self.lost = self._lost_message()
                    return
            except Exception:  # noqa: BLE001 - retried at the next tick; check() decides
                continue

    def check(self) -> None:
        """Fencing, right before a commit: renew the lease if this run still holds the lock,
        else raise :class:`LockLost`. A database error propagates (the commit would fail
        too)."""
        if self.lost is None and self._extend():
            return
        self.lost = self.lost or self._lost_message()
        raise LockLost(self.lost)

    @contextmanager
    def fencing(self, tables: Iterable[str]) -> Iterator[None]:
        """While active, an Iceberg commit of one of ``tables`` (bare names, e.g.
        ``image_scores``) made *in this process* through a SQL catalog on this lock's database
        renews the lease in the commit's own transaction, and raises :class:`LockLost` (the
        commit rolled back) if the lock is no longer this run's."""
        from sqlalchemy import event
        from sqlalchemy.engine import Engine

        guarded = frozenset(tables)

        def before_cursor_execute(
            conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, many: bool
        ) -> None:
            if conn.info.get(_FENCING) or conn.engine.url != self.engine.url:
                return
            if not statement.lstrip().upper().startswith("UPDATE ICEBERG_TABLES"):
                return
            if not guarded.intersection(_values(parameters)):
                return
            conn.info[_FENCING] = True
            try:
                if self._extend_on(conn):
                    return
                self.lost = self.lost or self._lost_message(conn)
            finally:
                conn.info.pop(_FENCING, None)
            raise LockLost(self.lost)

        event.listen(Engine, "before_cursor_execute", before_cursor_execute)
        try:
            yield
        finally:
            event.remove(Engine, "before_cursor_execute", before_cursor_execute)

    def release(self) -> None:
        from sqlalchemy import delete

        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        with self.engine.begin() as con:
            con.execute(
                delete(self.table).where(
                    self.table.c.job == self.job, self.table.c.token == self.token
                )
            )
        self.engine.dispose()

    def __enter__(self) -> JobLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
