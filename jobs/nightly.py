"""``flowscore run JOB.toml``: the job spec file, read and checked; the nightly job itself is
:func:`pipelines.usecases.nightly.run_job` (its docstring says what a run does)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipelines.log import Log
from pipelines.maintenance import MaintainPolicy
from pipelines.settings import Settings
from pipelines.usecases.nightly import JobSpec, JobUsageError

__all__ = ["JobSpec", "JobUsageError", "load_job", "run_job_file"]


_SECTIONS: dict[str, dict[str, tuple[type, ...]]] = {
    "job": {"name": (str,), "archive": (str,), "model": (str,)},
    "score": {
        "actors": (int,),
        "use_gpu": (bool,),
        "heatmaps": (bool,),
        "commit_every": (int,),
        "max_error_rate": (float, int),
        "precision": (str,),
        "test_transforms": (int,),
        "heatmap": (str,),
    },
    "maintain": {
        "every": (str,),
        "retain": (str,),
        "keep_last": (int,),
        "orphan_age": (str,),
        "target_file_mb": (float, int),
    },
}


def _maintain_fields(p: Path, raw: dict[str, Any]) -> dict[str, Any]:
    """``[maintain]`` keys as JobSpec fields, each checked (durations like ``7d``)."""
    from pipelines.maintenance import parse_duration

    if not raw:
        return {}
    if "every" not in raw:
        raise JobUsageError(f'{p}: [maintain] needs every = "7d" (how often to maintain)')
    seconds: dict[str, float] = {}
    for key in ("every", "retain", "orphan_age"):
        if key in raw:
            try:
                seconds[key] = parse_duration(raw[key])
            except ValueError as e:
                raise JobUsageError(f"{p}: maintain.{key}: {e}") from e
    policy: dict[str, Any] = {}
    if "retain" in seconds:
        policy["retain_s"] = seconds["retain"]
    if "orphan_age" in seconds:
        policy["orphan_age_s"] = seconds["orphan_age"]
    if "keep_last" in raw:
        policy["keep_last"] = raw["keep_last"]
    if "target_file_mb" in raw:
        mb = float(raw["target_file_mb"])
        if not 0 < mb < float("inf"):
            raise JobUsageError(f"{p}: maintain.target_file_mb must be > 0, got {mb!r}")
        policy["target_file_bytes"] = max(1, int(mb * 2**20))
    try:
        return {"maintain_every_s": seconds["every"], "maintain": MaintainPolicy(**policy)}
    except ValueError as e:
        raise JobUsageError(f"{p}: [maintain]: {e}") from e


def load_job(path: str | Path) -> JobSpec:
    """Parse and check a job spec; errors name the file and the key."""
    from jobs.tomlfile import TomlFileError, read_toml

    p = Path(path)
    try:
        data = read_toml(p, "job spec")
    except TomlFileError as e:
        raise JobUsageError(str(e)) from e
    values: dict[str, Any] = {}
    maintain: dict[str, Any] = {}
    for section, content in data.items():
        if section not in _SECTIONS:
            raise JobUsageError(
                f"{p}: unknown section [{section}] (known: [job], [score], [maintain])"
            )
        if not isinstance(content, dict):
            raise JobUsageError(f"{p}: {section!r} must be a table, e.g. [{section}]")
        for key, value in content.items():
            types = _SECTIONS[section].get(key)
            if types is None:
                known = ", ".join(_SECTIONS[section])
                raise JobUsageError(f"{p}: unknown key {section}.{key} (known: {known})")
            if isinstance(value, bool) and bool not in types or not isinstance(value, types):
                want = " or ".join(t.__name__ for t in types)
                raise JobUsageError(f"{p}: {section}.{key} must be {want}, got {value!r}")
            (maintain if section == "maintain" else values)[key] = value
    for key in ("name", "archive", "model"):
        if not values.get(key):
            raise JobUsageError(f"{p}: missing job.{key}")
    spec = JobSpec(**values, **_maintain_fields(p, maintain))
    if spec.actors < 1 or spec.commit_every < 1:
        raise JobUsageError(f"{p}: score.actors and score.commit_every must be >= 1")
    if not 0 <= spec.max_error_rate <= 1:
        raise JobUsageError(f"{p}: score.max_error_rate must be in [0, 1]")
    if spec.precision not in ("fp32", "bf16", "auto"):
        raise JobUsageError(
            f"{p}: score.precision must be fp32, bf16 or auto, got {spec.precision!r}"
        )
    if spec.heatmap not in ("likelihood", "gradient"):
        raise JobUsageError(
            f"{p}: score.heatmap must be likelihood or gradient, got {spec.heatmap!r}"
        )
    if spec.test_transforms is not None and not 1 <= spec.test_transforms <= 8:
        raise JobUsageError(
            f"{p}: score.test_transforms must be in [1, 8], got {spec.test_transforms}"
        )
    return spec


def run_job_file(
    path: str | Path,
    *,
    dry_run: bool = False,
    ray_address: str | None = None,
    log: Log,
    out: Callable[[str], None] = print,
    settings: Settings | None = None,
) -> int:
    """``flowscore run``: load the spec file and run the job; returns the exit code."""
    from pipelines.usecases.nightly import run_job

    return run_job(
        load_job(path),
        where=str(path),
        dry_run=dry_run,
        ray_address=ray_address,
        log=log,
        out=out,
        settings=settings,
    )
