"""``flowscore maintain``: compaction, snapshot expiry and orphan removal on a real pyiceberg
SQL catalog with real Parquet files; ``query`` (real DuckDB) answers the same before and
after, and a real process killed with SIGKILL at any point of a maintenance run loses
nothing."""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_tables import KEY, query, score_rows

from jobs.cli import main
from jobs.nightly import JobUsageError, load_job
from pipelines import tables as T
from pipelines.lock import JobLock
from pipelines.maintenance import (
    MAINTAINED_PROPERTY,
    MaintainPolicy,
    parse_duration,
    plan_compaction,
    snapshots_to_expire,
)

DAY = 86_400


@pytest.fixture
def home(flowscore_home, monkeypatch):
    monkeypatch.delenv("FLOWSCORE_CATALOG_URI", raising=False)
    monkeypatch.delenv("FLOWSCORE_WAREHOUSE", raising=False)
    return flowscore_home


# ---------------------------------------------------------------- planning (pure)


def test_durations_and_policy_are_checked():
    assert parse_duration("30d") == 30 * DAY
    assert parse_duration("12h") == 12 * 3600 and parse_duration("90m") == 5400
    assert parse_duration("2w") == 14 * DAY and parse_duration("0s") == 0
    assert parse_duration(" 1.5h ") == 5400
    for bad in ("30", "d", "-1d", "1y", "", "nan d"):
        with pytest.raises(ValueError, match="30d, 12h"):
            parse_duration(bad)
    with pytest.raises(ValueError, match="keep_last"):
        MaintainPolicy(keep_last=0)
    with pytest.raises(ValueError, match="target file size"):
        MaintainPolicy(target_file_bytes=0)


class F:
    def __init__(self, part: str, size: int) -> None:
        self.spec_id, self.partition, self.file_size_in_bytes = 0, part, size

    def __repr__(self) -> str:
        return f"F({self.partition}, {self.file_size_in_bytes})"


def test_compaction_packs_small_files_per_partition_up_to_the_target():
    files = [F("a", s) for s in (10, 20, 30, 45, 90)] + [F("b", 5), F("c", 10), F("c", 10)]
    groups = plan_compaction(files, 100)
    sizes = sorted(sorted(f.file_size_in_bytes for f in g) for g in groups)
    # 90 >= 75 (3/4 of the target) is big enough; a: 10+20+30 = 60, +45 > 100 -> [45] alone
    # (a group of one is not rewritten); b has one small file; c packs its two
    assert sizes == [[10, 10], [10, 20, 30]]
    assert all(len({f.partition for f in g}) == 1 for g in groups)
    assert all(sum(f.file_size_in_bytes for f in g) <= 100 for g in groups)
    assert plan_compaction([F("a", 80), F("a", 80)], 100) == []  # both already big enough


def test_expiry_keeps_the_newest_the_current_and_protected_snapshots():
    now = 1_000 * DAY * 1000
    snaps = [(i, now - (40 - i) * DAY * 1000) for i in range(10)]  # 40..31 days old
    old = snapshots_to_expire(snaps, current=9, now_ms=now, retain_s=30 * DAY, keep_last=3)
    assert sorted(old) == list(range(7))  # the newest 3 stay although older than 30 days
    assert 3 not in snapshots_to_expire(
        snaps, current=9, protected={3}, now_ms=now, retain_s=30 * DAY, keep_last=1
    )
    young = snapshots_to_expire(snaps, current=9, now_ms=now, retain_s=60 * DAY, keep_last=1)
    assert young == []


# ---------------------------------------------------------------- a real table


def _fill(commits: int = 6) -> None:
    """``image_scores`` in many small commits over two model versions (two partitions),
    plus a few runs rows, as months of nightly runs leave them."""
    cat = T.load_catalog_()
    T.ensure_tables(cat, ["year"])
    for version in ("1", "2"):
        for c in range(commits):
            tbl = cat.load_table("flowscore.image_scores")
            rows = score_rows(4, start=c * 4, version=version, quality0=float(version))
            tbl.append(T.conform(rows, T._with_field_ids(tbl)))
    for c in range(3):
        T.upsert(cat, T.IMAGE_SCORES, score_rows(2, start=100 + c, version="1"), KEY)


QUERIES = (
    "select * from image_scores order by image_uri, etag, model_version",
    "select model_version, count(*) n, sum(quality) q, min(anomaly_score) a "
    "from image_scores group by 1 order by 1",
    "select image_uri, heatmap from image_scores order by anomaly_score desc limit 5",
    "select count(*) from scoring_errors",
    "select * from runs order by run_id",
)


def _answers() -> list[str]:
    out = []
    for sql in QUERIES:
        rc, text, err = query(sql, "json")
        assert rc == 0, err
        out.append(text)
    return out


def _table() -> object:
    return T.load_catalog_().load_table("flowscore.image_scores")


def _data_files_by_version(tbl) -> dict[str, int]:
    counts: dict[str, int] = {}
    for task in tbl.scan().plan_files():
        v = task.file.partition[0]
        counts[v] = counts.get(v, 0) + 1
    return counts


def _every_snapshot_reads(tbl) -> dict[int, int]:
    """Rows of each snapshot still in the metadata (time travel): each must still read."""
    return {
        s.snapshot_id: tbl.scan(snapshot_id=s.snapshot_id).to_arrow().num_rows
        for s in tbl.snapshots()
    }  # to_arrow reads every data file (count() could answer from the manifests alone)


@pytest.mark.slow
def test_maintain_compacts_expires_and_sweeps_and_queries_answer_the_same(home, capsys):
    _fill()
    before = _answers()
    tbl = _table()
    files = _data_files_by_version(tbl)
    assert files["1"] >= 7 and files["2"] == 6  # one file per commit (upserts rewrite some)
    rows, nfiles = tbl.scan().count(), sum(files.values())
    assert rows == 2 * 6 * 4 + 4
    snapshots_before = len(tbl.snapshots())
    data_dir = home / "warehouse" / "flowscore" / "image_scores" / "data"
    some = next(data_dir.rglob("*.parquet"))
    old_orphan = some.with_name("00000-0-left-by-a-crashed-writer.parquet")
    young_orphan = some.with_name("00000-0-written-by-a-writer-right-now.parquet")
    not_ours = some.with_name("notes.txt")
    for p in (old_orphan, young_orphan, not_ours):
        shutil.copyfile(some, p)
    ten_days_ago = time.time() - 10 * DAY
    os.utime(old_orphan, (ten_days_ago, ten_days_ago))
    os.utime(not_ours, (ten_days_ago, ten_days_ago))

    assert main(["maintain", "--retain", "0s", "--keep-last", "2", "--dry-run"]) == 0
    dry = capsys.readouterr().out
    head = f"image_scores: {rows} rows; data files {nfiles} -> 2 (2 groups compacted)"
    assert head in dry
    assert "(dry run: nothing changed)" in dry
    assert len(_table().snapshots()) == snapshots_before and old_orphan.exists()

    assert main(["maintain", "--retain", "0s", "--keep-last", "2"]) == 0
    out = capsys.readouterr().out
    assert head in out
    assert f"snapshots {snapshots_before} -> 3" in out and "1 orphan files" in out
    tbl = _table()
    assert _data_files_by_version(tbl) == {"1": 1, "2": 1}
    assert len(tbl.snapshots()) == 3 and MAINTAINED_PROPERTY in tbl.properties
    assert not old_orphan.exists()
    assert young_orphan.exists() and not_ours.exists()  # too young / not Iceberg's
    assert _answers() == before
    kept = _every_snapshot_reads(tbl)
    assert kept[tbl.current_snapshot().snapshot_id] == rows

    # what expiry freed (and the young orphan) goes once old enough; history still reads
    assert main(["maintain", "--orphan-age", "0s"]) == 0
    out = capsys.readouterr().out
    assert "data files 2 -> 2;" in out  # nothing left to compact
    assert not young_orphan.exists() and not_ours.exists()
    assert _every_snapshot_reads(_table()) == kept
    assert _answers() == before
    tbl = _table()
    referenced = {
        Path(t.file.file_path.removeprefix("file://"))
        for s in tbl.snapshots()
        for t in tbl.scan(snapshot_id=s.snapshot_id).plan_files()
    }  # exactly the files some kept snapshot reads are left
    assert set(data_dir.rglob("*.parquet")) == referenced


def test_bad_input_is_exit_2_naming_what(home, capsys):
    assert main(["maintain", "--table", "imagescores"]) == 2
    assert "unknown table 'imagescores'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["maintain", "--retain", "30"])
    assert e.value.code == 2 and "30d, 12h" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["maintain", "--target-file-mb", "0"])
    # a fresh home: nothing to maintain, said so
    assert main(["maintain", "--table", "runs"]) == 0
    assert "runs: no such table yet" in capsys.readouterr().out


def test_a_second_maintenance_run_waits_for_the_first(home, capsys):
    _fill(2)
    held = JobLock(T.catalog_config()["uri"], "flowscore-maintain", lease_s=60)
    held.acquire()
    try:
        assert main(["maintain"]) == 2
        assert "flowscore-maintain" in capsys.readouterr().err
    finally:
        held.release()
    assert main(["maintain"]) == 0


def test_job_spec_maintain_section_is_checked(tmp_path):
    def spec(text: str) -> Path:
        p = tmp_path / "j.toml"
        p.write_text(f'[job]\nname = "j"\narchive = "a"\nmodel = "m"\n[maintain]\n{text}')
        return p

    s = load_job(spec('every = "7d"\nretain = "14d"\nkeep_last = 3\n'))
    assert s.maintain_every_s == 7 * DAY
    assert s.maintain.retain_s == 14 * DAY and s.maintain.keep_last == 3
    assert load_job(spec("")).maintain_every_s is None
    for text, what in (
        ('retain = "14d"\n', "needs every"),
        ('every = "weekly"\n', "maintain.every"),
        ('every = "7d"\nkeep_last = 0\n', "keep_last"),
        ('every = "7d"\nevery_day = true\n', "unknown key maintain.every_day"),
        ('every = "7d"\ntarget_file_mb = -1\n', "target_file_mb"),
    ):
        with pytest.raises(JobUsageError, match=what):
            load_job(spec(text))


# ---------------------------------------------------------------- kill -9


LEASE_S = 1.0


def _maintain_child(home: Path, log: Path, point: str = "") -> subprocess.Popen:
    env = dict(os.environ, FLOWSCORE_HOME=str(home), FLOWSCORE_FAULT_MAINTAIN=point)
    env["FLOWSCORE_LOCK_LEASE_S"] = str(LEASE_S)  # a killed run's lock expires soon
    for k in ("FLOWSCORE_CATALOG_URI", "FLOWSCORE_WAREHOUSE"):
        env.pop(k, None)
    cmd = [sys.executable, "-m", "jobs.cli", "maintain", "--retain", "0s", "--keep-last", "1"]
    cmd += ["--orphan-age", "0s"]
    with open(log, "ab") as out:
        return subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)


@pytest.mark.faults
def test_kill_9_at_every_point_of_a_maintenance_run_loses_nothing(home, tmp_path):
    _fill()
    before = _answers()
    log = tmp_path / "maintain.log"
    # the named points of each phase, then random moments (seeded, printed on failure)
    seed = int(os.environ.get("FLOWSCORE_FAULT_SEED", "20261130"))
    rng = random.Random(seed)
    points = ["written", "committed", "sweeping"]
    reach = 0.0  # how long a child takes to reach its last named point
    for i, point in enumerate([*points, "", "", ""]):
        # more rows and files between kills, so that every kill has work to interrupt
        cat = T.load_catalog_()
        T.upsert(cat, T.IMAGE_SCORES, score_rows(3, start=200 + 3 * i, version="3"), KEY)
        T.upsert(cat, T.IMAGE_SCORES, score_rows(3, start=300 + 3 * i, version="3"), KEY)
        before = _answers()
        t0 = time.monotonic()
        child = _maintain_child(home, log, point)
        if point:
            rc = child.wait(timeout=120)
            assert rc == -signal.SIGKILL, f"kill point {point!r} never reached:\n{log.read_text()}"
            reach = max(reach, time.monotonic() - t0)
        else:  # somewhere from the imports to the sweep
            time.sleep(rng.uniform(0.3, 1.0) * reach)
            child.send_signal(signal.SIGKILL)
            child.wait(timeout=60)
        time.sleep(LEASE_S * 1.2)  # the dead run's lease runs out; the next one takes over
        what = f"after a kill at {point or 'a random moment'} (seed {seed})"
        assert _answers() == before, what
        tbl = _table()
        assert all(n >= 0 for n in _every_snapshot_reads(tbl).values()), what
    # a run to the end finishes the work
    child = _maintain_child(home, log)
    assert child.wait(timeout=120) == 0, log.read_text()
    assert _answers() == before
    assert set(_data_files_by_version(_table()).values()) == {1}


@pytest.mark.s3
def test_maintain_an_s3_warehouse(home, s3_server, monkeypatch, capsys):
    """The same on an ``s3://`` warehouse (moto): orphans are listed and deleted through
    pyiceberg's own S3 file system, and ``query`` answers the same."""
    import pyarrow.fs as pafs
    from conftest import make_bucket

    make_bucket("wh-maintain")
    monkeypatch.setenv("FLOWSCORE_WAREHOUSE", "s3://wh-maintain/warehouse")
    _fill(3)
    before = _answers()
    tbl = _table()
    some = next(iter(tbl.scan().plan_files())).file.file_path
    orphan = some.rsplit("/", 1)[0] + "/00000-0-left-by-a-crashed-writer.parquet"
    fs = tbl.io.fs_by_scheme("s3", "wh-maintain")
    fs.copy_file(some.removeprefix("s3://"), orphan.removeprefix("s3://"))
    assert main(["maintain", "--retain", "0s", "--keep-last", "1", "--orphan-age", "0s"]) == 0
    out = capsys.readouterr().out
    assert "(2 groups compacted)" in out and "image_scores" in out
    assert fs.get_file_info(orphan.removeprefix("s3://")).type == pafs.FileType.NotFound
    assert _answers() == before
    assert set(_data_files_by_version(_table()).values()) == {1}
    assert all(n > 0 for n in _every_snapshot_reads(_table()).values())


def test_compaction_can_pack_in_path_order():
    files = [F("a", 10) for _ in range(6)]
    for f, first in zip(
        files,
        ["y=2019/c", "y=2017/a", "y=2018/b", "y=2017/b", "y=2019/a", "y=2018/a"],
        strict=True,
    ):
        f.first = first
    groups = plan_compaction(files, 25, order=lambda f: f.first)
    # by path, two files per group: each group holds one year
    assert [[f.first for f in g] for g in groups] == [
        ["y=2017/a", "y=2017/b"],
        ["y=2018/a", "y=2018/b"],
        ["y=2019/a", "y=2019/c"],
    ]
