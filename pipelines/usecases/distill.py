"""Distilling a registered model (``flowscore train --distill-from MODEL``): a small CNN
(:mod:`flowcore.distill`) learns the teacher's window log-likelihood grids of the archive's
training images, then is tracked, bundled and registered like any other version of NAME.

Steps: resolve the teacher's URI once (its version is recorded) and load its bundle → list
the archive with the same filters and hold out the same whole images as ``flowscore train``
would with the teacher's spec (its ``val_fraction`` and ``seed``) → decode the images (Ray
Data tasks) → train the student in this process (the images are held in memory: meant for
archives of up to a few thousand training images) → calibrate its threshold on its own
scores of the held-out images → write the bundle → log the run to MLflow, register a new
version of NAME, move ``champion`` (unless ``--no-promote``). No label is read: early
stopping and the threshold use held-out normal images and synthetic defects only.
"""

from __future__ import annotations

import time
from dataclasses import asdict, replace
from typing import TYPE_CHECKING, Any

from ..log import Log
from .train import (
    EXPERIMENT_PREFIX,
    TrainOutcome,
    TrainUsageError,
    _job_dir,
    select_images,
)

if TYPE_CHECKING:
    from .train import TrainRequest

__all__ = ["run_distill"]


def _teacher(req: TrainRequest, client: Any) -> tuple[Any, Any]:
    """(resolved model, loaded teacher scorer); a bad URI or bundle is a usage error."""
    from flowcore.bundle import BundleError, load_bundle
    from flowcore.distill import DistilledFeaturizer
    from pipelines import tracking

    assert req.distill_from is not None
    try:
        resolved = tracking.resolve_model(req.distill_from, c=client, settings=req.settings)
        teacher = load_bundle(resolved.path)
    except (tracking.ModelResolutionError, BundleError) as e:
        raise TrainUsageError(f"--distill-from: {e}") from e
    if isinstance(teacher.featurizer, DistilledFeaturizer):
        raise TrainUsageError(
            f"--distill-from {req.distill_from}: that model is itself distilled; distil from "
            "its teacher (recorded in its bundle)"
        )
    return resolved, teacher


def run_distill(req: TrainRequest, log: Log) -> TrainOutcome:
    import numpy as np

    from flowcore.bundle import save_bundle
    from flowcore.distill import DistilledConfig, distill, teacher_record
    from flowcore.fit import spec_from_dict, spec_to_dict
    from pipelines import tracking
    from pipelines.raycluster import ensure_ray
    from pipelines.selection import training_split
    from pipelines.train import iter_images

    t_start = time.perf_counter()
    if req.resume:
        raise TrainUsageError("--resume does not apply to --distill-from (it trains in minutes)")
    uri = tracking.tracking_uri(req.settings)
    client = tracking.client(uri)
    tracking.check_reachable(client, uri)
    resolved, teacher = _teacher(req, client)
    recorded = teacher.training_stats.get("spec")
    spec = spec_from_dict(recorded) if isinstance(recorded, dict) else req.spec
    if spec is None:
        raise TrainUsageError("--distill-from: the teacher records no spec; pass --preset")
    info = teacher_record(teacher, uri=resolved.uri, name=resolved.name, version=resolved.version)
    if info["preset"] is None and isinstance(teacher.training_stats.get("preset"), str):
        info["preset"] = teacher.training_stats["preset"]
    log(f"teacher: {resolved.pinned_uri} (weights sha256 {str(info['weights_sha256'])[:12]}…)")
    entries = select_images(req, log)
    train, val = training_split(entries, spec.val_fraction, spec.seed)
    log(f"split: {len(train)} training images, {len(val)} held out whole (the teacher's split)")
    ensure_ray(req.ray_address)
    train_imgs = [img for _, img in iter_images(train)]
    column_of = {e.path: e.columns for e in val}
    val_pairs = list(iter_images(val))
    val_imgs = [img for _, img in val_pairs]
    groups = [column_of.get(p, {}).get(spec.calibrate_by) for p, _ in val_pairs]
    if not train_imgs or not val_imgs:
        raise TrainUsageError("--distill-from: no decodable training or held-out image")
    cfg = DistilledConfig()
    if req.max_epochs is not None:
        cfg = replace(cfg, epochs=req.max_epochs)

    def on_epoch(row: dict[str, float]) -> None:
        log(
            f"student epoch {int(row['epoch'])}: loss {row['train_loss']:.4f}, "
            f"held-out {row['val_loss']:.4f}"
        )

    experiment = tracking.ensure_experiment(
        client, EXPERIMENT_PREFIX + req.name, settings=req.settings
    )
    run = client.create_run(
        experiment,
        run_name=f"{req.name}-distilled",
        tags={
            "flowscore.job": "train",
            "flowscore.model_name": req.name,
            "flowscore.kind": "distilled",
        },
    )
    run_id = run.info.run_id
    try:
        params = {
            "teacher": info,
            "student": asdict(cfg),
            "job": {
                "archive": req.archive,
                "only": {k: list(v) for k, v in req.only},
                "skip_labelled_anomalies": req.skip_labelled_anomalies,
                "train_images": len(train_imgs),
                "val_images": len(val_imgs),
            },
        }
        tracking.log_params(client, run_id, tracking.safe_params(params))
        student, report = distill(
            teacher,
            train_imgs,
            val_imgs,
            cfg,
            teacher_info=info,
            threshold_quantile=spec.threshold_quantile,
            seed=spec.seed,
            val_groups=groups if spec.calibrate_by else None,
            calibrate_by=spec.calibrate_by,
            on_epoch=on_epoch,
        )
        log(
            f"student: best epoch {report.best_epoch}, held-out quality Spearman with the "
            f"teacher {report.val_quality_spearman:.3f}, threshold {report.threshold:.3f}"
        )
        training = {
            "archive": tracking.scrub_text(req.archive),
            "only": {k: list(v) for k, v in req.only},
            "skip_labelled_anomalies": req.skip_labelled_anomalies,
            "spec": spec_to_dict(spec),
            "train_images": len(train_imgs),
            "val_images": len(val_imgs),
            "threshold": report.threshold,
            "heatmap_clip": list(report.heatmap_clip),
            "distill": report.as_dict(),
            "mlflow_run_id": run_id,
        }
        job_dir = _job_dir(req.name, req.settings)
        bundle = save_bundle(student, job_dir / "bundle", training=training)
        now = int(time.time() * 1000)
        metrics = [
            (key, float(h[key]), int(h["epoch"]), now)
            for h in report.epochs
            for key in ("train_loss", "val_loss")
        ]
        metrics += [
            ("threshold", report.threshold, 0, now),
            ("best_val_loss", report.best_val_loss, 0, now),
            ("train_seconds", time.perf_counter() - t_start, 0, now),
        ]
        if np.isfinite(report.val_quality_spearman):
            metrics.append(("val_quality_spearman", report.val_quality_spearman, 0, now))
        tracking.log_metrics(client, run_id, metrics)
        client.log_artifacts(run_id, str(bundle), "bundle")
        version = tracking.register_bundle(client, run_id, "bundle", req.name, promote=req.promote)
        client.set_terminated(run_id, "FINISHED")
    except BaseException:
        try:
            client.set_terminated(run_id, "FAILED")
        except Exception:  # noqa: BLE001 - the original error matters more
            pass
        raise
    first = report.epochs[0]["val_loss"] if report.epochs else float("nan")
    return TrainOutcome(
        model_uri=f"models:/{req.name}/{version}",
        version=version,
        run_id=run_id,
        bundle=bundle,
        best_val_nll=report.best_val_loss,
        initial_val_nll=first,
        threshold=report.threshold,
        train_images=len(train_imgs),
        val_images=len(val_imgs),
    )
