"""The ``flowscore`` command line. Heavy libraries are imported inside the commands that need
them, so ``flowscore --help`` answers at once.

Exit codes: 0 success; 2 bad usage or config (the message says what and where); 3 the job
finished but its error rate passed ``max_error_rate``; 1 anything else. S3 that stays
unavailable past its retries (``FLOWSCORE_S3_*``, see ``pipelines.storage``) is one line and
exit code 1, not a traceback; a bad ``FLOWSCORE_S3_*`` value is exit code 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from importlib import import_module

from jobs.commands.common import (
    EXIT_FAILED,
    EXIT_USAGE,
    MAX_TRANSFORMS,
    PRESET_NAMES,
    Parents,
    UsageError,
)

__all__ = ["main", "build_parser", "UsageError", "COMMANDS", "MAX_TRANSFORMS", "PRESET_NAMES"]

#: the subcommands in --help order; each is a module of jobs.commands with ``register(sub,
#: parents)`` (its parser, next to its code) and ``run(args) -> exit code``
COMMANDS = (
    "synth",
    "bench",
    "train",
    "evaluate",
    "score",
    "query",
    "run",
    "maintain",
    "report",
    "demo",
)


def _err(msg: str) -> None:
    from pipelines.redact import redact

    print(f"flowscore: error: {redact(msg)}", file=sys.stderr)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="flowscore",
        description="Score image archives for anomalies with normalizing flows: synthesize "
        "data, train and register scorers, evaluate them, measure speed, run the demo.",
        epilog="Run 'flowscore COMMAND --help' for the flags of a command.",
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    parents = Parents.build()
    for name in COMMANDS:
        import_module(f"jobs.commands.{name}").register(sub, parents)
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
    # MLflow takes its HTTP limits only from its own variables: set them for this process
    os.environ.update(args.settings.mlflow_http.env())
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
