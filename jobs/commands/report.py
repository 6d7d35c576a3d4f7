"""``flowscore report``: the HTML page of a run or of a job's runs over a period."""

from __future__ import annotations

import argparse
from datetime import UTC, datetime, timedelta
from pathlib import Path

from jobs.commands.common import EXIT_OK, Parents, Subparsers, UsageError, duration, positive_int


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


def register(sub: Subparsers, parents: Parents) -> None:
    rp = sub.add_parser(
        "report",
        parents=[parents.quiet],
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
        type=duration,
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
        "--top", type=positive_int, default=8, help="worst and best images shown (default: 8)"
    )
    rp.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
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
            settings=args.settings,
        )
    except ReportUsageError as e:
        raise UsageError(str(e)) from e
    print(index)
    return EXIT_OK
