"""``flowscore demo``: synth, train, evaluate, the nightly job twice, query and report."""

from __future__ import annotations

import argparse
from pathlib import Path

from jobs.commands.common import Parents, Subparsers, positive_int


def register(sub: Subparsers, parents: Parents) -> None:
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
        type=positive_int,
        default=60,
        help="images in the synthetic archive (default: %(default)s)",
    )
    d.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    d.add_argument(
        "--max-epochs",
        type=positive_int,
        default=25,
        help="training epochs (fewer: a quicker, rougher model; default: %(default)s)",
    )
    d.add_argument("--quiet", action="store_true", help="fewer progress lines")
    d.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from jobs.demo import run_demo

    return run_demo(
        Path(args.workdir),
        images=args.images,
        seed=args.seed,
        quiet=args.quiet,
        max_epochs=args.max_epochs,
    )
