"""Connecting to Ray and sizing work to the cluster.

``ensure_ray`` starts a local Ray in-process (the embedded default) or joins the cluster at
``--ray-address`` / ``RAY_ADDRESS``. Resource plans leave CPU for the read-and-decode tasks
that feed the actors and training workers: on a small machine a pool that takes every CPU
starves its own input and hangs (FIELD-NOTES).
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass

__all__ = ["ensure_ray", "cluster_cpus", "WorkerPlan", "plan_workers"]

# CPUs kept free for Ray Data's read/decode tasks on a CPU-only cluster
DATA_CPU_RESERVE = 1.0


def ensure_ray(address: str | None = None) -> None:
    """Start (or join) Ray once per process, quietly. ``address`` beats ``RAY_ADDRESS``;
    with neither, a local Ray is started with this machine's CPUs.

    Worker logs are not copied to this terminal (flowscore reports progress itself; Ray
    Train's per-report INFO lines would drown it): ``FLOWSCORE_RAY_LOGS=1`` turns them on,
    and they are always in Ray's session log folder. Errors still reach the driver as
    exceptions with the worker's traceback."""
    import ray
    from ray.data import DataContext

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS", "0")
    addr = address or os.environ.get("RAY_ADDRESS") or None
    ray.init(
        address=addr,
        include_dashboard=os.environ.get("FLOWSCORE_RAY_DASHBOARD") == "1",
        log_to_driver=os.environ.get("FLOWSCORE_RAY_LOGS") == "1",
        configure_logging=True,
        logging_level="warning",
    )
    if os.environ.get("FLOWSCORE_RAY_LOGS") != "1":
        # Ray Data announces every execution at INFO; flowscore prints its own progress
        logging.getLogger("ray.data").setLevel(logging.ERROR)
    ctx = DataContext.get_current()
    if os.environ.get("RAY_DATA_DISABLE_PROGRESS_BARS") == "1":
        ctx.enable_progress_bars = False


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
