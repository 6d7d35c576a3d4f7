"""``flowscore evaluate``: image and pixel AUROC of a model beside the baselines."""

from __future__ import annotations

import argparse

from jobs.commands.common import EXIT_OK, Parents, Subparsers, UsageError, parse_only, positive_int


def register(sub: Subparsers, parents: Parents) -> None:
    e = sub.add_parser(
        "evaluate",
        parents=[parents.model, parents.only, parents.quiet],
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
        "--heatmap",
        choices=["likelihood", "gradient"],
        default="likelihood",
        help="gradient: also the pixel AUROC of the gradient map (CNN models: |d NLL / d "
        "pixels| smoothed and pooled onto the grid, as score --heatmap gradient writes), "
        "beside the likelihood heatmap's (default: %(default)s)",
    )
    e.add_argument(
        "--baseline-rows",
        type=positive_int,
        default=20_000,
        help="training windows the baselines are fitted on (default: %(default)s)",
    )
    e.add_argument("--no-mlflow", action="store_true", help="do not log the evaluation run")
    e.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
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
        only=parse_only(args.only),
        baseline_rows=args.baseline_rows,
        log_mlflow=not args.no_mlflow,
        precision=args.precision,
        heatmap=args.heatmap,
        settings=args.settings,
    )
    try:
        print_evaluation(run_evaluate(req, stderr_log(args.quiet)))
    except (EvalUsageError, TrackingError, ModelResolutionError) as e:
        raise UsageError(str(e)) from e
    return EXIT_OK
