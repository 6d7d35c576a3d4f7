"""``flowscore run``: the nightly job of a job spec: score only what is new, locked."""

from __future__ import annotations

import argparse

from jobs.commands.common import S3_HELP, Parents, Subparsers, UsageError


def register(sub: Subparsers, parents: Parents) -> None:
    r = sub.add_parser(
        "run",
        parents=[parents.cluster, parents.quiet],
        help="the nightly job: score what is new, incremental, resumable, locked",
        description="Run the job described by JOB.toml ([job] name, archive, model; optional "
        "[score] actors, use_gpu, heatmaps, commit_every, max_error_rate). The model is "
        "resolved once; images already in the tables for that version (same image_uri and "
        "etag) are skipped, so a rerun after a crash finishes the work and a run over an "
        "unchanged archive scores nothing. A second run of the same job while one runs exits "
        "at once naming the holder. Exit code 3 when the error rate passes max_error_rate. "
        + S3_HELP,
    )
    r.add_argument("job", metavar="JOB.toml", help="the job spec")
    r.add_argument("--dry-run", action="store_true", help="print what would be scored, stop")
    r.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
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
