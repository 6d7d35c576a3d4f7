"""The nightly job (``flowscore run JOB.toml``): incremental, resumable, locked.

1. **Validate before touching anything**: the spec (unknown keys, types), the archive, the
   model (resolved once to a version, which pins the whole run, and loaded in full: a bundle
   with a pickle-capable file or tensors that disagree with its config is refused before the
   catalog or Ray are touched) and the catalog. Each problem is one line and exit code 2.
2. **Lock** the job (a lease row in the catalog database, see ``pipelines.lock``): a second
   run of the same job exits at once naming the holder; a lock left by a dead run is taken
   over once its lease has expired.
3. **Incremental**: list the archive and subtract what the tables already hold for the
   pinned version, by ``(image_uri, etag)``: rows of ``image_scores`` and files that already
   failed *under that version* with a permanent error (``scoring_errors``, decode or score:
   the same bytes would fail the same way). A read error (``retryable``) is tried again; a
   file that failed under another model version is scored by this one. A replaced file has a
   new etag and is scored again. A second run over an unchanged archive scores nothing.
4. **Resumable**: scoring commits every ``commit_every`` images, so after a kill the next run
   finds the committed chunks in the tables and does only the rest.

The lock's lease is 120 s (``FLOWSCORE_LOCK_LEASE_S``): a run killed with ``kill -9`` blocks
its job for at most that long.

5. **Fenced**: right before each commit the run checks, under the database's clock, that it
   still holds the lock (renewing its lease). A run that was paused past its lease and whose
   lock another run took over stops there, commits nothing more and exits 4. The run that
   takes over a dead run's lock marks that run's ``runs`` row ``failed``.

6. **Maintained** when the spec asks: with ``[maintain] every = "7d"`` a run whose scoring
   is done compacts, expires and sweeps the tables (``flowscore maintain``, under its own
   lock; skipped when another maintenance run holds it) once ``image_scores`` was last
   maintained longer ago than that. Optional keys: ``retain``, ``keep_last``,
   ``orphan_age``, ``target_file_mb``. A maintenance failure is a warning on stderr: the
   scores are committed and the next run tries again.

Exit codes: 0 success; 2 bad spec or unreachable parts; 3 the run finished but its error
rate passed ``max_error_rate``; 4 the run lost its lock to another run and stopped; 1
anything else.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from ..log import Log
from ..maintenance import MaintainPolicy
from ..settings import LOCK_LEASE_ENV, Settings

__all__ = ["JobSpec", "JobUsageError", "run_job", "lock_lease_s"]

EXIT_OK, EXIT_USAGE, EXIT_ERROR_RATE, EXIT_LOCK_LOST = 0, 2, 3, 4


class JobUsageError(ValueError):
    """A spec or environment problem found before anything ran: exit code 2."""


@dataclass(frozen=True)
class JobSpec:
    name: str
    archive: str
    model: str
    actors: int = 1
    use_gpu: bool = False
    heatmaps: bool = True
    commit_every: int = 5000
    max_error_rate: float = 0.05
    precision: str = "fp32"
    test_transforms: int | None = None
    # what the heatmap column holds: likelihood, or gradient (CNN models; flowcore.gradient)
    heatmap: str = "likelihood"
    maintain_every_s: float | None = None
    maintain: MaintainPolicy = field(default_factory=MaintainPolicy)


LEASE_ENV = LOCK_LEASE_ENV


def lock_lease_s(settings: Settings | None = None) -> float:
    """The job lock's lease in seconds: ``FLOWSCORE_LOCK_LEASE_S``, default 120."""
    from pipelines.settings import SettingError, current

    try:
        return (settings or current()).lock_lease_s
    except SettingError as e:
        raise JobUsageError(str(e)) from e


def _maybe_maintain(spec: JobSpec, log: Log, settings: Settings) -> None:
    """``[maintain]``: maintain the tables when due, under the maintenance lock (skipped if
    another maintenance run holds it); a failure is a warning, the scores stay committed."""
    from pipelines import tables
    from pipelines.errors import one_line
    from pipelines.lock import JobLock, LockHeld

    from .maintain import MAINTAIN_LOCK, is_due, maintain_tables

    assert spec.maintain_every_s is not None
    try:
        if not is_due(spec.maintain_every_s, settings):
            return
        lock = JobLock(
            tables.catalog_config(settings)["uri"], MAINTAIN_LOCK, lease_s=settings.lock_lease_s
        )
        try:
            lock.acquire()
        except LockHeld as e:
            log(f"maintenance skipped: {e}")
            return
        try:
            with lock.fencing(tables.TABLES):
                for report in maintain_tables(
                    tables.TABLES, spec.maintain, log, check=lock.check, settings=settings
                ):
                    log(report.line())
        finally:
            lock.release()
    except Exception as e:  # the scores are committed; maintenance is tried again next run
        log(f"warning: maintenance failed, the next run tries again: {one_line(e)}")


def run_job(
    spec: JobSpec,
    *,
    where: str,
    dry_run: bool = False,
    ray_address: str | None = None,
    log: Log,
    out: Callable[[str], None],
    settings: Settings | None = None,
) -> int:
    """Run the nightly job ``spec`` (the module docstring); ``where`` names the spec in
    messages (its file). Returns the exit code; ``out`` gets the result lines."""
    from pipelines import tables, tracking
    from pipelines.archive import ArchiveError, list_archive_columns, open_archive
    from pipelines.incremental import pending
    from pipelines.lock import JobLock, LockHeld, LockLost

    from .score import (
        ScoreRequest,
        ScoreUsageError,
        check_bundle,
        model_identity,
        run_score,
    )

    path = where
    if settings is None:
        from pipelines.settings import SettingError, current

        try:
            settings = current()
        except SettingError as e:
            raise JobUsageError(str(e)) from e
    lease = lock_lease_s(settings)
    # -- validate everything before touching anything
    try:
        open_archive(spec.archive)
    except ArchiveError as e:
        raise JobUsageError(f"{path}: job.archive: {e}") from e
    try:
        resolved = tracking.resolve_model(spec.model)
    except tracking.ModelResolutionError as e:
        raise JobUsageError(f"{path}: job.model: {e}") from e
    except tracking.TrackingError as e:
        raise JobUsageError(str(e)) from e
    try:
        validated = check_bundle(resolved.path, spec.heatmap)
    except ScoreUsageError as e:
        raise JobUsageError(f"{path}: job.model {spec.model}: {e}") from e
    try:
        catalog = tables.load_catalog_(settings)
    except tables.TablesError as e:
        raise JobUsageError(str(e)) from e
    name, version = model_identity(resolved)
    pinned = f"models:/{name}/{version}" if resolved.version else str(resolved.path)
    log(f"job {spec.name}: model {spec.model} -> {name} version {version}")

    lock = JobLock(tables.catalog_config(settings)["uri"], spec.name, lease_s=lease)
    try:
        lock.acquire()
    except LockHeld as e:
        raise JobUsageError(str(e)) from e
    try:
        if lock.took_over is not None:
            t = lock.took_over
            log(
                f"took over the lock of {t.holder}, whose lease expired at "
                f"{t.expires_at:%Y-%m-%d %H:%M:%S} UTC (that run died or stopped answering)"
            )
            for dead in tables.mark_dead_runs(catalog, spec.name, f"found dead by {lock.holder}"):
                log(f"marked run {dead} of job {spec.name} failed (its lease had expired)")
        try:
            listed = list_archive_columns(spec.archive)
        except ArchiveError as e:
            raise JobUsageError(f"{path}: job.archive: {e}") from e
        todo = pending(catalog, version, listed)
        log(
            f"archive: {len(listed)} images; {len(listed) - len(todo)} already in the tables "
            f"for version {version}; {len(todo)} to score"
        )
        if dry_run:
            for entry in todo[:20]:
                out(entry.image_uri)
            if len(todo) > 20:
                out(f"... and {len(todo) - 20} more")
            out(f"dry run: would score {len(todo)} of {len(listed)} images with {pinned}")
            return EXIT_OK
        with lock.fencing((tables.IMAGE_SCORES, tables.SCORING_ERRORS)):
            result = run_score(
                ScoreRequest(
                    archive=spec.archive,
                    model=pinned,
                    actors=spec.actors,
                    use_gpu=spec.use_gpu,
                    heatmaps=spec.heatmaps,
                    commit_every=spec.commit_every,
                    job=spec.name,
                    ray_address=ray_address,
                    listed=listed,
                    todo=tuple(todo),
                    resolved=resolved,  # pinned and checked above: not asked for or loaded again
                    validated_precisions=validated,
                    fence=lock.check,
                    precision=spec.precision,
                    transforms=spec.test_transforms,
                    heatmap=spec.heatmap,
                    settings=settings,
                ),
                log,
            )
        if spec.maintain_every_s is not None:
            _maybe_maintain(spec, log, settings)
    except LockLost as e:
        log(str(e))
        return EXIT_LOCK_LOST
    finally:
        lock.release()
    if not todo:  # its runs row is written all the same (DESIGN: every run leaves one)
        out(f"job {spec.name}: nothing new to score ({len(listed)} images already done)")
        return EXIT_OK
    out(
        f"job {spec.name}: run {result.run_id}: {result.scored} scored, {result.failed} failed, "
        f"{result.skipped} already done; {result.images_per_s:.1f} images/s"
    )
    if result.error_rate > spec.max_error_rate:
        log(
            f"error rate {result.error_rate:.1%} is above max_error_rate "
            f'{spec.max_error_rate:.1%}: see flowscore query "select * from scoring_errors '
            f"where run_id = '{result.run_id}'\""
        )
        return EXIT_ERROR_RATE
    return EXIT_OK
