"""Connecting to Ray and sizing work to the cluster.

``ensure_ray`` starts a local Ray in-process (the embedded default) or joins the cluster at
``--ray-address`` / ``RAY_ADDRESS``. The embedded Ray listens on 127.0.0.1 only and runs with
token authentication (DESIGN promise 9); a cluster that is joined keeps its own settings.
Resource plans leave CPU for the read-and-decode tasks that feed the actors and training
workers: on a small machine a pool that takes every CPU starves its own input and hangs
(FIELD-NOTES).
"""

from __future__ import annotations

import ipaddress
import json
import logging
import math
import os
import secrets
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

__all__ = [
    "ensure_ray",
    "cluster_cpus",
    "node_cpus",
    "WorkerPlan",
    "plan_workers",
    "LOOPBACK",
]

# where the embedded Ray's GCS, raylet, workers and agents listen
LOOPBACK = "127.0.0.1"
_AUTH_MODE_ENV = "RAY_AUTH_MODE"
_AUTH_TOKEN_ENVS = ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")

# Ray Train's worker health-check interval (its default 2 s) for a local Ray; the user's
# value of the variable wins
TRAIN_POLL_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
TRAIN_POLL_S = "0.5"

# tries to start the embedded Ray: its raylet has a fixed 30 s to register, which a busy
# machine (a test suite in three workers on two cores) was seen to miss
LOCAL_START_ATTEMPTS = 3
_log = logging.getLogger("flowscore.ray")

# CPUs kept free for Ray Data's read/decode tasks on a CPU-only cluster
DATA_CPU_RESERVE = 1.0
# passed to a remote cluster's workers (runtime_env) when set in the driver, with the
# FLOWSCORE_S3_* settings: where S3 is, not who we are (credentials stay in each node's chain)
_PASSED_ENV = (
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
)


def ensure_ray(address: str | None = None) -> None:
    """Start (or join) Ray once per process, quietly. ``address`` beats ``RAY_ADDRESS``;
    with neither, a local Ray is started with this machine's CPUs.

    Worker logs are not copied to this terminal (flowscore reports progress itself; Ray
    Train's per-report INFO lines would drown it): ``FLOWSCORE_RAY_LOGS=1`` turns them on,
    and they are always in Ray's session log folder. Errors still reach the driver as
    exceptions with the worker's traceback.

    S3: Ray Data's Iceberg write retries are sized to ``FLOWSCORE_S3_RETRY_BUDGET_S``
    (:func:`pipelines.storage.configure_ray_data`, on every call). A local Ray's workers
    inherit this process's environment; when joining a cluster, the ``FLOWSCORE_S3_*``
    settings and the S3 endpoint and region variables that are set here travel in the job's
    ``runtime_env`` (never credentials: the cluster's nodes take those from their own AWS
    chain).

    Security: the embedded Ray is bound to :data:`LOOPBACK` (GCS, raylet, workers and agents
    listen there and nowhere else) and uses Ray's token authentication. Unless
    ``RAY_AUTH_MODE`` / ``RAY_AUTH_TOKEN`` / ``RAY_AUTH_TOKEN_PATH`` say otherwise, a fresh
    random token is put in this process's ``RAY_AUTH_TOKEN`` (nothing is written to disk);
    Ray's processes and any child process that joins it through ``RAY_ADDRESS`` inherit it.
    When joining a cluster nothing of this is touched: Ray's own settings apply."""
    import ray
    from ray.data import DataContext

    from .storage import S3_ENV, configure_ray_data

    configure_ray_data()
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS", "0")
    # Ray Train's controller looks at its workers every 2 s by default, so a finished (or
    # failed) worker group is noticed up to 2 s late, several times a run: 6.6 s between the
    # last epoch and the result on a 45-s training here, 1.2-1.5 s at 0.5 s. A local Ray's
    # processes inherit it; a cluster keeps its own setting
    os.environ.setdefault(TRAIN_POLL_ENV, TRAIN_POLL_S)
    addr = address or os.environ.get("RAY_ADDRESS") or None
    if addr is not None and addr.strip().lower() == "local":  # Ray: "start a new local one"
        addr = None
    extra: dict[str, object] = {}
    env_vars = {k: os.environ[k] for k in (*S3_ENV, *_PASSED_ENV) if os.environ.get(k)}
    for k in _job_env_vars():  # Ray refuses to merge a key the submitted job sets too
        env_vars.pop(k, None)
    if addr and env_vars:
        extra["runtime_env"] = {"env_vars": env_vars}
    init = dict(
        address=addr,
        include_dashboard=os.environ.get("FLOWSCORE_RAY_DASHBOARD") == "1",
        log_to_driver=os.environ.get("FLOWSCORE_RAY_LOGS") == "1",
        configure_logging=True,
        logging_level="warning",
        **extra,
    )
    if addr is None:
        # "local": always a new Ray of our own. With address=None, ray.init joins a Ray that
        # `ray start` (or a test's ray.cluster_utils.Cluster) registered in Ray's temp folder
        # on this machine: someone else's cluster, with another token (seen as an
        # AuthenticationError while the two-node test ran beside another test)
        init["address"] = "local"
        _start_local_ray(init)
    elif _is_loopback_address(addr):
        # a local Ray of this machine (e.g. a parent's embedded one): connect to it on
        # loopback, where it listens, rather than on the address Ray would resolve
        with _cluster_mode_off():
            ray.init(**init, _node_ip_address=LOOPBACK)  # type: ignore[arg-type]
    else:
        ray.init(**init)  # type: ignore[arg-type]
    if os.environ.get("FLOWSCORE_RAY_LOGS") != "1":
        # Ray Data announces every execution at INFO; flowscore prints its own progress
        logging.getLogger("ray.data").setLevel(logging.ERROR)
    _hide_storage_failures_from_console()
    ctx = DataContext.get_current()
    if os.environ.get("RAY_DATA_DISABLE_PROGRESS_BARS") == "1":
        ctx.enable_progress_bars = False


def _start_local_ray(init: dict[str, object]) -> None:
    """``ray.init(**init)`` for a new local Ray bound to :data:`LOOPBACK`, with token auth.

    Ray 2.60 turns ``_node_ip_address="127.0.0.1"`` into the machine's routable address
    (``services.resolve_ip_for_localhost``) unless "cluster mode" is off, and its gRPC
    servers listen on every interface unless the node's address is exactly 127.0.0.1. So
    cluster mode is switched off for the call (the node can then only be reached on this
    machine, which is the point) and the node address checked afterwards: a local Ray that
    is not on loopback is shut down again and refused."""
    import ray

    _enable_local_token_auth()

    def start() -> None:
        with _cluster_mode_off():
            ray.init(**init, _node_ip_address=LOOPBACK, dashboard_host=LOOPBACK)  # type: ignore[arg-type]

    start_with_retries(start, ray.shutdown)
    node = getattr(ray._private.worker, "_global_node", None)
    ip = getattr(node, "node_ip_address", None)
    if ip != LOOPBACK:
        ray.shutdown()
        raise RuntimeError(
            f"the local Ray started on {ip!r}, not on {LOOPBACK}; refusing to run with Ray "
            "services reachable from the network (this Ray version binds differently: see "
            "pipelines/raycluster.py)"
        )


def start_with_retries(
    start: Callable[[], None], stop: Callable[[], None], attempts: int = LOCAL_START_ATTEMPTS
) -> None:
    """``start()``, again after ``stop()`` when it fails with Ray's startup timeout, at most
    ``attempts`` times; any other error, or the last timeout, is raised as it is."""
    for attempt in range(1, attempts + 1):
        try:
            start()
            return
        except Exception as e:
            if not _is_startup_timeout(e) or attempt == attempts:
                raise
            stop()  # ends what did start (the GCS, a slow raylet) before the next try
            _log.warning(
                "the local Ray did not start in time (attempt %d of %d; is the machine "
                "busy?): starting it again",
                attempt,
                attempts,
            )


def _is_startup_timeout(e: BaseException) -> bool:
    """Ray's own "node timed out during startup" (its raylet must register with the GCS
    within a fixed 30 s, which a machine busy with other work can miss): worth a retry.
    Ray raises it as a bare ``Exception``, so the message is the only mark."""
    return type(e) is Exception and "timed out during startup" in str(e)


@contextmanager
def _cluster_mode_off() -> Iterator[None]:
    """Ray's "no cluster" mode for the duration (what it uses on macOS and Windows): a
    loopback node address stays 127.0.0.1 instead of being replaced by the machine's
    routable address."""
    from ray._private import ray_constants

    was = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = was


def _is_loopback_address(address: str) -> bool:
    """Whether a Ray address (``host:port``; not a Ray Client ``ray://`` one) names this
    machine's loopback interface."""
    if "://" in address:
        return False
    host = address.strip().rsplit(":", 1)[0].strip("[]")
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _enable_local_token_auth() -> None:
    """Token authentication for a local Ray this process starts: ``RAY_AUTH_MODE=token``
    unless set, and a random ``RAY_AUTH_TOKEN`` unless a token is configured. An explicit
    ``RAY_AUTH_MODE`` is respected (Ray's documented opt-out)."""
    mode = os.environ.setdefault(_AUTH_MODE_ENV, "token").strip().lower()
    if mode == "token" and not any(os.environ.get(k) for k in _AUTH_TOKEN_ENVS):
        os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)
    try:  # Ray caches its config (the auth mode included) at first use: read it again
        from ray._raylet import Config  # type: ignore[attr-defined]

        Config.initialize("")
    except (ImportError, AttributeError):  # pragma: no cover - another Ray version
        pass


class _StorageFailureFilter(logging.Filter):
    """Drops Ray Data's console report of a failed execution when S3 outlasted its retries:
    flowscore's CLI says it in one line instead (the report stays in Ray Data's log file).
    Ray logs it while the exception is being handled, so the exception is at hand even when
    the record does not carry it."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR:
            return True
        exc = record.exc_info[1] if record.exc_info else sys.exc_info()[1]
        if exc is None:
            return True
        from .storage import storage_failure

        return storage_failure(exc) is None


def _hide_storage_failures_from_console() -> None:
    for handler in logging.getLogger("ray.data").handlers:
        if type(handler).__name__ == "SessionFileHandler":  # Ray Data's log file
            continue
        if not any(isinstance(f, _StorageFailureFilter) for f in handler.filters):
            handler.addFilter(_StorageFailureFilter())


def _job_env_vars() -> set[str]:
    """Environment variables that the runtime_env of a submitted Ray job (``ray job submit``,
    a KubeRay RayJob) already sets for its workers."""
    raw = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if not raw:
        return set()
    try:
        env = (json.loads(raw).get("runtime_env") or {}).get("env_vars") or {}
        return set(env)
    except (ValueError, AttributeError):
        return set(os.environ)  # unreadable: pass nothing rather than fail to start


def cluster_cpus() -> float:
    import ray

    return float(ray.cluster_resources().get("CPU", 0.0))


@dataclass(frozen=True)
class WorkerPlan:
    """Resources of each of ``workers`` actors (training workers or scorer actors)."""

    workers: int
    cpus_per_worker: float
    threads_per_worker: int
    use_gpu: bool

    def describe(self) -> str:
        dev = "1 GPU" if self.use_gpu else f"{self.cpus_per_worker:g} CPU"
        return f"{self.workers} worker(s) × ({dev}, {self.threads_per_worker} torch thread(s))"


def node_cpus() -> list[float]:
    """The CPUs of each alive node of the cluster."""
    import ray

    return [float(n["Resources"].get("CPU", 0.0)) for n in ray.nodes() if n.get("Alive")]


def plan_workers(workers: int, use_gpu: bool, nodes: Sequence[float] | None = None) -> WorkerPlan:
    """Split the cluster's CPUs between ``workers`` and the data tasks feeding them.

    CPU workers get the largest share ``s`` (in hundredths of a CPU, at least 0.1) such that
    the nodes hold ``workers`` of them while **each node** keeps :data:`DATA_CPU_RESERVE`
    CPUs for reading and decoding: ``Σ floor((cpus_node − reserve) / s) ≥ workers``. On one
    node of C CPUs that is ``(C − 1) / workers`` (2 workers on 2 CPUs get 0.5 each). Keeping
    the reserve per node matters on a cluster: a share of ``(total − 1) / workers`` gave 2
    workers on two 16-CPU nodes 15.5 CPUs each, leaving no node the whole CPU a decode task
    needs, and the run waited for ever. Torch threads per worker are the whole CPUs of its
    share (at least 1). GPU workers take 1 GPU and 1 CPU each."""
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    cpus = list(node_cpus() if nodes is None else nodes)
    if use_gpu:
        total = sum(cpus)
        return WorkerPlan(workers, 1.0, max(1, int(total // max(1, workers)) - 1), True)
    free = [c - DATA_CPU_RESERVE for c in cpus if c - DATA_CPU_RESERVE > 0]

    def fits(share: float) -> bool:
        return sum(math.floor(f / share + 1e-9) for f in free) >= workers

    candidates = sorted({f / k for f in free for k in range(1, workers + 1)}, reverse=True)
    share = next((c for c in candidates if fits(c)), 0.0)
    share = math.floor(share * 100 + 1e-6) / 100
    if share < 0.1 or not fits(share):
        per_node = ", ".join(f"{c:g}" for c in cpus)
        raise ValueError(
            f"{workers} workers do not fit in the cluster's CPUs ({per_node} per node) "
            f"with {DATA_CPU_RESERVE:g} CPU kept on each node for reading and decoding; "
            "use fewer workers"
        )
    return WorkerPlan(workers, share, max(1, int(share)), False)
