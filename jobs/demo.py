"""The demo, the whole product on embedded defaults: synth a harvest archive over three years
-> ``flowscore train`` on two (Ray Train, MLflow registry) -> ``flowscore evaluate`` on the third
against baselines -> ``flowscore run`` (the nightly job scores the archive through Ray Data into
the Iceberg tables) -> ``flowscore run`` again (nothing new) -> ``flowscore query`` for the worst
images -> ``flowscore report`` -> where everything is."""

from __future__ import annotations

import io
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pipelines.log import Log
    from pipelines.settings import Settings

__all__ = ["run_demo"]

TRAIN_YEARS = ("2017", "2018")
TEST_YEAR = "2019"
MODEL = "models:/demo-grain@champion"


def _say(msg: str) -> None:
    print(msg, flush=True)


def _query_rows(sql: str, settings: Settings) -> list[dict[str, Any]]:
    """Rows of a query over the tables, through the same read-only path as flowscore query."""
    from jobs.query import run_query

    buf = io.StringIO()
    if run_query(sql, "json", out=buf, settings=settings) != 0:
        raise RuntimeError(f"demo query failed: {sql}")
    rows: list[dict[str, Any]] = json.loads(buf.getvalue())
    return rows


@dataclass(frozen=True)
class _Demo:
    """Where the demo works and what it was asked for."""

    workdir: Path
    archive: Path
    home: Path
    settings: Settings
    log: Log
    images: int
    seed: int
    max_epochs: int


def _synth(d: _Demo) -> None:
    from pipelines.synth import write_archive

    if d.archive.exists() and any(d.archive.iterdir()):
        _say(f"[1/7] using the existing archive {d.archive}")
        return
    _say(f"[1/7] synthesizing {d.images} harvest images over 2017-2019 into {d.archive}")
    s = write_archive(d.archive, kind="harvest", images=d.images, seed=d.seed, anomaly_rate=0.2)
    _say(f"      {s.images} images, {s.anomalous} with anomalies (ground truth in _truth/)")


def _train(d: _Demo) -> str:
    """Train and register the demo's model; returns its ``models:/`` URI."""
    import os

    from jobs.train import load_spec
    from pipelines.usecases.train import TrainRequest, run_train

    workers = 2 if (os.cpu_count() or 1) >= 2 else 1
    _say(
        f"[2/7] flowscore train: grain-quarter (11×11×3 windows at 25 %, MAF) on the normal "
        f"images of {'+'.join(TRAIN_YEARS)}, Ray Train with {workers} workers, MLflow in {d.home}"
    )
    config = d.workdir / "train.toml"
    config.write_text(
        "# overrides of the grain-quarter preset for the demo's small archive:\n"
        "# hold out more whole images, so the threshold rests on more than one\n"
        f"val_fraction = 0.2\n[fit]\nmax_epochs = {d.max_epochs}\n"
    )
    out = run_train(
        TrainRequest(
            archive=str(d.archive),
            name="demo-grain",
            preset="grain-quarter",
            config=str(config),
            spec=load_spec("grain-quarter", str(config)),
            workers=workers,
            only=(("year", TRAIN_YEARS),),
            skip_labelled_anomalies=True,
            settings=d.settings,
        ),
        d.log,
    )
    _say(
        f"      registered {out.model_uri} (alias champion); held-out NLL "
        f"{out.best_val_nll:.2f} vs {out.initial_val_nll:.2f} untrained"
    )
    return out.model_uri


def _evaluate(d: _Demo) -> None:
    from jobs.evaluate import print_evaluation
    from pipelines.usecases.evaluate import EvalRequest, run_evaluate

    _say(f"[3/7] flowscore evaluate on {TEST_YEAR}: the flow beside four baselines")
    evaluation = run_evaluate(
        EvalRequest(
            archive=str(d.archive),
            model=MODEL,
            out_dir=str(d.workdir / "evaluation"),
            only=(("year", (TEST_YEAR,)),),
            settings=d.settings,
        ),
        d.log,
    )
    print_evaluation(evaluation)


def _nightly(d: _Demo) -> tuple[Path, int]:
    """Write the nightly job's spec and run it twice; returns the spec and the exit code."""
    from jobs.nightly import run_job_file
    from jobs.tomlfile import toml_string

    job = d.workdir / "demo-nightly.toml"
    job.write_text(
        "# the nightly job of the demo: `flowscore run` this file again to score what is new\n"
        f'[job]\nname = "demo-nightly"\narchive = {toml_string(str(d.archive))}\n'
        f'model = "{MODEL}"\n'
        "[score]\nactors = 1\ncommit_every = 50\nmax_error_rate = 0.05\n"
    )
    _say(
        f"[4/7] flowscore run {job.name}: the nightly job scores the archive through Ray Data "
        "into the Iceberg tables (2019 is new to the model)"
    )
    code = run_job_file(job, log=d.log, out=lambda m: _say("      " + m), settings=d.settings)
    if code != 0:
        return job, code
    _say(f"[5/7] flowscore run {job.name} once more: only what is new gets scored")
    return job, run_job_file(job, log=d.log, out=lambda m: _say("      " + m), settings=d.settings)


def _query(d: _Demo) -> None:
    """The worst images of the test year, and the image AUROC computed from the table."""
    from sklearn.metrics import roc_auc_score

    from jobs.query import run_query
    from pipelines.truth import read_labels

    worst_sql = (
        "select image_uri, camera, quality, p05, anomaly_score, is_anomaly "
        f"from image_scores where year = '{TEST_YEAR}' order by anomaly_score desc limit 10"
    )
    _say(f'[6/7] flowscore query "{worst_sql}"')
    buf = io.StringIO()
    run_query(worst_sql, "table", out=buf, settings=d.settings)
    for line in buf.getvalue().splitlines():
        _say("      " + line)
    rows = _query_rows(
        "select image_uri, anomaly_score from image_scores "
        f"where year = '{TEST_YEAR}' order by anomaly_score desc",
        d.settings,
    )
    labels = read_labels(str(d.archive))
    prefix = d.archive.as_uri() + "/"
    y = [labels.get(r["image_uri"].removeprefix(prefix)) for r in rows]
    if len(set(v for v in y if v is not None)) == 2:
        pairs = [(t, r["anomaly_score"]) for t, r in zip(y, rows, strict=True) if t is not None]
        auroc = roc_auc_score([t for t, _ in pairs], [s for _, s in pairs])
        _say(f"      image AUROC on {TEST_YEAR} from the table against ground truth: {auroc:.3f}")


def _tour(d: _Demo, index: Path, model_uri: str, job: Path, seconds: float) -> None:
    """Where everything the demo made is, and what to try next."""
    from pipelines import tables, tracking

    resolved = tracking.resolve_model(MODEL, settings=d.settings)
    _say("")
    _say(f"done in {seconds:.0f} s. Look at:")
    _say(f"  report      {index}  (open it in a browser)")
    _say(f"  evaluation  {d.workdir / 'evaluation'}/roc_pixel.png and evaluation.json")
    _say(f"  model       {resolved.path}/flowscore.json ({model_uri})")
    _say(f"  nightly     FLOWSCORE_HOME={d.home} flowscore run {job}")
    _say(f"  MLflow      mlflow ui --backend-store-uri {tracking.tracking_uri(d.settings)}")
    _say(f"  tables      {tables.catalog_config(d.settings)['warehouse']} (Iceberg); try:")
    for q in (
        "select camera, count(*) as images, avg(quality) as quality from image_scores "
        "group by camera",
        "select year, sum(is_anomaly::int) as flagged from image_scores group by year",
    ):
        _say(f'              FLOWSCORE_HOME={d.home} flowscore query "{q}"')


def run_demo(
    workdir: Path,
    *,
    images: int = 60,
    seed: int = 0,
    quiet: bool = False,
    max_epochs: int = 25,
) -> int:
    import os

    from jobs.report import run_report
    from pipelines.settings import Settings

    t_start = time.perf_counter()
    workdir = workdir.resolve()
    # the demo keeps its MLflow store, models and Ray checkpoints beside its archive unless
    # the user chose a FLOWSCORE_HOME / tracking server (the edge: the settings are read
    # after this, once)
    if not os.environ.get("FLOWSCORE_HOME"):
        os.environ["FLOWSCORE_HOME"] = str(workdir / "home")
    settings = Settings.from_env()
    d = _Demo(
        workdir=workdir,
        archive=workdir / "archive",
        home=settings.home,
        settings=settings,
        log=(lambda m: None) if quiet else (lambda m: _say("      " + m)),
        images=images,
        seed=seed,
        max_epochs=max_epochs,
    )
    _synth(d)
    model_uri = _train(d)
    _evaluate(d)
    job, code = _nightly(d)
    if code != 0:
        return code
    _query(d)
    report_dir = workdir / "report"
    _say(f"[7/7] flowscore report --out {report_dir}")
    index = run_report(report_dir, None, d.log)
    _tour(d, index, model_uri, job, time.perf_counter() - t_start)
    return 0
