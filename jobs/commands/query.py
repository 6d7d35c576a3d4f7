"""``flowscore query``: read-only SQL over the result tables."""

from __future__ import annotations

import argparse

from jobs.commands.common import Parents, Subparsers, positive_int


def register(sub: Subparsers, parents: Parents) -> None:
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
        type=positive_int,
        default=1_000_000,
        metavar="N",
        help="print at most N rows; a note on stderr says when the result had more "
        "(default: %(default)s)",
    )
    q.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from jobs.query import run_query

    return run_query(
        args.sql,
        args.format,
        timeout_s=args.timeout,
        max_rows=args.max_rows,
        settings=args.settings,
    )
