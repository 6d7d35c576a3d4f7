"""``flowscore maintain``: compact, expire snapshots and remove orphans of the tables."""

from __future__ import annotations

import argparse

from jobs.commands.common import (
    Parents,
    Subparsers,
    UsageError,
    duration,
    positive_float,
    positive_int,
)


def register(sub: Subparsers, parents: Parents) -> None:
    mt = sub.add_parser(
        "maintain",
        parents=[parents.quiet],
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
        type=positive_float,
        default=128.0,
        metavar="MB",
        help="size of a compacted file; files under 3/4 of it are compacted (default: %(default)g)",
    )
    mt.add_argument(
        "--retain",
        type=duration,
        default=30 * 86400.0,
        metavar="DURATION",
        help="expire snapshots older than this, e.g. 30d, 12h (default: 30d); time travel "
        "reaches back this far",
    )
    mt.add_argument(
        "--keep-last",
        type=positive_int,
        default=5,
        metavar="N",
        help="always keep the newest N snapshots (default: %(default)s)",
    )
    mt.add_argument(
        "--orphan-age",
        type=duration,
        default=3 * 86400.0,
        metavar="DURATION",
        help="delete unreferenced files only once older than this (default: 3d; a writer "
        "that is mid-commit has files no snapshot names yet, so keep it well above the "
        "longest commit)",
    )
    mt.add_argument(
        "--dry-run", action="store_true", help="print what would change, change nothing"
    )
    mt.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
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
