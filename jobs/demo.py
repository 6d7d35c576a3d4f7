"""The first demo, in one process: synth -> fit grain-quarter -> score the held-out year ->
print the 10 worst images -> write heatmap overlays. Later steps replace each stage with its
Ray / MLflow / Iceberg counterpart."""

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
    from dataclasses import replace

    import torch
    from sklearn.metrics import roc_auc_score

    from flowcore.bundle import save_bundle
    from flowcore.fit import PRESETS, fit_scorer
    from flowcore.training import EpochStats
    from jobs.render import save_overlay
    from pipelines.archive import DecodeError, decode_image, list_archive, read_bytes
    from pipelines.synth import write_archive
    from pipelines.truth import read_labels

    t_start = time.perf_counter()
    workdir = workdir.resolve()
    archive = workdir / "archive"
    if archive.exists() and any(archive.iterdir()):
        _say(f"[1/5] using the existing archive {archive}")
    else:
        _say(f"[1/5] synthesizing {images} harvest images over 2017-2019 into {archive}")
        s = write_archive(archive, kind="harvest", images=images, seed=seed, anomaly_rate=0.2)
        _say(f"      {s.images} images, {s.anomalous} with anomalies (ground truth in _truth/)")

    labels = read_labels(str(archive))
    entries = list(list_archive(str(archive)))
    decoded: dict[str, np.ndarray] = {}
    for e in entries:
        try:
            decoded[e.path] = decode_image(read_bytes(e.image_uri)).rgb
        except DecodeError as err:
            print(f"      skipped {e.path}: {err.error_type}: {err.message}", file=sys.stderr)
    train_pool = [
        e.path
        for e in entries
        if e.columns.get("year") in TRAIN_YEARS and labels.get(e.path, 0) == 0 and e.path in decoded
    ]
    test = [e.path for e in entries if e.columns.get("year") == TEST_YEAR and e.path in decoded]
    if len(train_pool) < 4 or not test:
        _say("the archive has too few images for the demo; use --images 30 or more")
        return 2
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(train_pool))
    n_val = max(2, len(train_pool) // 5)
    val = [train_pool[i] for i in order[:n_val]]
    train = [train_pool[i] for i in order[n_val:]]

    spec = PRESETS["grain-quarter"]
    spec = replace(spec, fit=replace(spec.fit, max_epochs=25, patience=4), seed=seed)
    _say(
        f"[2/5] fitting grain-quarter (11×11×3 windows at 25 %, MAF) on {len(train)} normal "
        f"images of {'+'.join(TRAIN_YEARS)}, validating on {len(val)} held-out whole images"
    )

    def on_epoch(st: EpochStats) -> None:
        if not quiet:
            mark = " *" if st.is_best else ""
            _say(
                f"      epoch {st.epoch:2d}  train NLL {st.train_nll:8.2f}  "
                f"val NLL {st.val_nll:8.2f}  {st.samples_per_s:8.0f} windows/s{mark}"
            )

    torch.manual_seed(seed)
    scorer, report = fit_scorer(
        [decoded[p] for p in train], [decoded[p] for p in val], spec, on_epoch=on_epoch
    )
    bundle = save_bundle(scorer, workdir / "model", training=report.as_dict())
    _say(
        f"      best epoch {report.best_epoch}, val NLL {report.best_val_nll:.2f}; "
        f"threshold {report.threshold:.2f}; bundle in {bundle}"
    )

    _say(f"[3/5] scoring the {len(test)} images of {TEST_YEAR}")
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
    _say("[4/5] the 10 worst images (highest anomaly_score = -p05 of window log-likelihoods)")
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
    _say(f"  overlays   {out_dir}/01_*.png (dark red = low likelihood)")
    _say(f"  model      {bundle}/flowscore.json")
    _say(f"  archive    {archive} (ground truth in _truth/)")
    return 0
