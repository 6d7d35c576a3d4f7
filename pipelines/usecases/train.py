"""Training a scorer (``flowscore train``): fit it on Ray Train, track it in MLflow, register a
version.

Steps: the spec (a preset with overrides, resolved by the caller: ``jobs/train.py`` reads a
TOML file's) → list the archive and hold
out whole images → open the MLflow run (this process is the only MLflow writer) → fit the
featurizer and train the flow on Ray → score the held-out images whole for the threshold
and heatmap clip → write the bundle → log metrics, the bundle, a loss curve and overlays →
register a new version of NAME and move alias ``champion`` to it (unless ``--no-promote``).

Resuming: the job keeps its state under ``$FLOWSCORE_HOME/train/NAME/`` (the Ray Train run
name, the MLflow run, the fitted featurizer). ``--resume`` continues the last unfinished run
of NAME from its latest checkpoint with the same featurizer, in the same MLflow run.
"""

from __future__ import annotations

import json
import math
import os
import time
import uuid
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..log import Log

if TYPE_CHECKING:
    from ..selection import Only

__all__ = [
    "TrainRequest",
    "TrainOutcome",
    "TrainUsageError",
    "resolve_spec",
    "run_train",
    "select_images",
]

EXPERIMENT_PREFIX = "flowscore-train/"
#: training images scored in fp32 and bf16, beside the held-out ones, for the precision check
PRECISION_CHECK_TRAIN_IMAGES = 24


class TrainUsageError(ValueError):
    """Bad input (config, archive, flags): exit code 2."""


@dataclass(frozen=True)
class TrainRequest:
    archive: str
    name: str
    preset: str = "grain-full"
    config: str | None = None
    workers: int = 1
    use_gpu: bool = False
    promote: bool = True
    resume: bool = False
    only: Only = ()
    skip_labelled_anomalies: bool = False
    max_epochs: int | None = None
    calibrate_by: str | None = None
    backbone_weights: str | None = None
    ray_address: str | None = None
    # Ray Train's checkpoints: a folder every node reaches, or s3://bucket/prefix (default:
    # the job's folder under FLOWSCORE_HOME, which only a one-node cluster can share)
    storage_path: str | None = None
    max_failures: int = 2
    overlays: int = 4
    # the resolved flowcore.fit.ScorerSpec (jobs/train.py's load_spec: preset + config file);
    # None: the preset's, with max_epochs and calibrate_by applied
    spec: Any = None
    # the command's pipelines.settings.Settings (None: read the environment here)
    settings: Any = None
    # test hook (pipelines.train.TrainFault): rank 0 raises once at an epoch
    fault: Any = None
    # a model URI: train a CNN student of that model instead (pipelines.usecases.distill)
    distill_from: str | None = None


@dataclass
class TrainOutcome:
    model_uri: str
    version: str
    run_id: str
    bundle: Path
    best_val_nll: float
    initial_val_nll: float
    threshold: float
    train_images: int
    val_images: int


def resolve_spec(
    preset: str,
    overrides: dict[str, Any] | None = None,
    where: str = "config",
    max_epochs: int | None = None,
    calibrate_by: str | None = None,
) -> Any:
    """The preset's spec with ``overrides`` (a config file's tables, named ``where`` in
    errors) and the flags applied. Unknown presets and keys, and bad values, raise
    TrainUsageError naming ``where`` and the key."""
    from flowcore.fit import PRESETS, ConfigError, apply_overrides

    if preset not in PRESETS:
        raise TrainUsageError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    spec = PRESETS[preset]
    if overrides:
        try:
            spec = apply_overrides(spec, overrides, where)
        except ConfigError as e:
            raise TrainUsageError(str(e)) from e
    if max_epochs is not None:
        spec = replace(spec, fit=replace(spec.fit, max_epochs=max_epochs))
    if calibrate_by is not None:
        spec = replace(spec, calibrate_by=calibrate_by)
    return spec


def select_images(req: TrainRequest, log: Log) -> list[Any]:
    """The archive's images after ``--only`` filters and (optionally) without the images
    that the archive's ground truth labels anomalous. Sorted by path."""
    from pipelines.archive import ArchiveError, list_archive
    from pipelines.selection import apply_only, without_labelled_anomalies
    from pipelines.truth import read_labels

    try:
        entries = sorted(list_archive(req.archive), key=lambda e: e.path)
    except ArchiveError as e:
        raise TrainUsageError(str(e)) from e
    listed = len(entries)
    entries = apply_only(entries, req.only)
    if req.skip_labelled_anomalies:
        labels = read_labels(req.archive)
        if not labels:
            raise TrainUsageError(
                f"{req.archive}: --skip-labelled-anomalies needs _truth/labels.csv, "
                "which this archive does not have"
            )
        entries = without_labelled_anomalies(entries, labels)
    if not listed:
        raise TrainUsageError(
            f"archive {req.archive} holds no images (.jpg .jpeg .png .tif .tiff .bmp .webp "
            "outside _ and . folders)"
        )
    if len(entries) < 2:
        raise TrainUsageError(
            f"archive {req.archive}: {len(entries)} of {listed} images left after the filters; "
            "training needs at least 2 (one is held out)"
        )
    log(f"archive: {listed} images listed, {len(entries)} selected for training")
    return entries


# ------------------------------------------------------------------ job state (resume)


def _job_dir(name: str, settings: Any = None) -> Path:
    from pipelines.paths import flowscore_home

    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
    d = flowscore_home(settings) / "train" / safe
    d.mkdir(parents=True, exist_ok=True)
    return d


def _read_state(job_dir: Path) -> dict[str, Any] | None:
    p = job_dir / "state.json"
    if not p.is_file():
        return None
    try:
        state: dict[str, Any] = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return state


def _write_state(job_dir: Path, state: dict[str, Any]) -> None:
    tmp = job_dir / ".state.json.tmp"
    tmp.write_text(json.dumps(state, indent=2))
    os.replace(tmp, job_dir / "state.json")


# ------------------------------------------------------------------ the job


def _backbone_state(spec: Any, req: TrainRequest, log: Log) -> Any:
    """The CNN backbone's weights from ``--backbone-weights`` (None: random, with a
    warning): a file, ``pkg:NAME`` (weights shipped in an installed package, checksum-checked)
    or a torchvision weights name (hub cache, else a download: only when the user names one).
    Resolved once here; workers get the tensors, never the file."""
    from flowcore.cnn import BackboneWeightsError, CNNConfig, read_backbone_weights

    if not isinstance(spec.featurizer, CNNConfig):
        if req.backbone_weights:
            raise TrainUsageError(
                f"--backbone-weights applies to CNN featurizers; preset {req.preset!r} uses "
                "pixel windows"
            )
        return None
    if not req.backbone_weights:
        log(
            f"warning: no --backbone-weights given: the {spec.featurizer.backbone} backbone "
            "keeps random weights (a random-feature extractor, much weaker than pretrained "
            "features; nothing is downloaded). ImageNet weights: a .pth/.safetensors file, "
            "pkg:mobilenet_v2 (offline, with featurizer backbone mobilenet_v2) or a torchvision "
            "name such as ResNet18_Weights.IMAGENET1K_V1 (needs internet once)"
        )
        return None
    try:
        state = read_backbone_weights(req.backbone_weights, spec.featurizer)
    except BackboneWeightsError as e:
        raise TrainUsageError(str(e)) from e
    log(f"backbone: {len(state)} tensors from {req.backbone_weights}")
    return state


def run_train(req: TrainRequest, log: Log) -> TrainOutcome:
    if req.distill_from is not None:
        from .distill import run_distill

        return run_distill(req, log)
    import numpy as np
    import torch

    from flowcore.bundle import load_bundle, save_bundle
    from flowcore.fit import (
        AUTO_STATISTIC,
        GLOBAL_MAX_TRAIN_IMAGES,
        balance_recon,
        calibrate,
        choice_copies,
        choose_image_score,
        fit_global_score,
        spec_to_dict,
    )
    from flowcore.precision import check_precision
    from flowcore.scorer import Scorer
    from pipelines import tracking
    from pipelines.plots import save_loss_curve, save_overlay
    from pipelines.raycluster import ensure_ray, plan_workers
    from pipelines.selection import training_split
    from pipelines.train import fit_featurizer_on_ray, iter_images, train_flow_on_ray

    t_start = time.perf_counter()
    spec = (
        req.spec
        if req.spec is not None
        else resolve_spec(req.preset, max_epochs=req.max_epochs, calibrate_by=req.calibrate_by)
    )
    spec_d = spec_to_dict(spec)
    backbone_state = _backbone_state(spec, req, log)
    if req.storage_path:
        from pipelines.storage import ray_train_storage

        try:
            ray_train_storage(req.storage_path)
        except ValueError as e:
            raise TrainUsageError(f"--storage-path: {e}") from e
    if req.use_gpu and req.ray_address is None and not torch.cuda.is_available():
        raise TrainUsageError("--use-gpu given but no CUDA device is visible to this machine")

    # MLflow first: an unreachable server should fail before minutes of work
    uri = tracking.tracking_uri(req.settings)
    client = tracking.client(uri)
    tracking.check_reachable(client, uri)

    entries = select_images(req, log)
    train, val = training_split(entries, spec.val_fraction, spec.seed)
    log(f"split: {len(train)} training images, {len(val)} held out whole for validation")
    if spec.image_global and len(train) < 3:
        raise TrainUsageError(
            f"archive {req.archive}: image_global (the global score; on by default in "
            f"{req.preset}) needs at least 3 training images, got {len(train)}; add images "
            "or set image_global = false in --config"
        )

    job_dir = _job_dir(req.name, req.settings)
    state = _read_state(job_dir)
    unfinished = state is not None and state.get("status") != "finished"
    identity = {"archive": req.archive, "spec": spec_d, "only": [list(o) for o in req.only]}
    if req.resume:
        if not unfinished or state is None:
            raise TrainUsageError(
                f"--resume: no unfinished training run of {req.name!r} under {job_dir}"
            )
        if state.get("identity") != json.loads(json.dumps(identity)):
            raise TrainUsageError(
                f"--resume: the unfinished run of {req.name!r} used a different archive or "
                f"config (see {job_dir / 'state.json'}); run without --resume to start anew"
            )
        run_name, run_id = state["ray_run_name"], state["mlflow_run_id"]
        recorded = state.get("ray_storage")
        if req.storage_path and recorded and req.storage_path != recorded:
            raise TrainUsageError(
                f"--resume: the unfinished run of {req.name!r} kept its checkpoints in "
                f"{recorded}, not {req.storage_path}; resume with --storage-path {recorded}"
            )
        storage = req.storage_path or recorded or str(job_dir / "ray")
        client.update_run(run_id, status="RUNNING")
        log(f"resuming Ray Train run {run_name} (MLflow run {run_id})")
    else:
        if unfinished and state is not None:
            log(
                f"note: an unfinished run of {req.name!r} exists ({state.get('ray_run_name')});"
                " starting a new one (use --resume to continue it instead)"
            )
        storage = req.storage_path or str(job_dir / "ray")
        stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
        run_name = f"{req.name}-{stamp}-{uuid.uuid4().hex[:6]}"
        experiment = tracking.ensure_experiment(
            client, EXPERIMENT_PREFIX + req.name, settings=req.settings
        )
        run = client.create_run(
            experiment,
            run_name=run_name,
            tags={"flowscore.job": "train", "flowscore.model_name": req.name},
        )
        run_id = run.info.run_id
        params = {
            "spec": spec_d,
            "job": {
                "archive": req.archive,
                "preset": req.preset,
                "config_file": req.config,
                "workers": req.workers,
                "use_gpu": req.use_gpu,
                "only": {k: list(v) for k, v in req.only},
                "skip_labelled_anomalies": req.skip_labelled_anomalies,
                "backbone_weights": req.backbone_weights,
                "train_images": len(train),
                "val_images": len(val),
            },
        }
        tracking.log_params(client, run_id, tracking.safe_params(params))
        state = {
            "status": "running",
            "ray_run_name": run_name,
            "ray_storage": storage,
            "mlflow_run_id": run_id,
            "identity": identity,
            "started_at": datetime.now(UTC).isoformat(),
        }
        _write_state(job_dir, state)

    try:
        ensure_ray(req.ray_address)
        plan = plan_workers(req.workers, req.use_gpu)
        feat_dir = job_dir / "featurizer"
        if req.resume and (feat_dir / "flowscore.json").is_file():
            featurizer = load_bundle(feat_dir).featurizer
            log(f"featurizer: reusing the fitted one in {feat_dir}")
        else:
            featurizer = fit_featurizer_on_ray(spec, train, log, backbone_state)
            # kept as a bundle (the strict, pickle-free loader) so --resume reuses it exactly
            from flowcore.flows import build_flow

            stub = build_flow(spec.features, spec.flow)
            save_bundle(Scorer(featurizer, stub), feat_dir)
        fit = train_flow_on_ray(
            spec,
            featurizer,
            train,
            val,
            plan=plan,
            storage_path=storage,
            run_name=run_name,
            max_failures=req.max_failures,
            fault=req.fault,
            log=log,
        )
        scorer = Scorer(featurizer, fit.flow, image_score=spec.image_score).eval()
        scorer.transforms = spec.test_transforms
        gain = balance_recon(scorer, (img for _, img in iter_images(val)))
        if gain is not None:
            log(f"reconstruction term: weight {gain:.4g}, balanced on the held-out images")
        choice = None
        if spec.image_statistic == AUTO_STATISTIC:
            log(
                f"choosing the image statistic on the {len(val)} held-out images and "
                "synthetic anomalies made from them"
            )
            choice = choose_image_score(
                scorer,
                (img for _, img in iter_images(val)),
                seed=spec.seed,
                copies=choice_copies(len(val)),
            )
            scorer.image_score = choice.image_score
            table = ", ".join(f"{k} {v:.3f}" for k, v in choice.aurocs.items())
            log(f"image statistic: {choice.chosen} (AUROC on synthetic anomalies: {table})")
        if spec.image_global:
            # at most GLOBAL_MAX_TRAIN_IMAGES, spread evenly over the (path-sorted) images, so
            # that every year and camera of a large archive is in the sample
            step = -(-len(train) // GLOBAL_MAX_TRAIN_IMAGES)
            sample = train[::step]
            n_fit = len(sample)
            log(
                f"global score: the texture statistics of {n_fit} training and {len(val)} "
                "held-out images"
            )
            scorer.global_score = fit_global_score(
                scorer,
                (img for _, img in iter_images(sample)),
                (img for _, img in iter_images(val)),
            )
            log(
                f"global score: a Gaussian on {scorer.global_score.components} components; "
                "anomaly_score = the larger of the tail and the global distance, standardised"
            )
        log(f"calibrating on the {len(val)} held-out images, scored whole")
        kept: list[tuple[str, np.ndarray]] = []
        column_of = {e.path: e.columns for e in val}
        groups: list[str | None] = []  # filled as the images stream in (completion order)

        def val_images() -> Any:
            for path, img in iter_images(val):
                if len(kept) < req.overlays:
                    kept.append((path, img))
                groups.append(column_of.get(path, {}).get(spec.calibrate_by))
                yield img

        cal = calibrate(
            scorer, val_images(), spec.threshold_quantile, groups=groups, by=spec.calibrate_by
        )
        cal.install(scorer)
        threshold, clip = cal.threshold, cal.heatmap_clip
        if cal.calibration is not None:
            own = ", ".join(
                f"{cal.calibration.by}={g}: {t:.3f} (offset {cal.calibration.offsets[g]:+.3f})"
                for g, t in cal.calibration.thresholds.items()
            )
            log(f"thresholds by {spec.calibrate_by}: {own or 'none (too few held-out images)'}")
        # bf16 is used under --precision auto only if this model passes the accuracy gates;
        # arithmetic error needs no unseen images, so training images join the few held-out
        # ones (a p99 over 4 images passed at 0.47 where 30 others gave 0.53)
        checked = [*val, *train[:PRECISION_CHECK_TRAIN_IMAGES]]
        bf16 = check_precision(scorer, (img for _, img in iter_images(checked)), "bf16")
        scorer.validated_precisions = ("fp32", "bf16") if bf16.passed else ("fp32",)
        log(bf16.summary())
        training = {
            "archive": tracking.scrub_text(req.archive),
            "only": {k: list(v) for k, v in req.only},
            "skip_labelled_anomalies": req.skip_labelled_anomalies,
            "spec": spec_d,
            "train_images": len(train),
            "val_images": len(val),
            "best_epoch": fit.best_epoch,
            "best_val_nll": fit.best_val_nll,
            "initial_val_nll": fit.initial_val_nll,
            "epochs": len(fit.history),
            "stopped_early": fit.stopped_early,
            "threshold": threshold,
            "heatmap_clip": list(clip),
            "precision_check": bf16.as_dict(),
            **({"image_statistic_choice": choice.as_dict()} if choice is not None else {}),
            "workers": req.workers,
            "mlflow_run_id": run_id,
        }
        bundle = save_bundle(scorer, job_dir / "bundle", training=training)

        metrics = []
        for h in fit.history:
            ts, step = int(h["timestamp_ms"]), int(h["epoch"])
            for key in ("train_nll", "val_nll", "windows_per_s"):
                metrics.append((key, float(h[key]), step, ts))
        now = int(time.time() * 1000)
        metrics += [
            ("best_val_nll", fit.best_val_nll, 0, now),
            ("initial_val_nll", fit.initial_val_nll, 0, now),
            ("threshold", threshold, 0, now),
            *(
                (key, value, 0, now)
                for key, value in (
                    ("bf16_median_abs_dll", bf16.median_abs_dll),
                    ("bf16_p99_abs_dll", bf16.p99_abs_dll),
                )
                if math.isfinite(value)
            ),
            ("train_seconds", time.perf_counter() - t_start, 0, now),
        ]
        tracking.log_metrics(client, run_id, metrics)
        pictures = job_dir / "pictures"
        curve = save_loss_curve(pictures / "loss_curve.png", fit.history, f"{req.name}: NLL")
        client.log_artifact(run_id, str(curve), "plots")
        for k, (path, img) in enumerate(kept):
            sb = scorer.score(img[None])
            name = f"val_{k:02d}_" + path.replace("/", "_").rsplit(".", 1)[0] + ".png"
            out = save_overlay(pictures / name, img, sb.grid[0], scorer.geometry, clip)
            client.log_artifact(run_id, str(out), "overlays")
        client.log_artifacts(run_id, str(bundle), "bundle")
        version = tracking.register_bundle(client, run_id, "bundle", req.name, promote=req.promote)
        client.set_terminated(run_id, "FINISHED")
    except BaseException:
        state["status"] = "failed"
        _write_state(job_dir, state)
        try:
            client.set_terminated(run_id, "FAILED")
        except Exception:  # noqa: BLE001 - the original error matters more
            pass
        raise
    state["status"] = "finished"
    state["model_version"] = version
    _write_state(job_dir, state)
    return TrainOutcome(
        model_uri=f"models:/{req.name}/{version}",
        version=version,
        run_id=run_id,
        bundle=bundle,
        best_val_nll=fit.best_val_nll,
        initial_val_nll=fit.initial_val_nll,
        threshold=threshold,
        train_images=len(train),
        val_images=len(val),
    )
