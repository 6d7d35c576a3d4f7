"""Shared fixtures: small fitted scorers built from generated data (nothing downloaded), and
servers started once per session (a real ``mlflow server``, a ``moto_server`` for S3)."""

from __future__ import annotations

import os
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.request
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")

from flowcore.fit import ScorerSpec, fit_scorer  # noqa: E402
from flowcore.flows import MAFConfig  # noqa: E402
from flowcore.scorer import Scorer  # noqa: E402
from flowcore.training import FitConfig  # noqa: E402
from flowcore.windows import WindowConfig  # noqa: E402
from pipelines.settings import Settings  # noqa: E402

# what the CLI does before every command (jobs/cli.py): MLflow's HTTP limits, which MLflow
# reads only from its own variables, for the tests that call pipelines.tracking directly
os.environ.update(Settings.from_env().mlflow_http.env())


#: a spec override (TOML) small enough that Ray Train fits it in seconds: the training tests'
#: and the distillation test's teacher
TINY_SPEC = """
windows_per_image = 256
basis_rows = 2000
val_fraction = 0.2
[featurizer]
type = "windows"
window = 5
stride = 2
scale = 0.5
[flow]
type = "maf"
blocks = 2
hidden = 48
[fit]
max_epochs = 3
batch_size = 256
lr = 0.005
"""


def texture(n: int, h: int, w: int, seed: int) -> list[np.ndarray]:
    """Smooth brownish random texture: normal images for the small tests."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        coarse = rng.normal(0, 1, (h // 4 + 2, w // 4 + 2, 1))
        up = np.repeat(np.repeat(coarse, 4, 0), 4, 1)[:h, :w]
        base = np.array([150.0, 110.0, 60.0]) + 25 * up + rng.normal(0, 6, (h, w, 3))
        out.append(np.clip(base, 0, 255).astype(np.uint8))
    return out


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    crc = zlib.crc32(kind + payload) & 0xFFFFFFFF
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)


def png_bomb(width: int, height: int) -> bytes:
    """A valid, all-black 1-bit PNG of width x height, compressed in streaming fashion: a
    few kB on disk, width × height pixels when decoded."""
    row = b"\x00" + b"\x00" * ((width + 7) // 8)
    comp = zlib.compressobj(9)
    parts = [comp.compress(row * 1000) for _ in range(height // 1000)]
    parts.append(comp.compress(row * (height % 1000)))
    parts.append(comp.flush())
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", b"".join(parts))
        + png_chunk(b"IEND", b"")
    )


#: seconds an idle machine of this kind (2 cores) takes for :func:`busy_factor`'s probe
#: (4.3-4.6 s measured)
_PROBE_IDLE_S = 4.5


def busy_factor() -> float:
    """How much slower than idle this machine is right now (>= 1): the time a fresh Python
    takes to import what a ``flowscore`` child imports, over the idle time. Tests whose point
    is a time bound (a run must give up within its budget) scale the slack they allow for
    start-up by it, so a busy machine makes them slower, not red."""
    t0 = time.monotonic()
    subprocess.run(
        [sys.executable, "-c", "import torch, ray.data, pyiceberg.catalog.sql, mlflow"],
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return max(1.0, (time.monotonic() - t0) / _PROBE_IDLE_S)


@pytest.fixture(scope="session")
def small_scorer() -> Scorer:
    """A window scorer fitted in about a second on generated textures."""
    torch.manual_seed(0)
    spec = ScorerSpec(
        featurizer=WindowConfig(window=8, stride=4, components=16),
        flow=MAFConfig(blocks=2, hidden=32),
        fit=FitConfig(max_epochs=8, batch_size=256, lr=3e-3),
        windows_per_image=200,
        basis_rows=2000,
    )
    scorer, _ = fit_scorer(texture(12, 48, 64, 1), texture(4, 48, 64, 2), spec)
    return scorer


# ---------------------------------------------------------------------------------------
# Servers: a real `mlflow server` and a `moto_server` (S3), each started once per session
# on a free port of 127.0.0.1 and stopped (with all its children) when the session ends.
# ---------------------------------------------------------------------------------------


def _free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _venv_tool(name: str) -> list[str] | None:
    """The console script ``name`` installed next to this interpreter, if there is one."""
    exe = Path(sys.executable).parent / name
    return [str(exe)] if exe.exists() else None


def _die_with_parent() -> None:  # runs in the child between fork and exec (Linux only)
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG: no orphans if pytest is killed
    except Exception:
        pass


def _start(cmd: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start ``cmd`` in its own process group, output to ``log``."""
    with open(log, "wb") as out:
        return subprocess.Popen(
            cmd,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
            preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
        )


def _stop(proc: subprocess.Popen, grace_s: float = 10.0) -> None:
    """SIGTERM the process group of ``proc``; SIGKILL it after ``grace_s`` seconds."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            pass
    try:  # children (uvicorn workers) may outlive the CLI process for a moment
        os.killpg(proc.pid, 0)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=5)


def _log_tail(log: Path, chars: int = 4000) -> str:
    try:
        return log.read_text(errors="replace")[-chars:]
    except OSError:
        return "(no output)"


def _wait_http(
    url: str, proc: subprocess.Popen, log: Path, what: str, timeout_s: float, ok_any: bool
) -> None:
    """Poll ``url`` until it answers (200, or any HTTP status if ``ok_any``) or fail the test."""
    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            pytest.fail(
                f"{what} exited with status {proc.returncode} before answering {url}:\n"
                f"{_log_tail(log)}",
                pytrace=False,
            )
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except urllib.error.HTTPError:
            if ok_any:
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            pytest.fail(
                f"{what} did not answer {url} within {timeout_s:g} s; its output:\n"
                f"{_log_tail(log)}",
                pytrace=False,
            )
        time.sleep(0.25)


class MlflowServer:
    """A real ``mlflow server`` process (see :func:`start_mlflow_server`) that a test may
    pause, resume or kill: ``uri`` is ``http://127.0.0.1:PORT``."""

    def __init__(self, proc: subprocess.Popen, uri: str, log: Path) -> None:
        self.proc, self.uri, self.log = proc, uri, log

    def _signal(self, sig: int) -> None:
        try:
            os.killpg(self.proc.pid, sig)  # the CLI and its uvicorn worker(s)
        except ProcessLookupError:
            pass

    def pause(self) -> None:
        """SIGSTOP: the port still accepts TCP connections, nothing ever answers."""
        self._signal(signal.SIGSTOP)

    def resume(self) -> None:
        self._signal(signal.SIGCONT)

    def kill(self) -> None:
        """SIGKILL the whole server at once (the port closes)."""
        self._signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        self.resume()
        _stop(self.proc)


def start_mlflow_server(root: Path) -> MlflowServer:
    """Start a real ``mlflow server`` on a free port of 127.0.0.1 with its SQLite store and
    artifacts under ``root``, in its own process group, and wait until it answers (about
    10 s). One worker and MLflow's job runner disabled to save memory. Stop it with
    :meth:`MlflowServer.stop`."""
    root.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    cmd = (_venv_tool("mlflow") or [sys.executable, "-m", "mlflow"]) + [
        "server",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--backend-store-uri",
        f"sqlite:///{root / 'mlflow.db'}",
        "--serve-artifacts",
        "--artifacts-destination",
        str(root / "artifacts"),
        "--workers",
        "1",
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"  # no huey job-runner processes
    log = root / "server.log"
    proc = _start(cmd, log, env)
    uri = f"http://127.0.0.1:{port}"
    try:
        _wait_http(f"{uri}/health", proc, log, "mlflow server", timeout_s=60, ok_any=False)
    except BaseException:
        _stop(proc)
        raise
    return MlflowServer(proc, uri, log)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real ``mlflow server`` on 127.0.0.1 (SQLite backend, proxied local artifacts).

    Yields its URI ``http://127.0.0.1:PORT``. Started once per session (about 10 s), with one
    worker and MLflow's job runner disabled to save memory; stopped with SIGTERM (then
    SIGKILL after 10 s) at the end of the session. Mark tests that use it ``mlflow_server``.
    """
    server = start_mlflow_server(tmp_path_factory.mktemp("mlflow-server"))
    try:
        yield server.uri
    finally:
        server.stop()


@pytest.fixture
def own_mlflow_server(tmp_path: Path) -> Iterator[MlflowServer]:
    """A real ``mlflow server`` for one test, which it may pause (SIGSTOP), resume or kill;
    resumed and stopped when the test ends, whatever it did. Mark the test ``mlflow_server``."""
    server = start_mlflow_server(tmp_path / "mlflow-server")
    try:
        yield server
    finally:
        server.stop()


_AWS_ENV = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")


def _start_moto(log: Path) -> tuple[subprocess.Popen, int]:
    """A ``moto_server`` on a free port of 127.0.0.1, logging to ``log``."""
    port = _free_port()
    cmd = _venv_tool("moto_server") or [sys.executable, "-m", "moto.server"]
    return _start([*cmd, "-H", "127.0.0.1", "-p", str(port)], log), port


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A ``moto_server`` (in-memory S3) on 127.0.0.1, for the whole session.

    Sets ``AWS_ENDPOINT_URL`` to it and fake credentials (``testing``) and region
    (``us-east-1``) in ``os.environ`` until the session ends, then restores them; yields the
    endpoint URL. Create buckets with :func:`make_bucket`. Mark tests that use it ``s3``.
    """
    root = tmp_path_factory.mktemp("moto")
    log = root / "moto.log"
    proc, port = _start_moto(log)
    saved = {k: os.environ.get(k) for k in _AWS_ENV}
    try:
        endpoint = f"http://127.0.0.1:{port}"
        _wait_http(endpoint, proc, log, "moto_server", timeout_s=30, ok_any=True)
        os.environ.update(
            {
                "AWS_ENDPOINT_URL": endpoint,
                "AWS_ACCESS_KEY_ID": "testing",
                "AWS_SECRET_ACCESS_KEY": "testing",
                "AWS_DEFAULT_REGION": "us-east-1",
            }
        )
        yield endpoint
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        _stop(proc)


def make_bucket(name: str) -> None:
    """Create S3 bucket ``name`` on the ``s3_server`` (idempotent).

    Uses boto3 with endpoint, credentials and region from the environment the fixture set;
    no ``region_name`` or location constraint is passed (with moto that broke creation).
    """
    import boto3

    s3 = boto3.client("s3", endpoint_url=os.environ.get("AWS_ENDPOINT_URL"))
    try:
        s3.create_bucket(Bucket=name)
    except s3.exceptions.BucketAlreadyOwnedByYou:
        pass


class MotoServer:
    """A ``moto_server`` process of one test (see :func:`own_s3_server`) that the test may
    pause and resume: ``endpoint`` is ``http://127.0.0.1:PORT``."""

    def __init__(self, proc: subprocess.Popen, endpoint: str, log: Path) -> None:
        self.proc, self.endpoint, self.log = proc, endpoint, log

    def _signal(self, sig: int) -> None:
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass

    def pause(self) -> None:
        """SIGSTOP: the port still accepts TCP connections (the kernel queues them), but
        nothing answers: every request waits for its timeout. State is kept."""
        self._signal(signal.SIGSTOP)

    def resume(self) -> None:
        self._signal(signal.SIGCONT)

    def env(self) -> dict[str, str]:
        """Endpoint, fake credentials and region for a process that talks to this server."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
        }

    def stop(self) -> None:
        self.resume()
        _stop(self.proc)


@pytest.fixture
def own_s3_server(tmp_path: Path) -> Iterator[MotoServer]:
    """A ``moto_server`` for one test, which it may pause (SIGSTOP) and resume; resumed and
    stopped when the test ends, whatever it did. Unlike :func:`s3_server` it sets nothing in
    ``os.environ``: use :meth:`MotoServer.env`. Mark the test ``s3``."""
    log = tmp_path / "moto.log"
    proc, port = _start_moto(log)
    server = MotoServer(proc, f"http://127.0.0.1:{port}", log)
    try:
        _wait_http(server.endpoint, proc, log, "moto_server", timeout_s=30, ok_any=True)
        yield server
    finally:
        server.stop()


@pytest.fixture
def flowscore_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh ``FLOWSCORE_HOME`` for one test, with ``MLFLOW_TRACKING_URI`` unset."""
    home = tmp_path / "flowscore-home"
    home.mkdir()
    monkeypatch.setenv("FLOWSCORE_HOME", str(home))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    return home


@pytest.fixture(scope="session")
def ray_session(s3_server: str) -> Iterator[None]:
    """Local Ray, started once per session (use with marker ``ray``). The S3 server starts
    first so that Ray's worker processes inherit its endpoint and test credentials."""
    import ray

    from pipelines.raycluster import ensure_ray

    ensure_ray()
    yield
    ray.shutdown()


@pytest.fixture
def ray_address(ray_session: None) -> str:
    """The session's Ray cluster, for children to join (``--ray-address``) instead of each
    starting its own (a fresh local Ray costs a child several seconds of CPU in Ray's own
    Python processes)."""
    import ray

    return str(ray.get_runtime_context().gcs_address)


# ---------------------------------------------------------------------------------------
# Jobs and tables: helpers shared by the nightly-job and fault tests
# ---------------------------------------------------------------------------------------


def write_job(
    where: Path,
    archive: Path | str,
    model: str,
    extra: str = "",
    name: str = "t",
    commit_every: int = 5,
) -> Path:
    """A job spec ``<where>/<name>.toml``; ``extra`` is appended to its ``[score]`` table."""
    p = where / f"{name}.toml"
    p.write_text(
        f'[job]\nname = "{name}"\narchive = "{archive}"\nmodel = "{model}"\n'
        f"[score]\ncommit_every = {commit_every}\n{extra}"
    )
    return p


def read_table(name: str) -> pa.Table:
    """All rows of ``flowscore.<name>`` in the catalog of the current ``FLOWSCORE_HOME``."""
    from pipelines import tables

    return tables.load_catalog_().load_table(f"flowscore.{name}").scan().to_arrow()


def check_exactly_once(archive: Path) -> None:
    """Every file of ``archive`` is in exactly one of ``image_scores`` and
    ``scoring_errors``, once (one model version in the tables)."""
    from pipelines.archive import list_archive

    listed = {(e.image_uri, e.etag) for e in list_archive(str(archive))}
    scores, errors = read_table("image_scores"), read_table("scoring_errors")
    s = list(zip(scores["image_uri"].to_pylist(), scores["etag"].to_pylist(), strict=True))
    e = list(zip(errors["image_uri"].to_pylist(), errors["etag"].to_pylist(), strict=True))
    assert len(s) == len(set(s)) and len(e) == len(set(e))
    assert set(s) | set(e) == listed and not set(s) & set(e)


# --------------------------------------------------------------------- parallel runs
# `make test` runs the suite in a few pytest-xdist workers (``--dist loadgroup``): most of
# its wall time is child processes starting, servers answering and leases running out, which
# overlap well. Two rules make that pay: the longest tests start first, and a module whose
# module-scoped fixture is expensive (a model trained through Ray Train, say) runs in one
# worker, so the fixture is built once.
_ONE_WORKER_MODULES = frozenset(
    {"test_train", "test_faults", "test_score", "test_report", "test_precision", "test_cnn"}
)
_FIRST = ("faults", "slow", "ray", "mlflow_server", "s3")  # the longer kinds of test, in order


def _start_order(item: pytest.Item) -> int:
    marks = {m.name for m in item.iter_markers()}
    return next((i for i, name in enumerate(_FIRST) if name in marks), len(_FIRST))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    def module(item: pytest.Item) -> str:
        return item.nodeid.split("::", 1)[0].rsplit("/", 1)[-1].removesuffix(".py")

    first: dict[str, int] = {}
    for item in items:
        name = module(item)
        first[name] = min(first.get(name, len(_FIRST)), _start_order(item))
        if name in _ONE_WORKER_MODULES:
            item.add_marker(pytest.mark.xdist_group(name))
    # whole modules move (a module's fixtures are built once in a serial run too), the ones
    # with the longer kinds of test first; file order otherwise
    order = {id(item): i for i, item in enumerate(items)}
    items.sort(key=lambda item: (first[module(item)], order[id(item)]))
