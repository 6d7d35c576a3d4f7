"""Connecting to Ray and sizing work to the cluster.

``ensure_ray`` starts a local Ray in-process (the embedded default) or joins the cluster at
``--ray-address`` / ``RAY_ADDRESS``. Resource plans leave CPU for the read-and-decode tasks
that feed the actors and training workers: on a small machine a pool that takes every CPU
starves its own input and hangs (FIELD-NOTES).
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
from dataclasses import dataclass

__all__ = ["ensure_ray", "cluster_cpus", "WorkerPlan", "plan_workers"]

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
    chain)."""
    import ray
    from ray.data import DataContext

    from .storage import S3_ENV, configure_ray_data

    configure_ray_data()
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS", "0")
    addr = address or os.environ.get("RAY_ADDRESS") or None
    extra: dict[str, object] = {}
    env_vars = {k: os.environ[k] for k in (*S3_ENV, *_PASSED_ENV) if os.environ.get(k)}
    for k in _job_env_vars():  # Ray refuses to merge a key the submitted job sets too
        env_vars.pop(k, None)
    if addr and env_vars:
        extra["runtime_env"] = {"env_vars": env_vars}
    ray.init(
        address=addr,
        include_dashboard=os.environ.get("FLOWSCORE_RAY_DASHBOARD") == "1",
        log_to_driver=os.environ.get("FLOWSCORE_RAY_LOGS") == "1",
        configure_logging=True,
        logging_level="warning",
        **extra,  # type: ignore[arg-type]
    )
    if os.environ.get("FLOWSCORE_RAY_LOGS") != "1":
        # Ray Data announces every execution at INFO; flowscore prints its own progress
        logging.getLogger("ray.data").setLevel(logging.ERROR)
    _hide_storage_failures_from_console()
    ctx = DataContext.get_current()
    if os.environ.get("RAY_DATA_DISABLE_PROGRESS_BARS") == "1":
        ctx.enable_progress_bars = False


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


def plan_workers(workers: int, use_gpu: bool, total_cpus: float | None = None) -> WorkerPlan:
    """Split the cluster's CPUs between ``workers`` and the data tasks feeding them.

    CPU workers share what is left after :data:`DATA_CPU_RESERVE` CPUs for reading and
    decoding (fractions allowed: 2 workers on 2 CPUs get 0.5 each); torch threads per worker
    are the whole CPUs of its share (at least 1). GPU workers take 1 GPU and 1 CPU each."""
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    total = cluster_cpus() if total_cpus is None else total_cpus
    if use_gpu:
        return WorkerPlan(workers, 1.0, max(1, int(total // max(1, workers)) - 1), True)
    share = (total - DATA_CPU_RESERVE) / workers
    if share < 0.1:
        raise ValueError(
            f"{workers} workers do not fit in {total:g} CPUs with {DATA_CPU_RESERVE:g} CPU kept "
            "for reading and decoding; use fewer workers"
        )
    share = math.floor(share * 100) / 100
    return WorkerPlan(workers, share, max(1, int(share)), False)
