"""Scoring an archive (``flowscore score``): stream it through scorer actors into the tables.

The model URI is resolved once (an alias that moves mid-run changes nothing; every row
carries the version resolved at the start). The listing streams through Ray Data (decode
tasks, then the actor pool) and the driver commits every ``commit_every`` images to
``image_scores`` and ``scoring_errors`` (UPSERT on the key) while the stream goes on, so a
crash loses at most one chunk and a rerun doubles nothing. A ``runs`` row follows the run
from start to finish, and an MLflow run records images/s, counts and the error rate.

MLflow is secondary: when it is down once the model is resolved, scoring goes on, the
warning is printed, and the ``runs`` row says so (``mlflow_run_id`` null, ``warnings`` naming
the store). The bundle is loaded in full on the driver first (:func:`check_bundle`), so a
bad one is refused before the catalog or Ray are touched.
"""

from __future__ import annotations

import hashlib
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..log import Log
from ..redact import redact

if TYPE_CHECKING:
    from ..selection import Only

__all__ = [
    "ScoreRequest",
    "ScoreOutcome",
    "ScoreUsageError",
    "run_score",
    "model_identity",
    "check_bundle",
]

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
    # images per scorer call and per Ray block: 16 measured 19.4 images/s against 17.8 for 8
    # and 19.8 for 32 (grain-full, 460×640, 1 actor, 2 cores); memory grows ~7 MB per image
    batch_size: int = 16
    ray_address: str | None = None
    only: Only = ()
    # ``model`` already resolved *and checked* (check_bundle) by the caller (a
    # pipelines.tracking.ResolvedModel): used as is, so the registry is not asked again and
    # the bundle not loaded twice (the nightly job pins and checks its version at start)
    resolved: Any = None
    # with ``resolved``: what check_bundle returned for it (the precisions it passed in)
    validated_precisions: tuple[str, ...] = ("fp32",)
    # the archive's listing, when the caller has it already (the nightly job lists it to
    # subtract what is done): used as is, so a large archive is not listed twice
    listed: Sequence[Any] | None = None
    # with ``listed``: the entries of it still to score, in its order, when the caller has
    # subtracted what is done (the nightly job, pipelines.incremental.pending); None: all
    todo: tuple[Any, ...] | None = None
    # the featurizer's arithmetic: fp32, bf16 or auto (flowcore.scorer.resolve_precision)
    precision: str = "fp32"
    # test-time transforms per image (flowcore.scorer.TRANSFORMS); None: the model's own
    transforms: int | None = None
    # what the heatmap column holds: "likelihood" (the window log-likelihood grid) or
    # "gradient" (minus the gradient map, CNN models only; flowcore.gradient)
    heatmap: str = "likelihood"
    # the command's settings (pipelines.settings.Settings, read once by the CLI); None: read
    # the environment here
    settings: Any = None
    # test hook: each scorer actor leaves a file named by its pid here (the kill tests)
    actor_pid_dir: str | None = None
    # called right before each commit; raises to stop the run (the nightly job's lock
    # fencing, pipelines.lock.JobLock.check)
    fence: Callable[[], None] | None = None


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
    # time from the start of scoring (Ray up, listing done) to the last commit
    scoring_seconds: float = 0.0

    @property
    def images_per_s(self) -> float:
        return (self.scored + self.failed) / self.seconds if self.seconds > 0 else 0.0

    @property
    def error_rate(self) -> float:
        done = self.scored + self.failed
        return self.failed / done if done else 0.0


def model_identity(resolved: Any) -> tuple[str, str]:
    """(model_name, model_version) written with every row. A registry model gives its name
    and version; a local bundle directory its folder name and ``sha-<12 hex>`` of the whole
    bundle (its JSON, with the threshold and image score, and its weights), so two local
    bundles that would score differently never share a key."""
    from flowcore.bundle import META_FILE, WEIGHTS_FILE

    if resolved.name and resolved.version:
        return str(resolved.name), str(resolved.version)
    root = Path(resolved.path)
    h = hashlib.sha256()
    for file in (META_FILE, WEIGHTS_FILE):
        p = root / file
        h.update(file.encode() + b"\0" + p.stat().st_size.to_bytes(8, "big"))
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return root.name, f"sha-{h.hexdigest()[:12]}"


def check_bundle(path: str | Path, heatmap: str = "likelihood") -> tuple[str, ...]:
    """Load the bundle at ``path`` in full on the CPU (its JSON, and every tensor's name,
    shape and dtype against the model the JSON describes; nothing is unpickled), so that a
    bad bundle is refused in one line naming the file before the catalog or Ray are touched,
    not by every scorer actor later; likewise a ``heatmap`` kind the model does not offer
    (the gradient map is for CNN models). Returns the precisions the model was validated in.
    Raises :class:`ScoreUsageError`."""
    from flowcore.bundle import BundleError, load_bundle
    from flowcore.gradient import HEATMAP_KINDS, GradientMapError, check_gradient_support

    if heatmap not in HEATMAP_KINDS:
        raise ScoreUsageError(
            f"--heatmap must be one of {', '.join(HEATMAP_KINDS)}, not {heatmap!r}"
        )
    try:
        scorer = load_bundle(path, device="cpu")
        if heatmap == "gradient":
            check_gradient_support(scorer)
    except (BundleError, GradientMapError) as e:
        raise ScoreUsageError(str(e)) from e
    return scorer.validated_precisions


def run_score(req: ScoreRequest, log: Log) -> ScoreOutcome:
    from flowcore.scorer import resolve_precision
    from pipelines import tables, tracking
    from pipelines.archive import (
        ArchiveError,
        ArchiveListing,
        check_archive_uri,
        list_archive_columns,
    )
    from pipelines.lock import LockLost
    from pipelines.raycluster import cluster_cpus, ensure_ray, plan_workers
    from pipelines.score import (
        ChunkResult,
        ScoreConfig,
        max_file_bytes,
        score_stream,
    )
    from pipelines.selection import apply_only
    from pipelines.settings import current

    if req.commit_every < 1 or req.actors < 1 or req.batch_size < 1:
        raise ScoreUsageError("--commit-every, --actors and --batch-size must be >= 1")
    try:
        check_archive_uri(req.archive)  # its form (credentials refused) before anything else
    except ArchiveError as e:
        raise ScoreUsageError(str(e)) from e
    try:
        settings = req.settings or current()
        max_bytes = max_file_bytes(settings)
        resolve_precision(req.precision)  # its spelling, before anything is resolved
    except ValueError as e:
        raise ScoreUsageError(str(e)) from e
    t0 = time.perf_counter()
    # once: every row carries this version
    resolved = req.resolved
    validated = req.validated_precisions
    if resolved is None:
        resolved = tracking.resolve_model(req.model, settings=req.settings)
        validated = check_bundle(resolved.path, req.heatmap)
    model_name, model_version = model_identity(resolved)
    log(f"model: {req.model} -> {model_name} version {model_version}")
    precision = resolve_precision(req.precision, "cuda" if req.use_gpu else "cpu", validated)
    if req.precision == "auto":
        why = (
            "validated at training and this device has bf16 units"
            if precision == "bf16"
            else "the model was not validated in bf16"
            if "bf16" not in validated
            else "this device has no bf16 units"
        )
        log(f"precision auto -> {precision} ({why})")
    try:
        entries = req.listed if req.listed is not None else list_archive_columns(req.archive)
    except ArchiveError as e:
        raise ScoreUsageError(str(e)) from e
    # a column listing is sorted already and stays in columns (millions of files); only the
    # entries to score become objects
    listed: Sequence[Any] = (
        entries
        if isinstance(entries, ArchiveListing) and not req.only
        else apply_only(sorted(entries, key=lambda e: e.path), req.only)
    )
    if req.todo is not None and req.listed is None:
        raise ValueError("ScoreRequest.todo needs the listing it came from (listed)")
    todo = (
        list(listed)
        if req.todo is None
        else apply_only(sorted(req.todo, key=lambda e: e.path), req.only)
    )
    skipped = len(listed) - len(todo)
    path_columns = (
        listed.path_columns()
        if isinstance(listed, ArchiveListing)
        else sorted({k for e in listed for k in e.columns})
    )
    log(
        f"archive: {len(listed)} images listed"
        + (" (after --only)" if req.only else "")
        + (f", {skipped} already scored by version {model_version}" if skipped else "")
        + (f"; path columns {', '.join(path_columns)}" if path_columns else "")
    )
    catalog = tables.load_catalog_(settings)
    tables.ensure_tables(catalog, path_columns)
    run_id = uuid.uuid4().hex
    started = datetime.now(UTC).replace(tzinfo=None)
    warnings: list[str] = []  # what went wrong without failing the run (the runs row says)
    mlflow_run = _mlflow_start(req, model_name, model_version, run_id, warnings, log)
    mlflow_run_id = mlflow_run[1] if mlflow_run else None
    try:
        tables.record_run_start(
            catalog,
            run_id=run_id,
            job=req.job,
            model_name=model_name,
            model_version=model_version,
            archive=redact(req.archive),
            started_at=started,
            images_listed=len(listed),
            mlflow_run_id=mlflow_run_id,
            warnings="; ".join(warnings) or None,
        )
    except BaseException:
        # the runs row could not be written: end the MLflow run too, as failed
        empty = ScoreOutcome(run_id, model_name, model_version, len(listed), 0, 0, skipped, 0.0)
        _mlflow_end(mlflow_run, empty, "failed", warnings, log)
        raise
    scored = failed = 0
    t_score = 0.0
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
                max_bytes=max_bytes,
                precision=precision,
                transforms=req.transforms,
                heatmap=req.heatmap,
                pid_dir=req.actor_pid_dir,
            )
            commits = -(-len(todo) // req.commit_every)
            log(
                f"scoring {len(todo)} images in {commits} commit(s) of up to "
                f"{req.commit_every} on {req.actors} actor(s) × ({plan.cpus_per_worker:g} "
                f"{'GPU' if req.use_gpu else 'CPU'}, {threads} torch thread(s))"
                + (f", featurizer in {precision}" if precision != "fp32" else "")
                + (f", {req.transforms} test-time transform(s)" if req.transforms else "")
                + (
                    ", gradient-map heatmaps"
                    if req.heatmap != "likelihood" and req.heatmaps
                    else ""
                )
            )
            scores_schema = tables.image_scores_arrow_schema(path_columns)
            t_score = time.perf_counter()
            k = 0

            def eta(done: int) -> str:
                rate = done / (time.perf_counter() - t_score)
                left = (len(todo) - done) / rate if rate > 0 else 0.0
                return f"{done}/{len(todo)} done, {rate:.1f} images/s, ~{left:.0f} s left"

            def on_commit(res: ChunkResult) -> None:
                nonlocal k, scored, failed
                k += 1
                scored += res.scored
                failed += res.failed
                log(
                    f"  commit {k}/{commits}: {res.scored} scored, {res.failed} failed "
                    f"in {res.seconds:.1f} s (commit {res.commit_seconds:.1f} s); "
                    f"{eta(scored + failed)}"
                )

            score_stream(
                todo,
                path_columns,
                cfg,
                actors=req.actors,
                cpus_per_actor=plan.cpus_per_worker,
                gpus_per_actor=1.0 if req.use_gpu else 0.0,
                commit_every=req.commit_every,
                scores_schema=scores_schema,
                errors_schema=tables.SCORING_ERRORS_SCHEMA,
                catalog_kwargs=tables.catalog_config(settings),
                stream_buffer_bytes=settings.stream_buffer_bytes,
                on_commit=on_commit,
                on_progress=lambda n: log(f"  scoring: {eta(n)}, {scored + failed} committed"),
                before_commit=req.fence or (lambda: None),
            )
        else:
            log("nothing to score")
        status = "succeeded"
    except LockLost as e:
        _warn(warnings, log, str(e))
        raise
    finally:
        seconds = time.perf_counter() - t0
        outcome = ScoreOutcome(
            run_id,
            model_name,
            model_version,
            len(listed),
            scored,
            failed,
            skipped,
            seconds,
            scoring_seconds=time.perf_counter() - t_score if t_score else 0.0,
        )
        _mlflow_end(mlflow_run, outcome, status, warnings, log)
        tables.record_run_end(
            catalog,
            run_id=run_id,
            finished_at=datetime.now(UTC).replace(tzinfo=None),
            status=status,
            images_scored=scored,
            images_skipped=skipped,
            images_failed=failed,
            images_per_s=outcome.images_per_s,
            mlflow_run_id=mlflow_run_id,
            warnings="; ".join(warnings) or None,
        )
    return outcome


def _warn(warnings: list[str], log: Log, text: str) -> None:
    warnings.append(text)
    log(f"warning: {text}")


def _mlflow_start(
    req: ScoreRequest,
    model_name: str,
    model_version: str,
    run_id: str,
    warnings: list[str],
    log: Log,
) -> tuple[Any, str] | None:
    """An MLflow run for this scoring run, as (client, MLflow run id). Scoring goes on
    without it when MLflow is down: the warning is printed and appended to ``warnings``
    (they go into the run's ``runs`` row, whose ``mlflow_run_id`` stays null)."""
    from pipelines import tracking

    uri = redact(tracking.tracking_uri(req.settings))
    try:
        c = tracking.client(settings=req.settings)
        exp = tracking.ensure_experiment(c, EXPERIMENT, settings=req.settings)
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
    except Exception as e:  # noqa: BLE001 - tracking is secondary to scoring
        reason = tracking.failure_reason(e)
        _warn(warnings, log, f"MLflow unavailable at {uri}: {reason}; metrics not tracked")
        return None
    try:
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
                    "heatmap": req.heatmap,
                    "commit_every": req.commit_every,
                }
            ),
        )
    except Exception as e:  # noqa: BLE001
        reason = tracking.failure_reason(e)
        _warn(
            warnings, log, f"MLflow run {run.info.run_id} at {uri}: parameters not logged: {reason}"
        )
    return c, run.info.run_id


def _mlflow_end(
    handle: tuple[Any, str] | None,
    out: ScoreOutcome,
    status: str,
    warnings: list[str],
    log: Log,
) -> None:
    """Log the run's counts and images/s to its MLflow run and end it; a failure is a
    warning (printed, appended to ``warnings``), never an error."""
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
    except Exception as e:  # noqa: BLE001 - tracking is secondary to scoring
        uri = redact(c.tracking_uri)
        reason = tracking.failure_reason(e)
        _warn(
            warnings,
            log,
            f"MLflow unavailable at {uri}: {reason}; MLflow run {mlflow_run_id} not finished, "
            "its final metrics not tracked",
        )
