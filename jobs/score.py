"""``flowscore score``: the command's printing; the use case is
:func:`pipelines.usecases.score.run_score`."""

from __future__ import annotations

import sys

from pipelines.usecases.score import ScoreOutcome

__all__ = ["print_summary"]


def print_summary(out: ScoreOutcome, warehouse: str) -> None:
    print(
        f"run {out.run_id}: {out.scored} scored, {out.failed} failed, {out.skipped} skipped "
        f"of {out.listed} listed; {out.images_per_s:.1f} images/s; model "
        f"{out.model_name} version {out.model_version}",
        file=sys.stderr,
    )
    print(
        f"tables: flowscore.image_scores, flowscore.scoring_errors, flowscore.runs in {warehouse}"
    )
