"""Evaluating a model (``flowscore evaluate``): how good it is, honestly, against ground truth
and baselines.

For an archive with ``_truth/labels.csv`` (and masks for pixel scores): the flow's image
AUROC (from ``anomaly_score``) and pixel AUROC (its heatmap upsampled to the image against
the masks), beside four baselines fitted on the *same features of the same kind of windows*
drawn from the model's own training images (the training archive, filters and hold-out split
are recorded in the bundle; ``--train-archive`` overrides): IsolationForest, OneClassSVM, a
full-covariance Gaussian, PCA + nearest neighbour. Also the flow's image AUROC per value of
each path column (camera, year), which shows where a model is weak.

Writes the DESIGN.md JSON object (``--json``), ROC curves as PNGs, and an MLflow run tagged
with the model version (whose tags get the headline figures); returns them in an
:class:`EvalOutcome`, which ``jobs/evaluate.py`` prints as a table.
"""

from __future__ import annotations

import json
import math
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..log import Log

if TYPE_CHECKING:
    from ..evaluation import EvaluationResult
    from ..selection import Only
    from ..settings import Settings

__all__ = ["EvalRequest", "EvalOutcome", "EvalUsageError", "run_evaluate"]

EXPERIMENT = "flowscore-evaluate"


class EvalUsageError(ValueError):
    """Bad input: exit code 2."""


@dataclass(frozen=True)
class EvalRequest:
    archive: str
    model: str
    json_path: str | None = None
    out_dir: str | None = None
    train_archive: str | None = None
    only: Only = ()
    baseline_rows: int = 20_000
    batch: int = 8
    log_mlflow: bool = True
    # the flow's arithmetic: fp32, bf16, auto (as score), or both: fp32 for the tables, and
    # bf16 beside it (image and pixel AUROC, |ΔLL|, quality Spearman; the precision gates)
    precision: str = "fp32"
    # the command's settings (pipelines.settings.Settings, read once by the CLI); None: read
    # from the environment
    settings: Settings | None = None
    # "gradient": also the pixel AUROC of the gradient map (CNN models; flowcore.gradient),
    # beside the likelihood heatmap's
    heatmap: str = "likelihood"


@dataclass
class EvalOutcome:
    """The DESIGN.md evaluation object (``report``), the per-method result it came from, the
    ROC curve PNGs and the folder they and ``evaluation.json`` are in."""

    report: dict[str, Any]
    result: EvaluationResult
    pngs: list[Path]
    out_dir: Path


def _training_images(meta: dict[str, Any], req: EvalRequest, log: Log) -> list[Any]:
    """The model's training images (not its held-out ones): same archive, filters, split."""
    from pipelines.archive import ArchiveError, list_archive
    from pipelines.selection import apply_only, training_split, without_labelled_anomalies
    from pipelines.truth import read_labels

    archive = req.train_archive or meta.get("archive")
    if not archive:
        raise EvalUsageError(
            "the model does not record its training archive (bundles from `flowscore train` "
            "do); pass --train-archive URI to fit the baselines on"
        )
    try:
        entries = sorted(list_archive(archive), key=lambda e: e.path)
    except ArchiveError as e:
        raise EvalUsageError(f"training archive: {e}") from e
    if req.train_archive is None:
        entries = apply_only(entries, meta.get("only") or {})
        if meta.get("skip_labelled_anomalies"):
            entries = without_labelled_anomalies(entries, read_labels(archive))
        spec = meta.get("spec") or {}
        if len(entries) >= 2:
            entries, _ = training_split(entries, spec.get("val_fraction", 0.1), spec.get("seed", 0))
    if not entries:
        raise EvalUsageError(f"training archive {archive}: no images to fit the baselines on")
    log(f"baselines: fitting on windows of {len(entries)} training images of {archive}")
    return entries


def _baseline_rows(scorer: Any, entries: Sequence[Any], max_rows: int, seed: int) -> np.ndarray:
    """Feature rows at random positions of the training images, ``max_rows`` in all, drawn
    with the model's own featurizer (the flow's training distribution)."""
    import torch

    from flowcore.fit import feature_rows, image_generator, spec_from_dict
    from pipelines.archive import DecodeError, decode_image, read_bytes

    spec = (
        spec_from_dict(scorer.training_stats["spec"]) if "spec" in scorer.training_stats else None
    )
    per = max(1, -(-max_rows // len(entries)))
    rows = []
    for e in entries:
        try:
            img = decode_image(read_bytes(e.image_uri)).rgb
        except DecodeError:
            continue
        gen = image_generator(seed, "baseline:" + e.path)
        if spec is None:
            raise EvalUsageError("the model's bundle records no spec; retrain it")
        spec_nd = spec if not spec.dequantize else _no_dequantize(spec)
        rows.append(feature_rows(scorer.featurizer, spec_nd, [img], per, gen))
    if not rows:
        raise EvalUsageError("no training image could be decoded for the baselines")
    x = torch.cat(rows).numpy()
    if x.shape[0] > max_rows:
        x = x[np.random.default_rng(seed).choice(x.shape[0], max_rows, replace=False)]
    return x


def _no_dequantize(spec: Any) -> Any:
    from dataclasses import replace

    return replace(spec, dequantize=False)


def _precision_comparison(full: Any, low: Any, tally: Any) -> dict[str, Any]:
    """fp32 and bf16 side by side: the flow's image and pixel AUROC in each, and the
    accuracy gates of flowcore.precision on the evaluated images."""
    check = tally.check("bf16")
    return {
        name: {
            "image_auroc": r.methods["flow"].image_auroc,
            "pixel_auroc": r.methods["flow"].pixel_auroc,
        }
        for name, r in (("fp32", full), ("bf16", low))
    } | {
        # inf (no window finite in both) is not JSON: null
        "median_abs_dll": check.median_abs_dll if math.isfinite(check.median_abs_dll) else None,
        "p99_abs_dll": check.p99_abs_dll if math.isfinite(check.p99_abs_dll) else None,
        "quality_spearman": check.quality_spearman,
        "passes_gates": check.passed,
    }


def run_evaluate(req: EvalRequest, log: Log) -> EvalOutcome:
    import torch

    from flowcore.bundle import BundleError, load_bundle
    from flowcore.gradient import (
        HEATMAP_KINDS,
        GradientMapError,
        check_gradient_support,
        gradient_map,
    )
    from flowcore.precision import PrecisionTally
    from flowcore.scorer import heatmap_to_image, resolve_precision
    from pipelines import tracking
    from pipelines.archive import ArchiveError, DecodeError, decode_image, list_archive, read_bytes
    from pipelines.evaluation import METHODS, Evaluator, PixelAUROC, fit_baselines, image_auroc
    from pipelines.paths import flowscore_home
    from pipelines.plots import save_roc_curves
    from pipelines.selection import apply_only
    from pipelines.truth import read_defects, read_labels, read_mask

    t0 = time.perf_counter()
    # ground truth first: nothing to do without it
    try:
        labels = read_labels(req.archive)
        entries = sorted(list_archive(req.archive), key=lambda e: e.path)
    except ArchiveError as err:
        raise EvalUsageError(str(err)) from err
    if not labels:
        raise EvalUsageError(
            f"archive {req.archive} has no ground truth (_truth/labels.csv with path,label); "
            "evaluate needs labelled images"
        )
    entries = apply_only(entries, req.only)
    entries = [e for e in entries if e.path in labels]
    n_anom = sum(labels[e.path] for e in entries)
    if not entries or n_anom == 0 or n_anom == len(entries):
        raise EvalUsageError(
            f"archive {req.archive}: {len(entries)} labelled images, {n_anom} anomalous; AUROC "
            "needs both normal and anomalous images"
        )

    resolved = tracking.resolve_model(req.model, settings=req.settings)
    try:
        scorer = load_bundle(resolved.path)
        if req.heatmap not in HEATMAP_KINDS:
            raise EvalUsageError(
                f"--heatmap must be one of {', '.join(HEATMAP_KINDS)}, not {req.heatmap!r}"
            )
        if req.heatmap == "gradient":
            check_gradient_support(scorer)
    except (BundleError, GradientMapError) as err:
        raise EvalUsageError(str(err)) from err
    meta = dict(scorer.training_stats)
    spec_d = meta.get("spec")
    seed = int(spec_d.get("seed", 0)) if isinstance(spec_d, dict) else 0
    train_entries = _training_images(meta, req, log)
    rows = _baseline_rows(scorer, train_entries, req.baseline_rows, seed)
    log(f"baselines: {rows.shape[0]} windows × {rows.shape[1]} features")
    baselines = fit_baselines(rows, seed=seed)

    evaluator = Evaluator(
        baselines,
        scorer.geometry,
        image_score=scorer.image_score,
        calibration=scorer.calibration,
        global_score=scorer.global_score,
    )
    both = req.precision == "both"
    try:
        precision = (
            "fp32" if both else resolve_precision(req.precision, "cpu", scorer.validated_precisions)
        )
    except ValueError as err:
        raise EvalUsageError(f"--precision: {err} (or both)") from err
    scorer.set_precision(precision)
    low = Evaluator(
        {},
        scorer.geometry,
        image_score=scorer.image_score,
        calibration=scorer.calibration,
        global_score=scorer.global_score,
    )
    tally = PrecisionTally()
    gradient_pixels = PixelAUROC() if req.heatmap == "gradient" else None
    by = scorer.calibration.by if scorer.calibration else None
    flow_scores: list[float] = []
    columns: list[dict[str, str]] = []
    used_entries: list[Any] = []
    used_labels: list[int] = []
    log(f"scoring {len(entries)} labelled images ({n_anom} anomalous) with every method")
    pending: list[tuple[Any, np.ndarray]] = []

    def flush() -> None:
        if not pending:
            return
        imgs = np.stack([img for _, img in pending])
        with torch.inference_mode():
            feats, grid = scorer.features_and_grid(imgs)
        groups = [e.columns.get(by) if by else None for e, _ in pending]
        labs = [labels[e.path] for e, _ in pending]
        masks = [read_mask(req.archive, e.path) if labels[e.path] else None for e, _ in pending]
        heights = [img.shape[0] for _, img in pending]
        widths = [img.shape[1] for _, img in pending]

        def add(ev: Evaluator, feats: torch.Tensor, grid: torch.Tensor) -> np.ndarray | None:
            f, g = feats.float().cpu().numpy(), grid.float().cpu().numpy()
            dist = None
            if scorer.global_score is not None:
                with torch.inference_mode():
                    dist = scorer.global_score.distance(feats).cpu().numpy()
            ev.add(g, f, labs, masks, heights, widths, groups, global_distance=dist)
            return dist

        distance = add(evaluator, feats, grid)
        if gradient_pixels is not None:  # the gradient map's pixels, same truth as the flow's
            gmap = gradient_map(scorer, imgs).cpu().numpy()
            for k in range(len(pending)):
                if labs[k] == 1 and masks[k] is None:
                    continue  # anomalous, location unknown: no pixel ground truth
                amap = heatmap_to_image(gmap[k], scorer.geometry, heights[k], widths[k])
                gradient_pixels.add(amap.numpy(), masks[k])
        raw = scorer.combine(scorer.summarize(grid)["anomaly_score"].cpu().numpy(), distance)
        flow_scores.extend(scorer.flag(raw, groups)[0].tolist())
        if both:  # the same images in bf16, beside fp32
            scorer.set_precision("bf16")
            try:
                with torch.inference_mode():
                    feats16, grid16 = scorer.features_and_grid(imgs)
            finally:
                scorer.set_precision("fp32")
            tally.add(grid, grid16)
            add(low, feats16, grid16)
        columns.extend(e.columns for e, _ in pending)
        used_entries.extend(e for e, _ in pending)
        used_labels.extend(labs)
        pending.clear()

    skipped = 0
    for k, e in enumerate(entries, start=1):
        try:
            img = decode_image(read_bytes(e.image_uri)).rgb
        except DecodeError as err:
            skipped += 1
            log(f"skipped {e.image_uri}: {err.error_type}: {err.message}")
            continue
        if pending and (img.shape != pending[0][1].shape or len(pending) >= req.batch):
            flush()
        pending.append((e, img))
        if k % 50 == 0:
            log(f"  {k}/{len(entries)} images")
    flush()
    result = evaluator.result()
    report = result.as_json(resolved.uri if resolved.version else req.model)
    report["model_version"] = resolved.version
    # where the flow is weak: its image AUROC per value of each path column
    by_column: dict[str, dict[str, float | None]] = {}
    keys = sorted({k for c in columns for k in c})
    lab = np.asarray(used_labels)
    # a window the flow finds impossible (-inf) makes the image maximally anomalous
    sc = np.nan_to_num(np.asarray(flow_scores), nan=np.inf).clip(-1e30, 1e30)
    for key in keys:
        groups: dict[str, list[int]] = defaultdict(list)
        for i, c in enumerate(columns):
            groups[c.get(key, "")].append(i)
        if len(groups) > 1:
            by_column[key] = {
                v: image_auroc(sc[idx], lab[idx]) for v, idx in sorted(groups.items())
            }
    report["flow_image_auroc_by"] = by_column
    # by kind of defect, where the archive says (normal images against each kind's)
    defects = read_defects(req.archive)
    paths = [e.path for e in used_entries]
    by_defect: dict[str, float | None] = {}
    for kind in sorted({defects[p] for p in paths if p in defects}):
        idx = [i for i, p in enumerate(paths) if lab[i] == 0 or defects.get(p) == kind]
        by_defect[kind] = image_auroc(sc[idx], lab[idx])
    if by_defect:
        report["flow_image_auroc_by_defect"] = by_defect
    report["skipped"] = skipped
    report["precision"] = precision
    if gradient_pixels is not None:
        report["pixel_auroc_gradient"] = gradient_pixels.value()
    if both:
        report["precision_comparison"] = _precision_comparison(result, low.result(), tally)

    out_dir = (
        Path(req.out_dir)
        if req.out_dir
        else (
            flowscore_home(req.settings)
            / "evaluate"
            / f"{resolved.name or 'bundle'}-{resolved.version or 'local'}"
        )
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    roc_image = save_roc_curves(out_dir / "roc_image.png", result.curves("image"), "image ROC")
    pngs = [roc_image]
    if any(m.pixel_auroc is not None for m in result.methods.values()):
        pngs.append(save_roc_curves(out_dir / "roc_pixel.png", result.curves("pixel"), "pixel ROC"))
    (out_dir / "evaluation.json").write_text(json.dumps(report, indent=2) + "\n")
    if req.json_path:
        Path(req.json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(req.json_path).write_text(json.dumps(report, indent=2) + "\n")

    log(f"ROC curves: {', '.join(str(p) for p in pngs)}")

    if req.log_mlflow:
        mlf = tracking.client(settings=req.settings)
        exp = tracking.ensure_experiment(mlf, EXPERIMENT, settings=req.settings)
        tags = {"flowscore.job": "evaluate", "flowscore.model_uri": req.model}
        if resolved.name:
            tags |= {
                "flowscore.model_name": resolved.name,
                "flowscore.model_version": str(resolved.version),
            }
        run = mlf.create_run(
            exp, run_name=f"eval-{resolved.name or 'bundle'}-{resolved.version or ''}", tags=tags
        )
        rid = run.info.run_id
        tracking.log_params(
            mlf,
            rid,
            tracking.safe_params(
                {
                    "archive": req.archive,
                    "only": {k: list(v) for k, v in req.only},
                    "baseline_rows": int(rows.shape[0]),
                }
            ),
        )
        now = int(time.time() * 1000)
        metrics = [
            ("images", float(report["images"]), 0, now),
            ("anomalous", float(report["anomalous"]), 0, now),
        ]
        for kind in ("image_auroc", "pixel_auroc"):
            for m in METHODS:
                v = report[kind].get(m)
                if v is not None:
                    metrics.append((f"{kind}.{m}", float(v), 0, now))
        if report.get("pixel_auroc_gradient") is not None:
            metrics.append(("pixel_auroc.flow_gradient", report["pixel_auroc_gradient"], 0, now))
        tracking.log_metrics(mlf, rid, metrics)
        for p in [*pngs, out_dir / "evaluation.json"]:
            mlf.log_artifact(rid, str(p))
        mlf.set_terminated(rid, "FINISHED")
        if resolved.name and resolved.version:
            for kind in ("image_auroc", "pixel_auroc"):
                v = report[kind].get("flow")
                if v is not None:
                    mlf.set_model_version_tag(
                        resolved.name, resolved.version, f"eval.{kind}", f"{v:.4f}"
                    )
            mlf.set_model_version_tag(resolved.name, resolved.version, "eval.run_id", rid)
        log(f"MLflow: evaluation run {rid}")
    log(f"done in {time.perf_counter() - t0:.0f} s; JSON in {out_dir / 'evaluation.json'}")
    return EvalOutcome(report=report, result=result, pngs=pngs, out_dir=out_dir)
