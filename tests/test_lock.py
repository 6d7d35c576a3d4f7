"""The job lock (``pipelines.lock``): leases on the database's clock, fencing before commits.
A real SQLite database file; no Ray, no servers."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

import pipelines.lock as lock_mod
from pipelines.lock import JobLock, LockHeld, LockLost


@pytest.fixture
def db(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'catalog.db'}"


def _pause(lock: JobLock) -> None:
    """What SIGSTOP does to a holder: its renewal thread stops renewing."""
    lock._stop.set()
    assert lock._thread is not None
    lock._thread.join(timeout=5)


def test_a_paused_holder_whose_lock_was_taken_over_is_fenced_off(db):
    first = JobLock(db, "nightly", lease_s=0.6)
    first.acquire()
    first.check()  # holds it: the check renews and passes
    _pause(first)
    time.sleep(1.0)  # past its lease
    second = JobLock(db, "nightly", lease_s=30)
    second.acquire()  # takes over
    assert second.took_over is not None and second.took_over.holder == first.holder
    with pytest.raises(LockLost, match="lost its lock.*taken over by .*commits nothing more"):
        first.check()  # what the first run does right before its next commit
    with pytest.raises(LockLost):
        first.check()  # and stays fenced off
    first.release()  # deletes nothing of the second run's
    info = second.current()
    assert info is not None and info.holder == second.holder
    second.check()
    second.release()
    assert second.current() is None


def test_the_renewal_thread_notices_a_lost_lock(db):
    first = JobLock(db, "nightly", lease_s=0.6)
    first.acquire()
    # another run overwrites the row (what a takeover does), while the holder runs on
    from sqlalchemy import update

    with first.engine.begin() as con:
        con.execute(update(first.table).values(token="someone-else", holder="other:1"))
    deadline = time.monotonic() + 5
    while first.lost is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert first.lost is not None and "other:1" in first.lost
    with pytest.raises(LockLost):
        first.check()
    first.release()


def _skew_local_clock(monkeypatch: pytest.MonkeyPatch, hours: float) -> None:
    """A host whose clock is ``hours`` off: every local clock the lock module could read
    (``_now``, which older versions took lease times from, and ``datetime.now``)."""
    real = datetime

    class Skewed(datetime):
        @classmethod
        def now(cls, tz=None):  # type: ignore[override]
            return real.now(tz) + timedelta(hours=hours)

    monkeypatch.setattr(
        lock_mod, "_now", lambda: Skewed.now(UTC).replace(tzinfo=None), raising=False
    )
    monkeypatch.setattr(time, "time", lambda: real.now(UTC).timestamp() + hours * 3600)


@pytest.mark.parametrize("hours", [1, -1], ids=["newcomer-ahead", "holder-behind"])
def test_a_skewed_host_clock_neither_steals_nor_loses_a_live_lease(db, monkeypatch, hours):
    """Lease times come from the database: a newcomer whose clock is an hour ahead does not
    see a live lease as expired, and a holder whose clock is an hour behind does not write a
    lease that is already over."""
    with monkeypatch.context() as m:
        if hours < 0:
            _skew_local_clock(m, hours)
        holder = JobLock(db, "nightly", lease_s=60)
        holder.acquire()
    try:
        with monkeypatch.context() as m:
            if hours > 0:
                _skew_local_clock(m, hours)
            with pytest.raises(LockHeld, match="already running"):
                JobLock(db, "nightly", lease_s=60).acquire()
        info = holder.current()
        assert info is not None
        now = datetime.now(UTC).replace(tzinfo=None)
        assert abs((info.expires_at - now).total_seconds() - 60) < 10  # the database's clock
    finally:
        holder.release()


def test_lease_must_be_positive(db):
    with pytest.raises(ValueError, match="lease must be > 0"):
        JobLock(db, "nightly", lease_s=0)


def test_the_fence_is_part_of_the_iceberg_commit(tmp_path, db):
    """A pyiceberg SQL catalog on the lock's database: inside ``fencing``, a commit of a
    guarded table renews the lease in its own transaction; once the lock was taken over, the
    commit raises LockLost and publishes no snapshot. Unguarded tables are not fenced."""
    import pyarrow as pa
    from pyiceberg.catalog.sql import SqlCatalog

    catalog = SqlCatalog("t", uri=db, warehouse=f"file://{tmp_path / 'wh'}")
    catalog.create_namespace("ns")
    data = pa.table({"x": pa.array([1, 2], pa.int64())})
    guarded = catalog.create_table("ns.image_scores", schema=data.schema)
    other = catalog.create_table("ns.runs", schema=data.schema)

    first = JobLock(db, "nightly", lease_s=0.6)
    first.acquire()
    _pause(first)  # no renewals from the thread: only the commit's fence renews
    with first.fencing(["image_scores"]):
        time.sleep(0.3)
        guarded.append(data)  # holds the lock: commits, and renews the lease
        info = first.current()
        assert info is not None
        assert info.expires_at - info.acquired_at > timedelta(seconds=0.8)
        time.sleep(1.0)  # paused past its lease
        second = JobLock(db, "nightly", lease_s=30)
        second.acquire()
        before = catalog.load_table("ns.image_scores").current_snapshot()
        with pytest.raises(LockLost, match="taken over by"):
            guarded.append(data)
        after = catalog.load_table("ns.image_scores").current_snapshot()
        assert before is not None and after is not None
        assert after.snapshot_id == before.snapshot_id  # nothing published
        other.append(data)  # not a guarded table: its commit goes through
    assert len(catalog.load_table("ns.image_scores").scan().to_arrow()) == 2
    guarded.refresh()
    guarded.append(data)  # outside fencing: no check (the listener is gone)
    second.release()
    first.release()
