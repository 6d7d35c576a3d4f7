"""Promise 5, S3 side: a transient S3 outage is retried with backoff; a lasting one ends the
run with one clear line and nothing half-committed; a rerun then finishes exactly once.

The outage is real: a ``moto_server`` of the test's own, holding the archive *and* the
Iceberg warehouse, is frozen with SIGSTOP (its port still accepts connections, nothing ever
answers, so every request runs into its timeout) while ``flowscore run`` works as a real
subprocess, then resumed with SIGCONT. Short ``FLOWSCORE_S3_*`` timeouts and budgets keep
it to seconds. The unit tests at the top check the pieces without servers."""

from __future__ import annotations

import errno
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pytest
from conftest import busy_factor

from pipelines import storage, tables
from pipelines.archive import DecodeError, list_archive, read_bytes
from pipelines.storage import StorageUnavailable

# ---------------------------------------------------------------- the pieces, no servers


def _client_error(code: str, status: int) -> Exception:
    from botocore.exceptions import ClientError

    return ClientError(
        {"Error": {"Code": code, "Message": code}, "ResponseMetadata": {"HTTPStatusCode": status}},
        "GetObject",
    )


def test_transient_and_permanent_errors_are_told_apart():
    from botocore.exceptions import EndpointConnectionError, ReadTimeoutError

    transient = [
        ReadTimeoutError(endpoint_url="http://127.0.0.1:1/b/k"),
        EndpointConnectionError(endpoint_url="http://127.0.0.1:1/b/k"),
        TimeoutError("timed out"),
        ConnectionResetError(errno.ECONNRESET, "reset"),
        OSError(errno.EBUSY, "SlowDown"),  # how s3fs translates 503 / SlowDown
        OSError(errno.EREMOTEIO, "InternalError"),  # … and 500
        _client_error("ServiceUnavailable", 503),
        _client_error("SlowDown", 503),
        OSError(
            "When reading information for key 'k' in bucket 'b': AWS Error NETWORK_CONNECTION "
            "during HeadObject operation: curlCode: 28, Timeout was reached"
        ),
    ]
    eio = OSError(errno.EIO, "We encountered an internal error")
    eio.__cause__ = _client_error("WeirdInternalThing", 500)
    transient.append(eio)
    permanent = [
        FileNotFoundError("b/k"),
        PermissionError("Access Denied"),
        _client_error("NoSuchKey", 404),
        _client_error("AccessDenied", 403),
        ValueError("bad"),
        OSError(errno.EINVAL, "InvalidArgument"),
        StorageUnavailable("already given up"),
    ]
    assert [e for e in transient if not storage.is_transient(e)] == []
    assert [e for e in permanent if storage.is_transient(e)] == []


class _Clock:
    """A fake monotonic clock that sleeping advances."""

    def __init__(self) -> None:
        self.now = 0.0
        self.waits: list[float] = []

    def sleep(self, s: float) -> None:
        self.waits.append(s)
        self.now += s


def _failing(times: int, error: Callable[[], Exception]) -> Callable[[], str]:
    calls = {"n": 0}

    def action() -> str:
        calls["n"] += 1
        if calls["n"] <= times:
            raise error()
        return "data"

    action.calls = calls  # type: ignore[attr-defined]
    return action


def test_retry_transient_backs_off_then_gives_up_with_one_line(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://s3.example:9000")
    settings = storage.S3Settings(retries=2, retry_budget_s=20)
    clock = _Clock()
    action = _failing(3, lambda: TimeoutError("read timed out"))
    got = storage.retry_transient(
        action, "read", "s3://b/k.jpg", settings, sleep=clock.sleep, clock=lambda: clock.now
    )
    assert got == "data" and action.calls["n"] == 4  # type: ignore[attr-defined]
    assert len(clock.waits) == 3 and clock.waits[0] < clock.waits[1] < clock.waits[2]

    clock = _Clock()
    with pytest.raises(StorageUnavailable) as info:
        storage.retry_transient(
            _failing(10**6, lambda: TimeoutError("read timed out")),
            "read",
            "s3://b/k.jpg",
            settings,
            sleep=clock.sleep,
            clock=lambda: clock.now,
        )
    assert clock.now <= 20 and sum(clock.waits) > 20 / 4  # it used the budget, not more
    message = str(info.value)
    assert "\n" not in message
    assert "s3://b/k.jpg" in message and "http://s3.example:9000" in message
    assert "FLOWSCORE_S3_RETRY_BUDGET_S=20" in message and "TimeoutError" in message

    clock = _Clock()
    missing = _failing(10**6, lambda: FileNotFoundError("b/k.jpg"))
    with pytest.raises(FileNotFoundError):
        storage.retry_transient(
            missing, "read", "s3://b/k.jpg", settings, sleep=clock.sleep, clock=lambda: clock.now
        )
    assert missing.calls["n"] == 1 and clock.waits == []  # type: ignore[attr-defined]


def test_settings_come_from_the_environment_and_reach_every_client(tmp_path, monkeypatch):
    for name in storage.S3_ENV:
        monkeypatch.delenv(name, raising=False)
    assert storage.s3_settings() == storage.S3Settings(10.0, 60.0, 3, 120.0)
    monkeypatch.setenv("FLOWSCORE_S3_CONNECT_TIMEOUT_S", "2")
    monkeypatch.setenv("FLOWSCORE_S3_READ_TIMEOUT_S", "3.5")
    monkeypatch.setenv("FLOWSCORE_S3_RETRIES", "1")
    monkeypatch.setenv("FLOWSCORE_S3_RETRY_BUDGET_S", "30")
    s = storage.s3_settings()
    assert (s.connect_timeout_s, s.read_timeout_s, s.retries, s.retry_budget_s) == (2, 3.5, 1, 30)
    cfg = storage.s3fs_kwargs()["config_kwargs"]
    assert cfg["connect_timeout"] == 2 and cfg["read_timeout"] == 3.5
    assert cfg["retries"] == {"max_attempts": 2, "mode": "standard"}
    assert storage.S3RetryStrategy().max_attempts == 2

    monkeypatch.setenv("FLOWSCORE_HOME", str(tmp_path))
    monkeypatch.delenv("FLOWSCORE_WAREHOUSE", raising=False)
    assert not any(k.startswith("s3.") for k in tables.catalog_config())  # local: none
    monkeypatch.setenv("FLOWSCORE_WAREHOUSE", "s3://wh/warehouse")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")  # else pyarrow asks AWS for it
    cfg = tables.catalog_config()
    assert cfg["s3.connect-timeout"] == "2" and cfg["s3.request-timeout"] == "3.5"
    assert cfg["s3.retry-strategy-impl"] == "pipelines.storage.S3RetryStrategy"
    assert all(isinstance(v, str) for v in cfg.values())
    # pyiceberg builds the pyarrow S3 filesystem from exactly these properties
    from pyiceberg.io.pyarrow import PyArrowFileIO

    fs = PyArrowFileIO({k: v for k, v in cfg.items() if k.startswith("s3.")}).fs_by_scheme(
        "s3", "wh"
    )
    assert type(fs).__name__ == "S3FileSystem"

    monkeypatch.setenv("FLOWSCORE_S3_READ_TIMEOUT_S", "soon")
    with pytest.raises(storage.StorageConfigError, match="FLOWSCORE_S3_READ_TIMEOUT_S"):
        storage.s3_settings()


def test_ray_data_retries_are_sized_to_the_budget(monkeypatch):
    from ray.data import DataContext

    assert storage.backoff_attempts(0, 30) == 1
    assert storage.backoff_attempts(7, 30) == 4  # waits 1 + 2 + 4
    assert storage.backoff_attempts(120, 30) == 9  # 1 + 2 + 4 + 8 + 16 + 30 + 30 + 30 >= 120
    ctx = DataContext.get_current()
    saved_cfg, saved_io = ctx.iceberg_config, list(ctx.retried_io_errors)
    try:
        ctx.iceberg_config = type(ctx.iceberg_config)()
        storage.configure_ray_data(storage.S3Settings(retry_budget_s=8))
        cfg = ctx.iceberg_config
        assert cfg.write_file_retry_max_backoff_s == 2 and cfg.write_file_max_attempts == 6
        assert cfg.catalog_max_attempts == 6
        assert "AWS Error NETWORK_CONNECTION" in cfg.catalog_retried_errors
        assert "AWS Error SERVICE_UNAVAILABLE" in ctx.retried_io_errors
    finally:
        ctx.iceberg_config = saved_cfg
        ctx.retried_io_errors[:] = saved_io


def test_the_clear_line_is_found_behind_ray_and_behind_later_errors():
    # Ray Data re-raises a task's exception as UserCodeException: the original survives
    # only as text in the message
    remote = RuntimeError(
        "ray::MapBatches(decode_task)() (pid=1, ip=10.0.0.1)\n"
        '  File "pipelines/archive.py", line 300, in read_bytes\n'
        "pipelines.storage.StorageUnavailable: S3 storage unavailable: could not read "
        "s3://b/k.jpg at http://h:9 for 12 s (3 attempt(s)): ReadTimeoutError: Read timeout\n"
        "\nThe above exception was the direct cause of the following exception:\n"
        "ray.exceptions.UserCodeException: UDF failed to process a data block."
    )
    line = storage.storage_failure(remote)
    assert line is not None and line.startswith("S3 storage unavailable: could not read s3://")
    # an error raised while cleaning up (the runs row) hides the first one as its context
    try:
        try:
            raise StorageUnavailable("S3 storage unavailable: could not read s3://b/x")
        except StorageUnavailable:
            raise OSError(
                "When reading information for key 'm' in bucket 'wh': AWS Error "
                "NETWORK_CONNECTION during HeadObject operation: curlCode: 28"
            ) from None
    except OSError as later:
        assert later.__cause__ is None and later.__suppress_context__
        assert storage.storage_failure(later) == "S3 storage unavailable: could not read s3://b/x"
    # a table write that outlasted every retry: pyarrow's error, inside a Ray task error
    write = RuntimeError(
        "ray::Write() (pid=2)\nOSError: When uploading part for key 'data/x.parquet' in bucket "
        "'wh': AWS Error NETWORK_CONNECTION during UploadPart operation: curlCode: 28"
    )
    line = storage.storage_failure(write)
    assert line is not None and "S3 storage unavailable" in line
    assert line.endswith("curlCode: 28") and "ray::Write" not in line
    assert storage.storage_failure(ValueError("a bug")) is None
    assert storage.storage_failure(ConnectionRefusedError("mlflow at 127.0.0.1:5000")) is None


# ---------------------------------------------------------------- against a paused server


def _s3_env(monkeypatch, server, **settings: str) -> None:
    for k, v in server.env().items():
        monkeypatch.setenv(k, v)
    for k, v in settings.items():
        monkeypatch.setenv(k, v)


def _bucket(server, bucket: str):
    import boto3

    s3 = boto3.client(
        "s3",
        endpoint_url=server.endpoint,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        region_name="us-east-1",
    )
    s3.create_bucket(Bucket=bucket)
    return s3


def _upload(server, bucket: str, local: Path, prefix: str) -> None:
    s3 = _bucket(server, bucket)
    for f in sorted(local.rglob("*")):
        if f.is_file():
            s3.upload_file(str(f), bucket, f"{prefix}/{f.relative_to(local).as_posix()}")


@pytest.mark.s3
@pytest.mark.faults
def test_read_bytes_rides_out_a_pause_and_names_a_lasting_one(own_s3_server, tmp_path, monkeypatch):
    _s3_env(
        monkeypatch,
        own_s3_server,
        FLOWSCORE_S3_CONNECT_TIMEOUT_S="0.5",
        FLOWSCORE_S3_READ_TIMEOUT_S="0.5",
        FLOWSCORE_S3_RETRIES="0",
        FLOWSCORE_S3_RETRY_BUDGET_S="10",
    )
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.png").write_bytes(b"pixels")
    _upload(own_s3_server, "outage-bytes", tmp_path / "a", "a")
    uri = "s3://outage-bytes/a/x.png"
    assert read_bytes(uri) == b"pixels"
    with pytest.raises(DecodeError) as info:  # a missing file is a per-file error, at once
        read_bytes("s3://outage-bytes/a/gone.png")
    assert info.value.stage == "read" and info.value.error_type == "FileNotFoundError"

    own_s3_server.pause()  # shorter than the budget: the read waits it out
    timer = threading.Timer(2.5, own_s3_server.resume)  # the read blocks this thread
    try:
        t0 = time.monotonic()
        timer.start()
        assert read_bytes(uri) == b"pixels"
        assert time.monotonic() - t0 >= 2.0
    finally:
        timer.cancel()
        own_s3_server.resume()

    monkeypatch.setenv("FLOWSCORE_S3_RETRY_BUDGET_S", "3")
    slack = busy_factor()
    own_s3_server.pause()  # longer than the budget: one clear error, in bounded time
    try:
        t0 = time.monotonic()
        with pytest.raises(StorageUnavailable) as lasting:
            read_bytes(uri)
        took = time.monotonic() - t0
        # bounded: the 3 s budget plus one attempt's timeouts, with room for a busy machine
        # (5.01 s was seen under a full make test; the unbounded bug took minutes)
        assert 1.5 <= took <= 3 + 5 * slack, (took, slack)
        assert own_s3_server.endpoint in str(lasting.value) and uri in str(lasting.value)
        with pytest.raises(StorageUnavailable, match="list the archive|open the archive"):
            list(list_archive("s3://outage-bytes/a"))
    finally:
        own_s3_server.resume()
    assert [e.image_uri for e in list_archive("s3://outage-bytes/a")] == [uri]


# ---------------------------------------------------------------- the nightly job, for real

IMAGES = 16
COMMIT_EVERY = 4
_COMMIT_LINE = re.compile(rb"commit (\d+)/\d+: (\d+) scored, (\d+) failed")


def _job_env(server, home: Path, ray_address: str, **settings: str) -> dict[str, str]:
    """The job's environment: ``server`` for S3, and the session's Ray to join (its workers
    get the endpoint and the ``FLOWSCORE_S3_*`` settings in the job's runtime_env, as on a
    cluster; the fake credentials are the same for every test server)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "AWS_"))}
    env.update(server.env())
    env.update(
        RAY_ADDRESS=ray_address,
        FLOWSCORE_HOME=str(home),
        FLOWSCORE_WAREHOUSE="s3://outage-wh/warehouse",
        FLOWSCORE_LOCK_LEASE_S="10",
        RAY_DATA_DISABLE_PROGRESS_BARS="1",
        **settings,
    )
    return env


@pytest.fixture
def outage_job(own_s3_server, tmp_path, small_scorer, monkeypatch):
    """An archive and a warehouse, both on the test's own moto_server, a bundle and a job
    spec; this process's environment points at the same server and catalog."""
    from flowcore.bundle import save_bundle
    from pipelines.synth import write_archive

    local = tmp_path / "archive"
    write_archive(local, kind="factory", images=IMAGES, seed=11, height=64, width=96)
    _upload(own_s3_server, "outage-archive", local, "factory")
    _bucket(own_s3_server, "outage-wh")
    model = save_bundle(small_scorer, tmp_path / "bundle")
    job = tmp_path / "outage.toml"
    job.write_text(
        '[job]\nname = "outage"\narchive = "s3://outage-archive/factory"\n'
        f'model = "{model}"\n[score]\ncommit_every = {COMMIT_EVERY}\n'
    )
    home = tmp_path / "home"
    _s3_env(monkeypatch, own_s3_server)
    monkeypatch.setenv("FLOWSCORE_HOME", str(home))
    monkeypatch.setenv("FLOWSCORE_WAREHOUSE", "s3://outage-wh/warehouse")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return job, home


def _run(job: Path, env: dict[str, str], log: Path) -> subprocess.Popen:
    out = open(log, "wb")  # noqa: SIM115 - the child writes it; closed by _finish
    proc = subprocess.Popen(
        [sys.executable, "-m", "jobs.cli", "run", str(job)],
        env=env,
        stdout=out,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    proc.log_file = out  # type: ignore[attr-defined]
    return proc


def _wait_for(proc: subprocess.Popen, log: Path, pattern: bytes, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not re.search(pattern, log.read_bytes()):
        assert proc.poll() is None, f"the job ended before {pattern!r}:\n{log.read_text()}"
        assert time.monotonic() < deadline, f"no {pattern!r} in {timeout_s} s:\n{log.read_text()}"
        time.sleep(0.1)


def _finish(proc: subprocess.Popen, log: Path, timeout_s: float) -> int:
    try:
        return proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        proc.wait()
        pytest.fail(f"the job did not end within {timeout_s} s:\n{log.read_text()}")
    finally:
        proc.log_file.close()  # type: ignore[attr-defined]
        try:
            os.killpg(proc.pid, 9)  # anything of the job's that outlived it
        except ProcessLookupError:
            pass


def _read(name: str) -> pa.Table:
    return tables.load_catalog_().load_table(f"flowscore.{name}").scan().to_arrow()


def _committed_per_run(log: Path) -> int:
    """Images the run said it committed (its ``commit k/n: S scored, F failed`` lines)."""
    return sum(int(m[1]) + int(m[2]) for m in _COMMIT_LINE.findall(log.read_bytes()))


def _check_no_half_commit(log: Path, run_id: str, failed: bool) -> None:
    """What is in the tables for ``run_id`` is exactly what its log says it committed, in
    whole chunks (a failed run stops between chunks: a multiple of commit_every)."""
    scores, errors = _read("image_scores"), _read("scoring_errors")
    mine = scores["run_id"].to_pylist().count(run_id) + errors["run_id"].to_pylist().count(run_id)
    assert mine == _committed_per_run(log), log.read_text()
    if failed:
        assert mine % COMMIT_EVERY == 0, mine


def _check_exactly_once() -> None:
    listed = {(e.image_uri, e.etag) for e in list_archive("s3://outage-archive/factory")}
    assert len(listed) == IMAGES
    scores, errors = _read("image_scores"), _read("scoring_errors")
    s = list(zip(scores["image_uri"].to_pylist(), scores["etag"].to_pylist(), strict=True))
    e = list(zip(errors["image_uri"].to_pylist(), errors["etag"].to_pylist(), strict=True))
    assert len(s) == len(set(s)) and len(e) == len(set(e))
    assert set(s) | set(e) == listed and not set(s) & set(e)
    assert e == [], errors.to_pylist()  # every file is good: an outage is never an error row


def _check_clear_failure(text: str) -> None:
    lines = [line for line in text.splitlines() if line.strip()]
    assert "Traceback" not in text, text
    assert lines[-1].startswith("flowscore: error: S3 storage unavailable"), text
    assert "outage" in lines[-1] or "127.0.0.1" in lines[-1], lines[-1]


def _first_run_id() -> str:
    runs = sorted(_read("runs").to_pylist(), key=lambda r: r["started_at"])
    return str(runs[0]["run_id"])


@pytest.mark.s3
@pytest.mark.ray
@pytest.mark.faults
@pytest.mark.timeout(300)
def test_a_pause_shorter_than_the_budget_is_ridden_out(
    outage_job, own_s3_server, ray_address, tmp_path
):
    """Paused for 3× the request timeout, once while images are read and once after a commit
    (so table writes and commits wait too): the run retries and finishes, or at worst stops
    with one clear line; either way nothing is half-committed and a rerun completes."""
    job, home = outage_job
    env = _job_env(
        own_s3_server,
        home,
        ray_address,
        FLOWSCORE_S3_CONNECT_TIMEOUT_S="2",
        FLOWSCORE_S3_READ_TIMEOUT_S="2",
        FLOWSCORE_S3_RETRIES="1",
        FLOWSCORE_S3_RETRY_BUDGET_S="40",
    )
    log = tmp_path / "first.log"
    proc = _run(job, env, log)
    try:
        _wait_for(proc, log, rb"scoring \d+ images", 120)
        for _ in range(2):
            own_s3_server.pause()
            time.sleep(6)
            own_s3_server.resume()
            if proc.poll() is not None:
                break
            _wait_for(proc, log, rb"commit 1/", 120)
    finally:
        own_s3_server.resume()
    rc = _finish(proc, log, 180)
    text = log.read_text()
    if rc != 0:
        assert rc == 1, text
        _check_clear_failure(text)
    _check_no_half_commit(log, _first_run_id(), failed=rc != 0)
    if rc != 0:
        rerun = tmp_path / "rerun.log"
        assert _finish(_run(job, env, rerun), rerun, 180) == 0, rerun.read_text()
    _check_exactly_once()
    assert rc == 0, f"a 6-s pause should have been ridden out:\n{text}"


@pytest.mark.s3
@pytest.mark.ray
@pytest.mark.faults
@pytest.mark.timeout(300)
def test_a_pause_longer_than_the_budget_stops_the_run_clearly(
    outage_job, own_s3_server, ray_address, tmp_path
):
    """Paused after the first commit until the run gives up: exit code 1 within the budget
    plus the timeouts, one line naming S3 and the endpoint, only whole chunks committed;
    resumed, a rerun scores the rest exactly once."""
    job, home = outage_job
    env = _job_env(
        own_s3_server,
        home,
        ray_address,
        FLOWSCORE_S3_CONNECT_TIMEOUT_S="1",
        FLOWSCORE_S3_READ_TIMEOUT_S="1",
        FLOWSCORE_S3_RETRIES="0",
        FLOWSCORE_S3_RETRY_BUDGET_S="3",
    )
    log = tmp_path / "first.log"
    slack = busy_factor()  # Ray's exit takes longer on a busy machine
    proc = _run(job, env, log)
    try:
        _wait_for(proc, log, rb"commit 1/", 180)
        own_s3_server.pause()
        t0 = time.monotonic()
        rc = _finish(proc, log, 150)
        took = time.monotonic() - t0
    finally:
        own_s3_server.resume()
    text = log.read_text()
    assert rc == 1, text
    _check_clear_failure(text)
    # about 13 s here: the budget, a few 1-s timeouts, Ray exiting
    assert took < 60 * slack, (took, slack)
    _check_no_half_commit(log, _first_run_id(), failed=True)

    rerun = tmp_path / "rerun.log"
    assert _finish(_run(job, env, rerun), rerun, 180) == 0, rerun.read_text()
    _check_exactly_once()
    assert len(_read("image_scores")) == IMAGES
