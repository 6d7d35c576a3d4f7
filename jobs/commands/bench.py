"""``flowscore bench``: speed beside the machine's roofline, or the tables at archive scale."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

from jobs.commands.common import (
    EXIT_OK,
    PRESET_NAMES,
    Parents,
    Subparsers,
    UsageError,
    non_negative_int,
    positive_int,
    transforms_count,
)


def _write_json(path: str | None, result: dict[str, object]) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {path}")


def register(sub: Subparsers, parents: Parents) -> None:
    b = sub.add_parser(
        "bench",
        parents=[parents.quiet],
        help="throughput beside the machine's fp32 matmul roofline",
        description="Measure on this machine: FLOPs per image (from the model's shapes), the "
        "fp32 matmul rate, the roofline (images/s if every FLOP ran at that rate), the "
        "in-process scorer's images/s, the pipeline's images/s (generated JPEG files "
        "scored by the real Ray job into a scratch catalog, from the start of scoring to the "
        "last commit), and the naive reference (a Python loop over heatmap rows cropping each "
        "window). Without --model, the preset's scorer is built with "
        "random weights: speed does not depend on the weights' values.",
    )
    _model_options(b)
    _scorer_options(b)
    _pipeline_options(b)
    b.add_argument("--json", metavar="PATH", help="also write the figures as one JSON object")
    _table_options(b)
    b.set_defaults(func=run)


def _model_options(b: argparse.ArgumentParser) -> None:
    """What is measured: a preset's shapes or a bundle, and what each image costs."""
    b.add_argument(
        "--preset",
        choices=(*PRESET_NAMES, "distilled", "distilled-quarter"),
        default="grain-full",
        help="model shapes to measure (default: %(default)s); distilled and "
        "distilled-quarter: a CNN student (flowscore train --distill-from) on grain-full's or "
        "grain-quarter's window grid; the naive reference is measured for the single-scale "
        "window presets only",
    )
    b.add_argument("--model", help="a local bundle directory to measure instead of a preset")
    b.add_argument(
        "--test-transforms",
        type=transforms_count,
        metavar="N",
        help="score each image under N test-time transforms (the cost of score "
        "--test-transforms N; default: the model's own, 1 for a preset)",
    )
    b.add_argument(
        "--heatmap",
        choices=["likelihood", "gradient"],
        default="likelihood",
        help="gradient: also time the gradient map (CNN presets and models; the cost of "
        "score --heatmap gradient), and the pipeline writes gradient maps "
        "(default: %(default)s)",
    )


def _scorer_options(b: argparse.ArgumentParser) -> None:
    """The in-process scorer's figures: images, batch, threads, image size."""
    b.add_argument(
        "--images",
        type=positive_int,
        default=32,
        help="images timed through the scorer (default: %(default)s)",
    )
    b.add_argument(
        "--batch",
        type=positive_int,
        default=16,
        help="images per scorer call (default: %(default)s)",
    )
    b.add_argument(
        "--threads", type=positive_int, default=None, help="torch threads (default: all cores)"
    )
    b.add_argument(
        "--naive-rows",
        type=positive_int,
        default=6,
        help="heatmap rows timed for the naive reference, scaled to the image "
        "(default: %(default)s)",
    )
    b.add_argument(
        "--height", type=positive_int, default=460, help="image height (default: %(default)s)"
    )
    b.add_argument(
        "--width", type=positive_int, default=640, help="image width (default: %(default)s)"
    )


def _pipeline_options(b: argparse.ArgumentParser) -> None:
    """The end-to-end figures: the Ray pipeline, bf16, peak memory of flowscore score."""
    b.add_argument(
        "--pipeline-images",
        type=non_negative_int,
        default=600,
        help="image files generated and scored end to end through Ray into a scratch "
        "catalog; 0 skips the pipeline figure (default: %(default)s)",
    )
    b.add_argument(
        "--actors",
        type=positive_int,
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
        type=positive_int,
        default=100,
        help="the smaller archive of --memory (default: %(default)s)",
    )
    b.add_argument("--use-gpu", action="store_true", help="measure on CUDA")


def _table_options(b: argparse.ArgumentParser) -> None:
    """``bench --tables``: the tables at archive scale instead of the scorer."""
    b.add_argument(
        "--tables",
        type=positive_int,
        metavar="N",
        help="instead of the scorer: fill a scratch catalog with N image_scores rows in "
        "--commits commits, then time (and take the driver's peak RSS of) a nightly run that "
        "finds nothing new, one with 1%% new files and two typical queries, before and after "
        "flowscore maintain",
    )
    b.add_argument(
        "--commits",
        type=positive_int,
        default=365,
        help="with --tables: commits the rows arrive in, one per night (default: %(default)s)",
    )
    b.add_argument(
        "--heatmap-cells",
        type=positive_int,
        default=300,
        help="with --tables: float32 heatmap cells per row (default: %(default)s)",
    )
    b.add_argument(
        "--workdir",
        metavar="DIR",
        help="with --tables: keep the filled catalog here and reuse it on the next run "
        "(default: a temporary folder, removed)",
    )


def _run_tables(args: argparse.Namespace, log: Callable[[str], None]) -> int:
    """``bench --tables N``."""
    from jobs.bench import format_table_bench
    from pipelines.usecases.bench_tables import run_table_bench

    if args.commits > args.tables:
        raise UsageError(f"--commits ({args.commits}) must not exceed --tables ({args.tables})")
    result = run_table_bench(
        args.tables,
        commits=args.commits,
        cells=args.heatmap_cells,
        workdir=args.workdir,
        settings=args.settings,
        log=log,
    )
    print(format_table_bench(result))
    _write_json(args.json, result)
    return EXIT_OK


def run(args: argparse.Namespace) -> int:
    log = (lambda s: None) if args.quiet else (lambda s: print(s, file=sys.stderr))
    if args.tables:
        return _run_tables(args, log)

    import torch

    from jobs.bench import format_table
    from pipelines.usecases.bench import run_bench

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
    from flowcore.gradient import GradientMapError

    try:
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
            heatmap=args.heatmap,
            settings=args.settings,
            log=log,
        )
    except GradientMapError as e:
        raise UsageError(str(e)) from e
    print(format_table(result))
    _write_json(args.json, result)
    return EXIT_OK
