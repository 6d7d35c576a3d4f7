"""The demo: synth -> ``flowscore train`` (Ray Train, MLflow registry) -> ``flowscore
evaluate`` against baselines -> score the held-out year with the registered model -> print the
10 worst images -> write heatmap overlays. Scoring is still in-process here; the Ray Data
scoring job and the tables replace that step next."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

__all__ = ["run_demo"]

TRAIN_YEARS = ("2017", "2018")
TEST_YEAR = "2019"


def _say(msg: str) -> None:
    print(msg, flush=True)


def run_demo(workdir: Path, *, images: int = 60, seed: int = 0, quiet: bool = False) -> int:
    import os

    import numpy as np
    import torch
    from sklearn.metrics import roc_auc_score

    from flowcore.bundle import load_bundle
    from jobs.evaluate import EvalRequest, run_evaluate
    from jobs.render import save_overlay
    from jobs.train import TrainRequest, run_train
    from pipelines import tracking
    from pipelines.archive import DecodeError, decode_image, list_archive, read_bytes
    from pipelines.synth import write_archive
    from pipelines.truth import read_labels

    t_start = time.perf_counter()
    workdir = workdir.resolve()
    # the demo keeps its MLflow store, models and Ray checkpoints beside its archive unless
    # the user chose a FLOWSCORE_HOME / tracking server
    os.environ.setdefault("FLOWSCORE_HOME", str(workdir / "home"))
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

    resolved = tracking.resolve_model("models:/demo-grain@champion")
    scorer = load_bundle(resolved.path)
    labels = read_labels(str(archive))
    entries = [e for e in list_archive(str(archive)) if e.columns.get("year") == TEST_YEAR]
    decoded: dict[str, np.ndarray] = {}
    for e in entries:
        try:
            decoded[e.path] = decode_image(read_bytes(e.image_uri)).rgb
        except DecodeError as err:
            print(f"      skipped {e.path}: {err.error_type}: {err.message}", file=sys.stderr)
    test = sorted(decoded)
    _say(f"[4/5] scoring the {len(test)} images of {TEST_YEAR} with version {resolved.version}")
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    rows = []
    grids = {}
    for k in range(0, len(test), 8):
        chunk = test[k : k + 8]
        sb = scorer.score(np.stack([decoded[p] for p in chunk]))
        for i, p in enumerate(chunk):
            rows.append(
                {
                    "path": p,
                    **{c: float(v[i]) for c, v in sb.summary.items()},
                    "is_anomaly": bool(sb.is_anomaly[i]),
                    "label": labels.get(p),
                }
            )
            grids[p] = sb.grid[i]
    dt = time.perf_counter() - t0
    _say(f"      {len(test)} images in {dt:.1f} s ({len(test) / dt:.1f} images/s)")
    rows.sort(key=lambda r: r["anomaly_score"], reverse=True)
    worst = rows[:10]
    _say("      the 10 worst (highest anomaly_score = -p05 of window log-likelihoods):")
    _say(f"      {'path':44s} {'quality':>8s} {'p05':>8s} {'anomaly':>8s} flagged truth")
    for r in worst:
        truth = {0: "normal", 1: "ANOMALY", None: "-"}[r["label"]]
        _say(
            f"      {r['path']:44s} {r['quality']:8.2f} {r['p05']:8.2f} "
            f"{r['anomaly_score']:8.2f} {'yes' if r['is_anomaly'] else 'no ':>7s} {truth}"
        )
    y = [r["label"] for r in rows if r["label"] is not None]
    if len(set(y)) == 2:
        auroc = roc_auc_score(y, [r["anomaly_score"] for r in rows if r["label"] is not None])
        _say(f"      image AUROC on {TEST_YEAR} against ground truth: {auroc:.3f}")

    out_dir = workdir / "overlays"
    _say(f"[5/5] writing heatmap overlays (original | overlay) to {out_dir}")
    for rank, r in enumerate(worst, start=1):
        name = f"{rank:02d}_" + r["path"].replace("/", "_").rsplit(".", 1)[0] + ".png"
        save_overlay(
            out_dir / name,
            decoded[r["path"]],
            grids[r["path"]],
            scorer.geometry,
            scorer.heatmap_clip,
        )
    best = rows[-1]
    save_overlay(
        out_dir / "best.png",
        decoded[best["path"]],
        grids[best["path"]],
        scorer.geometry,
        scorer.heatmap_clip,
    )
    _say("")
    _say(f"done in {time.perf_counter() - t_start:.0f} s. Look at:")
    _say(f"  overlays    {out_dir}/01_*.png (dark red = low likelihood)")
    _say(f"  evaluation  {workdir / 'evaluation'}/roc_pixel.png and evaluation.json")
    _say(f"  model       {resolved.path}/flowscore.json ({out.model_uri})")
    _say(f"  MLflow      mlflow ui --backend-store-uri {tracking.tracking_uri()}")
    _say(f"  archive     {archive} (ground truth in _truth/)")
    return 0
