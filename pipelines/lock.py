"""A lease lock per job, kept in the catalog's SQL database.

Two runs of one job must never interleave (DESIGN promise 6). The lock is a row of table
``flowscore_job_locks`` in the same database as the Iceberg SQL catalog (SQLite by default,
PostgreSQL in production), so it works whatever the warehouse is (local or ``s3://``) and
needs no extra service. Taking it is one atomic statement:

* ``INSERT`` a row for the job: succeeds only if no row exists;
* else ``UPDATE … WHERE job = ? AND expires_at < now``: takes over a lock whose lease
  expired, which happens only when its holder died (a live holder renews the lease every
  ``lease_s / 3`` seconds from a background thread).

The holder is ``host:pid`` plus a random token; release deletes the row only if the token
still matches.
"""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

__all__ = ["LockHeld", "JobLock", "LockInfo"]

TABLE = "flowscore_job_locks"


class LockHeld(RuntimeError):
    """Another live run holds the job's lock."""


@dataclass(frozen=True)
class LockInfo:
    job: str
    holder: str
    acquired_at: datetime
    expires_at: datetime


def _now() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


class JobLock:
    """``with JobLock(uri, job):`` holds the job's lock for the block, renewing its lease."""

    def __init__(self, db_uri: str, job: str, *, lease_s: float = 120.0) -> None:
        from sqlalchemy import Column, DateTime, MetaData, String, Table, create_engine
        from sqlalchemy.exc import OperationalError, ProgrammingError

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
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

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

        now = _now()
        values: dict[str, Any] = {
            "holder": self.holder,
            "token": self.token,
            "acquired_at": now,
            "expires_at": now + timedelta(seconds=self.lease_s),
        }
        try:
            with self.engine.begin() as con:
                con.execute(insert(self.table).values(job=self.job, **values))
        except IntegrityError:
            before = self.current()
            with self.engine.begin() as con:
                res = con.execute(
                    update(self.table)
                    .where(self.table.c.job == self.job, self.table.c.expires_at < now)
                    .values(**values)
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

    def _renew(self) -> None:
        from sqlalchemy import update

        while not self._stop.wait(self.lease_s / 3):
            try:
                with self.engine.begin() as con:
                    con.execute(
                        update(self.table)
                        .where(self.table.c.job == self.job, self.table.c.token == self.token)
                        .values(expires_at=_now() + timedelta(seconds=self.lease_s))
                    )
            except Exception:  # noqa: BLE001 - retried at the next tick; the lease is long
                time.sleep(1)

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
