"""``flowscore synth``: write a synthetic archive with ground truth."""

from __future__ import annotations

import argparse
import sys

from jobs.commands.common import EXIT_OK, Parents, Subparsers, UsageError, positive_int


def register(sub: Subparsers, parents: Parents) -> None:
    s = sub.add_parser(
        "synth",
        parents=[parents.quiet],
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
        "--images", type=positive_int, default=60, help="number of images (default: %(default)s)"
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
        "--cameras", type=positive_int, default=2, help="cameras per year (default: %(default)s)"
    )
    s.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
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
