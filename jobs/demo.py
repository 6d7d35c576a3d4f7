"""The demo: synth -> ``flowscore train`` (Ray Train, MLflow registry) -> ``flowscore
evaluate`` against baselines -> ``flowscore score`` of the held-out year through Ray Data into
the Iceberg tables -> ``flowscore query`` for the 10 worst -> heatmap overlays drawn from the
table's heatmap column."""

from __future__ import annotations

import io
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

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


def run_demo(workdir: Path, *, images: int = 60, seed: int = 0, quiet: bool = False) -> int:
    import os

    from sklearn.metrics import roc_auc_score

    from flowcore.bundle import load_bundle
    from jobs.evaluate import EvalRequest, run_evaluate
    from jobs.query import run_query
    from jobs.render import save_overlay
    from jobs.score import ScoreRequest, run_score
    from jobs.train import TrainRequest, run_train
    from pipelines import tables, tracking
    from pipelines.archive import decode_image, read_bytes
    from pipelines.synth import write_archive
    from pipelines.truth import read_labels

    t_start = time.perf_counter()
    workdir = workdir.resolve()
    # the demo keeps its MLflow store, models and Ray checkpoints beside its archive unless
    # the user chose a FLOWSCORE_HOME / tracking server
    if not os.environ.get("FLOWSCORE_HOME"):
        os.environ["FLOWSCORE_HOME"] = str(workdir / "home")
    home = Path(os.environ["FLOWSCORE_HOME"])
    archive = workdir / "archive"
    if archive.exists() and any(archive.iterdir()):
        _say(f"[1/5] using the existing archive {archive}")
    else:
        _say(f"[1/5] synthesizing {images} harvest images over 2017-2019 into {archive}")
        s = write_archive(archive, kind="harvest", images=images, seed=seed, anomaly_rate=0.2)
        _say(f"      {s.images} images, {s.anomalous} with anomalies (ground truth in _truth/)")

    log = (lambda m: None) if quiet else (lambda m: _say("      " + m))
    workers = 2 if (os.cpu_count() or 1) >= 2 else 1
    _say(
        f"[2/5] flowscore train: grain-quarter (11×11×3 windows at 25 %, MAF) on the normal "
        f"images of {'+'.join(TRAIN_YEARS)}, Ray Train with {workers} workers, MLflow in {home}"
    )
    out = run_train(
        TrainRequest(
            archive=str(archive),
            name="demo-grain",
            preset="grain-quarter",
            workers=workers,
            only=(("year", TRAIN_YEARS),),
            skip_labelled_anomalies=True,
            max_epochs=25,
        ),
        log,
    )
    _say(
        f"      registered {out.model_uri} (alias champion); held-out NLL "
        f"{out.best_val_nll:.2f} vs {out.initial_val_nll:.2f} untrained"
    )

    _say(f"[3/5] flowscore evaluate on {TEST_YEAR}: the flow beside four baselines")
    run_evaluate(
        EvalRequest(
            archive=str(archive),
            model="models:/demo-grain@champion",
            out_dir=str(workdir / "evaluation"),
            only=(("year", (TEST_YEAR,)),),
        ),
        log,
    )

    _say(f"[4/5] flowscore score: the {TEST_YEAR} images through Ray Data into Iceberg tables")
    scored = run_score(
        ScoreRequest(
            archive=str(archive),
            model="models:/demo-grain@champion",
            actors=1,
            commit_every=20,
            job="demo",
            only=(("year", (TEST_YEAR,)),),
        ),
        log,
    )
    _say(
        f"      run {scored.run_id[:8]}: {scored.scored} scored, {scored.failed} failed, "
        f"{scored.images_per_s:.1f} images/s, model version {scored.model_version}"
    )
    worst_sql = (
        "select image_uri, camera, quality, p05, anomaly_score, is_anomaly "
        f"from image_scores where year = '{TEST_YEAR}' order by anomaly_score desc limit 10"
    )
    _say(f'      flowscore query "{worst_sql}"')
    buf = io.StringIO()
    run_query(worst_sql, "table", out=buf)
    for line in buf.getvalue().splitlines():
        _say("      " + line)
    rows = _query_rows(
        "select image_uri, anomaly_score, grid_h, grid_w, heatmap from image_scores "
        f"where year = '{TEST_YEAR}' order by anomaly_score desc"
    )
    labels = read_labels(str(archive))
    prefix = archive.as_uri() + "/"
    y = [labels.get(r["image_uri"].removeprefix(prefix)) for r in rows]
    if len(set(v for v in y if v is not None)) == 2:
        pairs = [(t, r["anomaly_score"]) for t, r in zip(y, rows, strict=True) if t is not None]
        auroc = roc_auc_score([t for t, _ in pairs], [s for _, s in pairs])
        _say(f"      image AUROC on {TEST_YEAR} from the table against ground truth: {auroc:.3f}")
    resolved = tracking.resolve_model(f"models:/demo-grain/{scored.model_version}")
    scorer = load_bundle(resolved.path)

    out_dir = workdir / "overlays"
    _say(f"[5/5] writing heatmap overlays (original | overlay) from the table to {out_dir}")
    for rank, r in enumerate([*rows[:10], rows[-1]], start=1):
        rel = r["image_uri"].removeprefix(prefix)
        name = "best.png" if rank == 11 else f"{rank:02d}_" + rel.replace("/", "_")[:-4] + ".png"
        grid = np.asarray(r["heatmap"], np.float32).reshape(r["grid_h"], r["grid_w"])
        rgb = decode_image(read_bytes(r["image_uri"])).rgb
        save_overlay(out_dir / name, rgb, grid, scorer.geometry, scorer.heatmap_clip)
    _say("")
    _say(f"done in {time.perf_counter() - t_start:.0f} s. Look at:")
    _say(f"  overlays    {out_dir}/01_*.png (dark red = low likelihood)")
    _say(f"  evaluation  {workdir / 'evaluation'}/roc_pixel.png and evaluation.json")
    _say(f"  model       {resolved.path}/flowscore.json ({out.model_uri})")
    _say(f"  tables      {tables.catalog_config()['warehouse']} (Iceberg), e.g.")
    _say(
        '              flowscore query "select camera, count(*), avg(quality) '
        'from image_scores group by camera"'
    )
    _say(f"  MLflow      mlflow ui --backend-store-uri {tracking.tracking_uri()}")
    _say(f"  archive     {archive} (ground truth in _truth/)")
    return 0
