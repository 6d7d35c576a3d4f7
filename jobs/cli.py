"""The ``flowscore`` command line. Heavy libraries are imported inside the commands that need
them, so ``flowscore --help`` answers at once.

Exit codes: 0 success; 2 bad usage or config (the message says what and where); 3 the job
finished but its error rate passed ``max_error_rate``; 1 anything else.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

__all__ = ["main", "build_parser", "UsageError"]

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_ERROR_RATE = 0, 1, 2, 3
# names of flowcore.fit.PRESETS, repeated here so --help needs no torch import (a test checks)
PRESET_NAMES = ("grain-full", "grain-quarter")


class UsageError(Exception):
    """Bad input from the user: printed without a traceback, exit code 2."""


def _err(msg: str) -> None:
    print(f"flowscore: error: {msg}", file=sys.stderr)


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


def cmd_bench(args: argparse.Namespace) -> int:
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
        log=(lambda s: None) if args.quiet else (lambda s: print(s, file=sys.stderr)),
    )
    print(format_table(result))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")
    return EXIT_OK


# ---------------------------------------------------------------- demo


def cmd_demo(args: argparse.Namespace) -> int:
    from jobs.demo import run_demo

    return run_demo(Path(args.workdir), images=args.images, seed=args.seed, quiet=args.quiet)


# ---------------------------------------------------------------- parser


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return v


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="flowscore",
        description="Score image archives for anomalies with normalizing flows: synthesize "
        "data, measure speed, and run the end-to-end demo.",
        epilog="Run 'flowscore COMMAND --help' for the flags of a command.",
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    s = sub.add_parser(
        "synth",
        help="write a synthetic archive with ground truth",
        description="Write a synthetic archive in flowscore's layout: JPEG images (460×640) "
        "under year=YYYY/camera=K/ with timestamps in their names, _truth/labels.csv "
        "(path,label) and _truth/masks/<path>.png for anomalous images. Deterministic by seed.",
    )
    s.add_argument("out", help="new or empty output directory")
    s.add_argument(
        "--kind",
        choices=["harvest", "factory"],
        default="harvest",
        help="harvest: grain kernels with leaves, husk, broken kernels, cob, mould; "
        "factory: brushed metal with scratches, spots, cracks, stains "
        "(default: %(default)s)",
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
    s.add_argument("--quiet", action="store_true", help="no progress lines")
    s.set_defaults(func=cmd_synth)

    b = sub.add_parser(
        "bench",
        help="throughput beside the machine's fp32 matmul roofline",
        description="Measure on this machine: FLOPs per image (from the model's shapes), the "
        "fp32 matmul rate, the roofline (images/s if every FLOP ran at that rate), the "
        "in-process scorer's images/s, and the naive reference (a Python loop over heatmap "
        "rows cropping each window). Without --model, the preset's scorer is built with "
        "random weights: speed does not depend on the weights' values.",
    )
    b.add_argument(
        "--preset",
        choices=PRESET_NAMES,
        default="grain-full",
        help="model shapes to measure (default: %(default)s)",
    )
    b.add_argument("--model", help="a local bundle directory to measure instead of a preset")
    b.add_argument(
        "--images",
        type=_positive_int,
        default=32,
        help="images timed through the scorer (default: %(default)s)",
    )
    b.add_argument(
        "--batch",
        type=_positive_int,
        default=8,
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
    b.add_argument("--use-gpu", action="store_true", help="measure on CUDA")
    b.add_argument("--json", metavar="PATH", help="also write the figures as one JSON object")
    b.add_argument("--quiet", action="store_true", help="no progress lines")
    b.set_defaults(func=cmd_bench)

    d = sub.add_parser(
        "demo",
        help="synth -> fit -> score -> show the worst images, in one process",
        description="Synthesize a small harvest archive over three years, fit the "
        "grain-quarter scorer on normal images of the first two, score the third, print the "
        "10 worst images with their summaries and write heatmap overlays.",
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
    d.add_argument("--quiet", action="store_true", help="fewer progress lines")
    d.set_defaults(func=cmd_demo)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except UsageError as e:
        _err(str(e))
        return EXIT_USAGE
    except KeyboardInterrupt:
        _err("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
