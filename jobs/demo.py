"""The demo, the whole product on embedded defaults: synth a harvest archive over three years
-> ``flowscore train`` on two (Ray Train, MLflow registry) -> ``flowscore evaluate`` on the third
against baselines -> ``flowscore run`` (the nightly job scores the archive through Ray Data into
the Iceberg tables) -> ``flowscore run`` again (nothing new) -> ``flowscore query`` for the worst
images -> ``flowscore report`` -> where everything is."""

from __future__ import annotations

import io
import json
import time
from pathlib import Path
from typing import Any

__all__ = ["run_demo"]

TRAIN_YEARS = ("2017", "2018")
TEST_YEAR = "2019"


def _say(msg: str) -> None:
    print(msg, flush=True)


def _query_rows(sql: str) -> list[dict[str, Any]]:
    """Rows of a query over the tables, through the same read-only path as flowscore query."""
    from jobs.query import run_query

    buf = io.StringIO()
    if run_query(sql, "json", out=buf) != 0:
        raise RuntimeError(f"demo query failed: {sql}")
    rows: list[dict[str, Any]] = json.loads(buf.getvalue())
    return rows


def run_demo(
    workdir: Path,
    *,
    images: int = 60,
    seed: int = 0,
    quiet: bool = False,
    max_epochs: int = 25,
) -> int:
    import os

    from sklearn.metrics import roc_auc_score

    from jobs.evaluate import print_evaluation
    from jobs.nightly import run_job_file
    from jobs.query import run_query
    from jobs.report import run_report
    from jobs.tomlfile import toml_string
    from jobs.train import load_spec
    from pipelines import tables, tracking
    from pipelines.synth import write_archive
    from pipelines.truth import read_labels
    from pipelines.usecases.evaluate import EvalRequest, run_evaluate
    from pipelines.usecases.train import TrainRequest, run_train

    t_start = time.perf_counter()
    workdir = workdir.resolve()
    # the demo keeps its MLflow store, models and Ray checkpoints beside its archive unless
    # the user chose a FLOWSCORE_HOME / tracking server
    if not os.environ.get("FLOWSCORE_HOME"):
        os.environ["FLOWSCORE_HOME"] = str(workdir / "home")
    home = Path(os.environ["FLOWSCORE_HOME"])
    archive = workdir / "archive"
    if archive.exists() and any(archive.iterdir()):
        _say(f"[1/7] using the existing archive {archive}")
    else:
        _say(f"[1/7] synthesizing {images} harvest images over 2017-2019 into {archive}")
        s = write_archive(archive, kind="harvest", images=images, seed=seed, anomaly_rate=0.2)
        _say(f"      {s.images} images, {s.anomalous} with anomalies (ground truth in _truth/)")

    log = (lambda m: None) if quiet else (lambda m: _say("      " + m))
    workers = 2 if (os.cpu_count() or 1) >= 2 else 1
    _say(
        f"[2/7] flowscore train: grain-quarter (11×11×3 windows at 25 %, MAF) on the normal "
        f"images of {'+'.join(TRAIN_YEARS)}, Ray Train with {workers} workers, MLflow in {home}"
    )
    config = workdir / "train.toml"
    config.write_text(
        "# overrides of the grain-quarter preset for the demo's small archive:\n"
        "# hold out more whole images, so the threshold rests on more than one\n"
        f"val_fraction = 0.2\n[fit]\nmax_epochs = {max_epochs}\n"
    )
    out = run_train(
        TrainRequest(
            archive=str(archive),
            name="demo-grain",
            preset="grain-quarter",
            config=str(config),
            spec=load_spec("grain-quarter", str(config)),
            workers=workers,
            only=(("year", TRAIN_YEARS),),
            skip_labelled_anomalies=True,
        ),
        log,
    )
    _say(
        f"      registered {out.model_uri} (alias champion); held-out NLL "
        f"{out.best_val_nll:.2f} vs {out.initial_val_nll:.2f} untrained"
    )

    _say(f"[3/7] flowscore evaluate on {TEST_YEAR}: the flow beside four baselines")
    evaluation = run_evaluate(
        EvalRequest(
            archive=str(archive),
            model="models:/demo-grain@champion",
            out_dir=str(workdir / "evaluation"),
            only=(("year", (TEST_YEAR,)),),
        ),
        log,
    )
    print_evaluation(evaluation)

    job = workdir / "demo-nightly.toml"
    job.write_text(
        "# the nightly job of the demo: `flowscore run` this file again to score what is new\n"
        f'[job]\nname = "demo-nightly"\narchive = {toml_string(str(archive))}\n'
        'model = "models:/demo-grain@champion"\n'
        "[score]\nactors = 1\ncommit_every = 50\nmax_error_rate = 0.05\n"
    )
    _say(
        f"[4/7] flowscore run {job.name}: the nightly job scores the archive through Ray Data "
        "into the Iceberg tables (2019 is new to the model)"
    )
    code = run_job_file(job, log=log, out=lambda m: _say("      " + m))
    if code != 0:
        return code
    _say(f"[5/7] flowscore run {job.name} once more: only what is new gets scored")
    code = run_job_file(job, log=log, out=lambda m: _say("      " + m))
    if code != 0:
        return code

    worst_sql = (
        "select image_uri, camera, quality, p05, anomaly_score, is_anomaly "
        f"from image_scores where year = '{TEST_YEAR}' order by anomaly_score desc limit 10"
    )
    _say(f'[6/7] flowscore query "{worst_sql}"')
    buf = io.StringIO()
    run_query(worst_sql, "table", out=buf)
    for line in buf.getvalue().splitlines():
        _say("      " + line)
    rows = _query_rows(
        "select image_uri, anomaly_score from image_scores "
        f"where year = '{TEST_YEAR}' order by anomaly_score desc"
    )
    labels = read_labels(str(archive))
    prefix = archive.as_uri() + "/"
    y = [labels.get(r["image_uri"].removeprefix(prefix)) for r in rows]
    if len(set(v for v in y if v is not None)) == 2:
        pairs = [(t, r["anomaly_score"]) for t, r in zip(y, rows, strict=True) if t is not None]
        auroc = roc_auc_score([t for t, _ in pairs], [s for _, s in pairs])
        _say(f"      image AUROC on {TEST_YEAR} from the table against ground truth: {auroc:.3f}")

    report_dir = workdir / "report"
    _say(f"[7/7] flowscore report --out {report_dir}")
    index = run_report(report_dir, None, log)
    resolved = tracking.resolve_model("models:/demo-grain@champion")
    _say("")
    _say(f"done in {time.perf_counter() - t_start:.0f} s. Look at:")
    _say(f"  report      {index}  (open it in a browser)")
    _say(f"  evaluation  {workdir / 'evaluation'}/roc_pixel.png and evaluation.json")
    _say(f"  model       {resolved.path}/flowscore.json ({out.model_uri})")
    _say(f"  nightly     FLOWSCORE_HOME={home} flowscore run {job}")
    _say(f"  MLflow      mlflow ui --backend-store-uri {tracking.tracking_uri()}")
    _say(f"  tables      {tables.catalog_config()['warehouse']} (Iceberg); try:")
    for q in (
        "select camera, count(*) as images, avg(quality) as quality from image_scores "
        "group by camera",
        "select year, sum(is_anomaly::int) as flagged from image_scores group by year",
    ):
        _say(f'              FLOWSCORE_HOME={home} flowscore query "{q}"')
    return 0
