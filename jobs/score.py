"""``flowscore score``: stream an archive through scorer actors into the Iceberg tables.

The model URI is resolved once (an alias that moves mid-run changes nothing; every row
carries the version resolved at the start). The listing is cut into chunks of
``commit_every`` images; each chunk is decoded by CPU tasks, scored by the actor pool and
committed to ``image_scores`` and ``scoring_errors`` (UPSERT on the key), so a crash loses at
most one chunk and a rerun doubles nothing. A ``runs`` row follows the run from start to
finish, and an MLflow run records images/s, counts and the error rate.
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

__all__ = ["ScoreRequest", "ScoreOutcome", "ScoreUsageError", "run_score", "model_identity"]

Log = Callable[[str], None]
EXPERIMENT = "flowscore-score"


class ScoreUsageError(ValueError):
    """Bad input: exit code 2."""


@dataclass(frozen=True)
class ScoreRequest:
    archive: str
    model: str
    actors: int = 1
    use_gpu: bool = False
    heatmaps: bool = True
    commit_every: int = 5000
    job: str = "score"
    threads: int | None = None
    batch_size: int = 8
    ray_address: str | None = None
    only: tuple[tuple[str, tuple[str, ...]], ...] = ()
    # (image_uri, etag) pairs not to score (the nightly job's incremental subtraction)
    skip: frozenset[tuple[str, str]] = field(default_factory=frozenset)


@dataclass
class ScoreOutcome:
    run_id: str
    model_name: str
    model_version: str
    listed: int
    scored: int
    failed: int
    skipped: int
    seconds: float

    @property
    def images_per_s(self) -> float:
        return (self.scored + self.failed) / self.seconds if self.seconds > 0 else 0.0

    @property
    def error_rate(self) -> float:
        done = self.scored + self.failed
        return self.failed / done if done else 0.0


def model_identity(resolved: Any) -> tuple[str, str]:
    """(model_name, model_version) written with every row. A registry model gives its name
    and version; a local bundle directory its folder name and ``sha-<12 hex>`` of its
    weights, so two different local bundles never share a key."""
    if resolved.name and resolved.version:
        return str(resolved.name), str(resolved.version)
    weights = Path(resolved.path) / "weights.safetensors"
    h = hashlib.sha256()
    with open(weights, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return Path(resolved.path).name, f"sha-{h.hexdigest()[:12]}"


def _chunks(items: Sequence[Any], size: int) -> list[Sequence[Any]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def run_score(req: ScoreRequest, log: Log) -> ScoreOutcome:
    from flowcore.bundle import BundleError, read_meta
    from pipelines import tables, tracking
    from pipelines.archive import ArchiveError, list_archive
    from pipelines.raycluster import cluster_cpus, ensure_ray, plan_workers
    from pipelines.score import ScoreConfig, score_chunk

    if req.commit_every < 1 or req.actors < 1 or req.batch_size < 1:
        raise ScoreUsageError("--commit-every, --actors and --batch-size must be >= 1")
    t0 = time.perf_counter()
    resolved = tracking.resolve_model(req.model)  # once: every row carries this version
    try:
        read_meta(resolved.path)
    except BundleError as e:
        raise ScoreUsageError(str(e)) from e
    model_name, model_version = model_identity(resolved)
    log(f"model: {req.model} -> {model_name} version {model_version}")
    try:
        listed = sorted(list_archive(req.archive), key=lambda e: e.path)
    except ArchiveError as e:
        raise ScoreUsageError(str(e)) from e
    for key, values in req.only:
        listed = [e for e in listed if e.columns.get(key) in values]
    todo = [e for e in listed if (e.image_uri, e.etag) not in req.skip]
    skipped = len(listed) - len(todo)
    path_columns = sorted({k for e in listed for k in e.columns})
    log(
        f"archive: {len(listed)} images listed"
        + (" (after --only)" if req.only else "")
        + (f", {skipped} already scored by version {model_version}" if skipped else "")
        + (f"; path columns {', '.join(path_columns)}" if path_columns else "")
    )
    catalog = tables.load_catalog_()
    tables.ensure_tables(catalog, path_columns)
    run_id = uuid.uuid4().hex
    started = datetime.now(UTC).replace(tzinfo=None)
    tables.record_run_start(
        catalog,
        run_id=run_id,
        job=req.job,
        model_name=model_name,
        model_version=model_version,
        archive=tracking.scrub_text(req.archive),
        started_at=started,
        images_listed=len(listed),
    )
    mlflow_run = _mlflow_start(req, model_name, model_version, run_id, log)
    scored = failed = 0
    status = "failed"
    try:
        if todo:
            ensure_ray(req.ray_address)
            plan = plan_workers(req.actors, req.use_gpu)
            threads = req.threads or max(1, int(cluster_cpus() // req.actors))
            if req.use_gpu:
                threads = req.threads or plan.threads_per_worker
            cfg = ScoreConfig(
                bundle_path=str(resolved.path),
                model_name=model_name,
                model_version=model_version,
                run_id=run_id,
                heatmaps=req.heatmaps,
                threads=threads,
                device="cuda" if req.use_gpu else "cpu",
                batch_size=req.batch_size,
                pid_dir=os.environ.get("FLOWSCORE_TEST_ACTOR_PID_DIR") or None,
            )
            chunks = _chunks(todo, req.commit_every)
            log(
                f"scoring {len(todo)} images in {len(chunks)} commit(s) of up to "
                f"{req.commit_every} on {req.actors} actor(s) × ({plan.cpus_per_worker:g} "
                f"{'GPU' if req.use_gpu else 'CPU'}, {threads} torch thread(s))"
            )
            scores_schema = tables.image_scores_arrow_schema(path_columns)
            t_score = time.perf_counter()
            for k, chunk in enumerate(chunks, start=1):
                res = score_chunk(
                    chunk,
                    path_columns,
                    cfg,
                    actors=req.actors,
                    cpus_per_actor=plan.cpus_per_worker,
                    gpus_per_actor=1.0 if req.use_gpu else 0.0,
                    scores_schema=scores_schema,
                    errors_schema=tables.SCORING_ERRORS_SCHEMA,
                    catalog_kwargs=tables.catalog_config(),
                )
                scored += res.scored
                failed += res.failed
                done = scored + failed
                rate = done / (time.perf_counter() - t_score)
                left = (len(todo) - done) / rate if rate > 0 else 0.0
                log(
                    f"  commit {k}/{len(chunks)}: {res.scored} scored, {res.failed} failed "
                    f"in {res.seconds:.1f} s; {done}/{len(todo)} done, {rate:.1f} images/s, "
                    f"~{left:.0f} s left"
                )
        else:
            log("nothing to score")
        status = "succeeded"
    finally:
        seconds = time.perf_counter() - t0
        outcome = ScoreOutcome(
            run_id, model_name, model_version, len(listed), scored, failed, skipped, seconds
        )
        tables.record_run_end(
            catalog,
            run_id=run_id,
            finished_at=datetime.now(UTC).replace(tzinfo=None),
            status=status,
            images_scored=scored,
            images_skipped=skipped,
            images_failed=failed,
            images_per_s=outcome.images_per_s,
        )
        _mlflow_end(mlflow_run, outcome, status, log)
    return outcome


def _mlflow_start(
    req: ScoreRequest, model_name: str, model_version: str, run_id: str, log: Log
) -> tuple[Any, str] | None:
    """An MLflow run for this scoring run; scoring goes on without it when MLflow is down
    (the runs table still records everything)."""
    from pipelines import tracking

    try:
        c = tracking.client()
        exp = tracking.ensure_experiment(c, EXPERIMENT)
        run = c.create_run(
            exp,
            run_name=f"{req.job}-{run_id[:8]}",
            tags={
                "flowscore.job": req.job,
                "flowscore.run_id": run_id,
                "flowscore.model_name": model_name,
                "flowscore.model_version": model_version,
            },
        )
        tracking.log_params(
            c,
            run.info.run_id,
            tracking.safe_params(
                {
                    "archive": req.archive,
                    "model_uri": req.model,
                    "actors": req.actors,
                    "use_gpu": req.use_gpu,
                    "heatmaps": req.heatmaps,
                    "commit_every": req.commit_every,
                }
            ),
        )
        return c, run.info.run_id
    except Exception as e:  # noqa: BLE001 - tracking is secondary to scoring
        log(f"warning: MLflow unavailable, scoring without an MLflow run ({e})")
        return None


def _mlflow_end(handle: tuple[Any, str] | None, out: ScoreOutcome, status: str, log: Log) -> None:
    from pipelines import tracking

    if handle is None:
        return
    c, mlflow_run_id = handle
    now = int(time.time() * 1000)
    try:
        tracking.log_metrics(
            c,
            mlflow_run_id,
            [
                ("images_listed", float(out.listed), 0, now),
                ("images_scored", float(out.scored), 0, now),
                ("images_failed", float(out.failed), 0, now),
                ("images_skipped", float(out.skipped), 0, now),
                ("images_per_s", out.images_per_s, 0, now),
                ("error_rate", out.error_rate, 0, now),
            ],
        )
        c.set_terminated(mlflow_run_id, "FINISHED" if status == "succeeded" else "FAILED")
    except Exception as e:  # noqa: BLE001
        log(f"warning: could not finish the MLflow run ({e})")


def print_summary(out: ScoreOutcome, warehouse: str) -> None:
    print(
        f"run {out.run_id}: {out.scored} scored, {out.failed} failed, {out.skipped} skipped "
        f"of {out.listed} listed; {out.images_per_s:.1f} images/s; model "
        f"{out.model_name} version {out.model_version}",
        file=sys.stderr,
    )
    print(
        f"tables: flowscore.image_scores, flowscore.scoring_errors, flowscore.runs in {warehouse}"
    )
