"""A distilled student against its teacher, in process (no Ray, no tables).

    .venv/bin/flowscore synth ARCHIVE --kind harvest --images 150 --seed 1 --anomaly-rate 0.3
    .venv/bin/python scripts/distill_study.py ARCHIVE --preset grain-full --out DIR

The README's evaluation protocol: the teacher (``flowcore.fit.fit_scorer``, the preset with
``max_epochs`` 30) is fitted on the normal images of the training years (labelled anomalies
skipped, as ``--skip-labelled-anomalies`` does), a tenth of them held out whole (the split of
``flowscore train``); the student (``flowcore.distill.distill``) learns the teacher's grids of
the same training images and synthetic-defect copies of them, stops early on the held-out
images and is calibrated on them. Both then score the test year; printed: image AUROC of
each, the Spearman correlation of ``quality`` between them on the test images (all, and the
normal ones), and in-process images/s of each on the test images. Labels are read only to
report the AUROC. ``--out``: both bundles are written there (for ``flowscore bench --model``).
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from flowcore.bundle import load_bundle, save_bundle
from flowcore.distill import DistilledConfig, distill, spearman, teacher_record
from flowcore.fit import PRESETS, fit_scorer, split_holdout
from flowcore.scorer import Scorer
from flowcore.synthetic import add_defect, auroc
from pipelines.archive import decode_image

VAL_DEFECT_SEED = 99  # synthetic defects for the label-free held-out check
VAL_COPIES = 4


def _images(root: Path, years: set[str]) -> list[tuple[str, np.ndarray]]:
    out = []
    for p in sorted(root.rglob("*.jpg")):
        rel = p.relative_to(root).as_posix()
        if rel.startswith("_") or rel.split("/", 1)[0].removeprefix("year=") not in years:
            continue
        out.append((rel, decode_image(p.read_bytes()).rgb))
    return out


def _speed(scorer: Scorer, images: list[np.ndarray], batch: int = 8) -> float:
    scorer.score(np.stack(images[:batch]))  # warm-up
    t0 = time.perf_counter()
    for k in range(0, len(images), batch):
        scorer.score(np.stack(images[k : k + batch]))
    return len(images) / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("archive")
    ap.add_argument("--preset", default="grain-full")
    ap.add_argument("--train-years", default="2017,2018")
    ap.add_argument("--test-years", default="2019")
    ap.add_argument("--max-epochs", type=int, default=30)
    ap.add_argument("--set", action="append", default=[], help="DistilledConfig KEY=VALUE")
    ap.add_argument("--out", help="write the teacher and student bundles here")
    ap.add_argument("--teacher", help="a teacher bundle fitted by an earlier run (same split)")
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args()
    root = Path(args.archive)
    labels = {r["path"]: int(r["label"]) for r in csv.DictReader(open(root / "_truth/labels.csv"))}
    train_all = [
        (p, im) for p, im in _images(root, set(args.train_years.split(","))) if not labels.get(p)
    ]
    test = _images(root, set(args.test_years.split(",")))
    spec = PRESETS[args.preset]
    spec = replace(spec, fit=replace(spec.fit, max_epochs=args.max_epochs))
    tr, va = split_holdout([p for p, _ in train_all], spec.val_fraction, spec.seed)
    train = [train_all[i][1] for i in tr]
    val = [train_all[i][1] for i in va]
    print(f"{len(train)} training, {len(val)} held-out, {len(test)} test images", flush=True)
    t0 = time.perf_counter()
    if args.teacher:
        teacher = load_bundle(args.teacher)
    else:
        teacher = fit_scorer(train, val, spec)[0]
        if args.out:
            save_bundle(teacher, Path(args.out) / "teacher", training={"preset": args.preset})
    teacher.training_stats["preset"] = args.preset
    t_teacher = time.perf_counter() - t0
    print(f"teacher: {t_teacher:.0f} s", flush=True)
    overrides: dict[str, Any] = {}
    for kv in args.set:
        k, v = kv.split("=", 1)
        overrides[k] = float(v) if "." in v else int(v)
    cfg = replace(DistilledConfig(), **overrides)
    t0 = time.perf_counter()
    student, srep = distill(
        teacher,
        train,
        val,
        cfg,
        teacher_info=teacher_record(teacher, name=f"study-{args.preset}"),
        threshold_quantile=spec.threshold_quantile,
        on_epoch=lambda r: print(
            f"  epoch {int(r['epoch'])}: train {r['train_loss']:.4f} val {r['val_loss']:.4f}",
            flush=True,
        ),
    )
    t_student = time.perf_counter() - t0
    print(f"student: {t_student:.0f} s, best epoch {srep.best_epoch}", flush=True)
    y = np.array([labels.get(p, 0) for p, _ in test])
    scores: dict[str, dict[str, np.ndarray]] = {}
    for name, model in (("teacher", teacher), ("student", student)):
        s = [model.score(im[None]).summary for _, im in test]
        scores[name] = {
            k: np.array([float(d[k][0]) for d in s]) for k in ("quality", "anomaly_score")
        }
    res: dict[str, Any] = {"preset": args.preset, "train": len(train), "val": len(val)}
    res["test"], res["test_anomalous"] = len(test), int(y.sum())
    for name in ("teacher", "student"):
        a = scores[name]["anomaly_score"]
        res[f"{name}_image_auroc"] = auroc(a[y == 0], a[y == 1])
    tq, sq = scores["teacher"]["quality"], scores["student"]["quality"]
    res["quality_spearman_test"] = spearman(tq, sq)
    res["quality_spearman_test_normal"] = spearman(tq[y == 0], sq[y == 0])
    res["anomaly_score_spearman_test"] = spearman(
        scores["teacher"]["anomaly_score"], scores["student"]["anomaly_score"]
    )
    # the label-free criterion to choose a student by: the held-out normal images against
    # synthetic-defect copies of them (a seed the training copies did not use)
    rng = np.random.default_rng(VAL_DEFECT_SEED)
    copies = [add_defect(np.asarray(im), rng)[0] for im in val for _ in range(VAL_COPIES)]
    held: dict[str, np.ndarray] = {}
    for name, model in (("teacher", teacher), ("student", student)):
        held[name] = np.array(
            [float(model.score(im[None]).summary["anomaly_score"][0]) for im in [*val, *copies]]
        )
        res[f"{name}_val_synthetic_auroc"] = auroc(held[name][: len(val)], held[name][len(val) :])
    # how closely the student follows its teacher on the statistic that flags images
    res["val_anomaly_score_spearman"] = spearman(held["teacher"], held["student"])
    # a development set to choose settings by, apart from the test year: the held-out normal
    # images against the labelled anomalies of the training years (never trained on)
    dev_bad = [im for p, im in _images(root, set(args.train_years.split(","))) if labels.get(p)]
    for name, model in (("teacher", teacher), ("student", student)):
        bad = np.array([float(model.score(im[None]).summary["anomaly_score"][0]) for im in dev_bad])
        res[f"{name}_dev_auroc"] = auroc(held[name][: len(val)], bad)
    res["dev_anomalous"] = len(dev_bad)
    res["val_quality_spearman"] = srep.val_quality_spearman
    res["student_best_epoch"], res["student_epochs"] = srep.best_epoch, len(srep.epochs)
    res["teacher_fit_s"], res["student_fit_s"] = round(t_teacher, 1), round(t_student, 1)
    imgs = [im for _, im in test]
    res["teacher_images_per_s"] = round(_speed(teacher, imgs), 2)
    res["student_images_per_s"] = round(_speed(student, imgs), 2)
    res["threads"] = torch.get_num_threads()
    print(json.dumps(res, indent=2))
    if args.out:
        save_bundle(student, Path(args.out) / "student", training=student.training_stats)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
