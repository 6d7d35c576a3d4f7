"""``flowscore run JOB.toml``: incremental, resumable after kill -9, locked, validated first.
Real Ray, real Iceberg catalog, real MLflow (SQLite store), real processes killed for real."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest
from conftest import check_exactly_once, read_table, write_job

from flowcore.bundle import save_bundle
from jobs.cli import main
from jobs.nightly import JobUsageError, load_job
from pipelines import tables
from pipelines.lock import JobLock
from pipelines.synth import write_archive

pytestmark = [pytest.mark.timeout(600)]


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("FLOWSCORE_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tmp_path / "home"


@pytest.fixture
def model(tmp_path, small_scorer) -> Path:
    return save_bundle(small_scorer, tmp_path / "bundle")


@pytest.mark.ray
def test_second_run_scores_nothing_and_a_replaced_file_is_rescored(
    ray_session, home, tmp_path, model, capsys
):
    archive = tmp_path / "archive"
    write_archive(archive, kind="factory", images=9, seed=1, height=64, width=96)
    (archive / "year=2017" / "broken.jpg").write_bytes(b"not an image")
    job = write_job(tmp_path, archive, str(model), "max_error_rate = 0.5\n")
    assert main(["run", str(job), "--dry-run"]) == 0
    assert "would score 10 of 10" in capsys.readouterr().out
    assert tables.load_table(tables.load_catalog_(), "runs") is None  # dry run wrote nothing
    assert main(["run", str(job)]) == 0
    check_exactly_once(archive)
    assert len(read_table("image_scores")) == 9 and len(read_table("scoring_errors")) == 1
    capsys.readouterr()
    assert main(["run", str(job)]) == 0
    assert "nothing new to score" in capsys.readouterr().out
    # a run that finds nothing new still leaves its runs row (DESIGN, "runs")
    idle = max(read_table("runs").to_pylist(), key=lambda r: r["started_at"])
    assert idle["status"] == "succeeded" and idle["images_scored"] == 0
    assert idle["images_listed"] == idle["images_skipped"] == 10 and idle["job"] == "t"
    # a file rewritten in place has a new etag: it alone is scored again
    victim = sorted(archive.rglob("img_*.jpg"))[0]
    data = victim.read_bytes()
    time.sleep(0.01)
    victim.write_bytes(data)
    os.utime(victim, None)
    assert main(["run", str(job)]) == 0
    runs = sorted(read_table("runs").to_pylist(), key=lambda r: r["started_at"])
    assert runs[-1]["images_scored"] == 1 and runs[-1]["images_skipped"] == 9
    assert runs[-1]["status"] == "succeeded"


@pytest.mark.ray
def test_a_job_with_a_maintain_section_compacts_when_due(
    ray_session, home, tmp_path, model, capsys
):
    archive = tmp_path / "archive"
    write_archive(archive, kind="factory", images=8, seed=2, height=64, width=96)
    job = write_job(tmp_path, archive, str(model), '[maintain]\nevery = "1d"\n', commit_every=2)
    assert main(["run", str(job)]) == 0
    err = capsys.readouterr().err
    check_exactly_once(archive)
    tbl = tables.load_table(tables.load_catalog_(), tables.IMAGE_SCORES)
    # four commits of two images each, compacted into one file once the scores were in
    assert "image_scores: 8 rows; data files 4 -> 1 (1 groups compacted)" in err
    assert len(list(tbl.scan().plan_files())) == 1
    stamp = tbl.properties["flowscore.maintained-at"]
    assert main(["run", str(job)]) == 0  # maintained less than a day ago: not due
    assert "maintaining" not in capsys.readouterr().err
    tbl = tables.load_table(tables.load_catalog_(), tables.IMAGE_SCORES)
    assert tbl.properties["flowscore.maintained-at"] == stamp
    check_exactly_once(archive)


@pytest.mark.ray
def test_error_rate_above_the_limit_exits_3(ray_session, home, tmp_path, model):
    archive = tmp_path / "archive"
    write_archive(archive, kind="harvest", images=3, seed=2, height=64, width=96)
    for i in range(2):
        (archive / f"bad{i}.png").write_bytes(b"")
    job = write_job(tmp_path, archive, str(model), "max_error_rate = 0.1\n")
    assert main(["run", str(job)]) == 3


def test_spec_and_environment_are_checked_before_anything_runs(home, tmp_path, model, capsys):
    archive = tmp_path / "archive"
    archive.mkdir()
    bad_key = write_job(tmp_path, archive, str(model), "actorz = 2\n", name="k")
    assert main(["run", str(bad_key)]) == 2
    err = capsys.readouterr().err
    assert str(bad_key) in err and "score.actorz" in err
    missing = write_job(tmp_path, tmp_path / "nowhere", str(model), name="m")
    assert main(["run", str(missing)]) == 2
    assert "does not exist" in capsys.readouterr().err
    no_alias = write_job(tmp_path, archive, "models:/ghost@champion", name="a")
    assert main(["run", str(no_alias)]) == 2
    assert "ghost" in capsys.readouterr().err
    assert not (home / "catalog.db").exists()  # nothing touched


def test_a_live_lock_stops_a_second_run_and_a_dead_one_is_taken_over(home, tmp_path, model, capsys):
    archive = tmp_path / "archive"
    write_archive(archive, kind="harvest", images=2, seed=3, height=64, width=96)
    job = write_job(tmp_path, archive, str(model), name="locked")
    tables.load_catalog_()
    uri = tables.catalog_config()["uri"]
    holder = JobLock(uri, "locked", lease_s=60)
    holder.acquire()
    try:
        assert main(["run", str(job), "--dry-run"]) == 2
        err = capsys.readouterr().err
        assert "already running" in err and holder.holder in err
    finally:
        holder.release()
    dead = JobLock(uri, "locked", lease_s=0.5)
    dead.acquire()
    dead._stop.set()  # its holder "dies": no more lease renewals
    time.sleep(1.0)
    assert main(["run", str(job), "--dry-run"]) == 0
    assert "took over the lock" in capsys.readouterr().err


@pytest.mark.ray
@pytest.mark.faults
def test_kill_9_mid_run_then_rerun_finishes_exactly_once(ray_address, home, tmp_path, model):
    archive = tmp_path / "archive"
    write_archive(archive, kind="harvest", images=30, seed=4, height=64, width=96)
    job = write_job(tmp_path, archive, str(model))
    env = dict(os.environ, RAY_DATA_DISABLE_PROGRESS_BARS="1", FLOWSCORE_LOCK_LEASE_S="6")
    log = open(tmp_path / "killed.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "jobs.cli", "run", str(job), "--ray-address", ray_address],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.time() + 240
        while time.time() < deadline and b"commit 2/" not in (tmp_path / "killed.log").read_bytes():
            time.sleep(0.2)
        assert proc.poll() is None, (tmp_path / "killed.log").read_text()
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the job; Ray ends a dead driver's actors and tasks
        proc.wait()
    partial = len(read_table("image_scores"))
    assert 0 < partial < 30
    # the killed run's lock lease (6 s here) has not expired yet: a rerun waits it out
    t0 = time.time()
    while main(["run", str(job), "--quiet"]) == 2:
        assert time.time() - t0 < 60, "the dead run's lock was never taken over"
        time.sleep(2)
    check_exactly_once(archive)
    assert len(read_table("image_scores")) == 30


def test_unreachable_catalog_is_a_usage_error(home, tmp_path, model, capsys, monkeypatch):
    monkeypatch.setenv("FLOWSCORE_CATALOG_URI", "sqlite:////nonexistent-dir/x/catalog.db")
    archive = tmp_path / "archive"
    archive.mkdir()
    assert main(["run", str(write_job(tmp_path, archive, str(model)))]) == 2
    assert "nonexistent-dir" in capsys.readouterr().err


@pytest.mark.ray
@pytest.mark.s3
def test_nightly_job_with_an_s3_warehouse(
    ray_session, s3_server, home, tmp_path, model, monkeypatch
):
    """The tables in an s3:// warehouse (moto), the lock in the catalog database: the job
    scores, a second run finds nothing new, and a live lock still stops a second run."""
    from conftest import make_bucket

    make_bucket("wh-nightly")
    monkeypatch.setenv("FLOWSCORE_WAREHOUSE", "s3://wh-nightly/warehouse")
    archive = tmp_path / "archive"
    write_archive(archive, kind="factory", images=6, seed=6, height=64, width=96)
    job = write_job(tmp_path, archive, str(model), name="s3wh")
    assert main(["run", str(job), "--quiet"]) == 0
    check_exactly_once(archive)
    files = tables.snapshot_files(tables.load_catalog_().load_table("flowscore.image_scores"))
    assert files and all(f.startswith("s3://wh-nightly/warehouse/") for f in files)
    assert main(["run", str(job), "--quiet"]) == 0
    holder = JobLock(tables.catalog_config()["uri"], "s3wh", lease_s=60)
    holder.acquire()
    try:
        assert main(["run", str(job), "--quiet"]) == 2
    finally:
        holder.release()


def test_local_bundles_that_differ_only_in_threshold_are_different_versions(tmp_path, small_scorer):
    import copy

    from pipelines.tracking import ResolvedModel
    from pipelines.usecases.score import model_identity

    other = copy.deepcopy(small_scorer)
    other.threshold = small_scorer.threshold + 1.0  # same weights, another verdict
    a = save_bundle(small_scorer, tmp_path / "a" / "grain")
    b = save_bundle(other, tmp_path / "b" / "grain")
    assert (a / "weights.safetensors").read_bytes() == (b / "weights.safetensors").read_bytes()
    va = model_identity(ResolvedModel(uri=str(a), path=a, name=None, version=None))
    vb = model_identity(ResolvedModel(uri=str(b), path=b, name=None, version=None))
    assert va[0] == vb[0] == "grain" and va[1] != vb[1]
    assert va == model_identity(
        ResolvedModel(uri=str(a), path=a, name=None, version=None)
    )  # stable


@pytest.mark.ray
def test_errors_are_per_model_version_read_errors_retried_and_cleared_when_scored(
    ray_session, home, tmp_path, model, small_scorer
):
    """Promise 2 per model version: a file that failed under model A is still tried by B; a
    read error (retryable) is tried again and, once scored, leaves scoring_errors; a
    permanent error of the same version is not tried again."""
    import copy

    import pyarrow as pa
    import torch

    from pipelines.archive import list_archive
    from pipelines.tracking import ResolvedModel
    from pipelines.usecases.score import model_identity

    archive = tmp_path / "archive"
    write_archive(archive, kind="factory", images=6, seed=4, height=64, width=96)
    (archive / "year=2017" / "broken.jpg").write_bytes(b"not an image")
    job_a = write_job(tmp_path, archive, str(model), "max_error_rate = 0.5\n", name="a")
    assert main(["run", str(job_a), "--quiet"]) == 0
    other = copy.deepcopy(small_scorer)
    with torch.no_grad():
        for p in other.flow.parameters():
            p.add_(0.01)
    model_b = save_bundle(other, tmp_path / "bundle-b")
    va = model_identity(ResolvedModel(uri=str(model), path=model, name=None, version=None))[1]
    vb = model_identity(ResolvedModel(uri=str(model_b), path=model_b, name=None, version=None))[1]
    listed = sorted((e.image_uri, e.etag) for e in list_archive(str(archive)))
    good = [k for k in listed if not k[0].endswith("broken.jpg")]
    # as if an earlier run of B had hit EIO on good[0] (retryable) and failed to decode
    # good[1] (permanent for B)
    cat = tables.load_catalog_()
    rows = [
        {
            "image_uri": u,
            "etag": e,
            "run_id": "earlier",
            "stage": st,
            "error_type": "OSError",
            "message": "m",
            "at": datetime(2026, 1, 1),
            "model_version": vb,
            "retryable": st == "read",
        }
        for (u, e), st in ((good[0], "read"), (good[1], "decode"))
    ]
    tables.settle_errors(
        cat, vb, [], pa.Table.from_pylist(rows, schema=tables.SCORING_ERRORS_SCHEMA)
    )
    job_b = write_job(tmp_path, archive, str(model_b), "max_error_rate = 0.5\n", name="b")
    assert main(["run", str(job_b), "--quiet"]) == 0

    def keys(table: str, version: str) -> list[tuple[str, str]]:
        rows = [r for r in read_table(table).to_pylist() if r["model_version"] == version]
        return sorted((r["image_uri"], r["etag"]) for r in rows)

    broken = [k for k in listed if k[0].endswith("broken.jpg")]
    assert keys("scoring_errors", va) == broken and keys("image_scores", va) == good
    # B: broken.jpg tried (it failed under A, not B), good[0] retried and scored (its read
    # error row gone), good[1] not tried again
    assert keys("scoring_errors", vb) == sorted(broken + [good[1]])
    assert keys("image_scores", vb) == [k for k in good if k != good[1]]
    for v in (va, vb):  # exactly once per version
        assert sorted(keys("scoring_errors", v) + keys("image_scores", v)) == listed
    errors = {r["image_uri"]: r for r in read_table("scoring_errors").to_pylist()}
    assert errors[broken[0][0]]["retryable"] is False


def test_job_spec_test_time_transforms_are_checked(tmp_path):
    p = tmp_path / "j.toml"
    base = '[job]\nname = "j"\narchive = "a"\nmodel = "m"\n[score]\n'
    p.write_text(base + "test_transforms = 4\n")
    assert load_job(p).test_transforms == 4
    p.write_text(base)
    assert load_job(p).test_transforms is None  # the model's own
    for bad in ("0", "9", '"4"'):
        p.write_text(base + f"test_transforms = {bad}\n")
        with pytest.raises(JobUsageError, match="test_transforms"):
            load_job(p)
