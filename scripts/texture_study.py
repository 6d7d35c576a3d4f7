"""Image AUROC by kind of texture defect, for one preset, in process (no Ray, no tables).

    .venv/bin/python scripts/texture_study.py brick --preset cnn-mobilenet --set scale=1.0

Trains the preset with ``flowcore.fit.fit_scorer`` on 70 normal views of one texture from
``pipelines.synth.render_texture`` (12 more held out for calibration), then scores 40 normal
test views, 30 with local spots or scratches, 20 with a dark smooth blob and 15 for each kind
of global change (rotation, scale, contrast). Prints the image AUROC of each kind against the
normal views for a few image statistics of the very same grids: the model's own score, minus
the mean of the k lowest windows for k = 1, 4, 16, 64, and the grid mean turned two-sided on
the held-out images. Nothing here chooses anything on the test labels; it only reports.
``--set KEY=VALUE`` overrides a field of the preset's featurizer (numbers, or comma lists for
``layers``). CNN presets load ``pkg:mobilenet_v2`` weights (installed by ``make``).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from typing import Any

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

import pipelines.synth as synth
from flowcore.cnn import CNNConfig, read_backbone_weights
from flowcore.fit import PRESETS, fit_scorer

KINDS = ("local", "dark_smooth", *synth.GLOBAL_CHANGES)


def _value(text: str) -> Any:
    if "," in text or text.startswith("features") or text.startswith("layer"):
        return tuple(_value(t) if t[:1].isdigit() else t for t in text.split(",") if t)
    try:
        return int(text)
    except ValueError:
        return float(text)


def _fit_value(text: str) -> Any:
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    return _value(text)


def render_views(texture: str, seed: int) -> tuple[list, list, list[tuple[str, np.ndarray]]]:
    rng = np.random.default_rng(seed)
    train = [synth.render_texture(rng, texture=texture)[0] for _ in range(70)]
    val = [synth.render_texture(rng, texture=texture)[0] for _ in range(12)]
    test: list[tuple[str, np.ndarray]] = []
    for kind, n in (("normal", 40), ("local", 30), ("dark_smooth", 20)):
        for _ in range(n):
            defect = None if kind == "normal" else kind
            test.append((kind, synth.render_texture(rng, texture=texture, defect=defect)[0]))
    every = synth.GLOBAL_CHANGES
    try:
        for change in every:
            synth.GLOBAL_CHANGES = (change,)  # one kind of global change at a time
            for _ in range(15):
                test.append(
                    (change, synth.render_texture(rng, texture=texture, defect="global")[0])
                )
    finally:
        synth.GLOBAL_CHANGES = every
    return train, val, test


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("texture", choices=synth.TEXTURES)
    ap.add_argument("--preset", default="grain-full", choices=sorted(PRESETS))
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument(
        "--fit", action="append", default=[], metavar="KEY=VALUE", help="a [fit] setting"
    )
    ap.add_argument(
        "--auto",
        action="store_true",
        help="image_statistic = auto: chosen on held-out views and synthetic anomalies",
    )
    ap.add_argument(
        "--test-transforms", type=int, default=1, metavar="N", help="test_transforms = N"
    )
    ap.add_argument(
        "--dequantize",
        choices=("true", "false"),
        help="train on dequantised windows or not (default: the preset's)",
    )
    ap.add_argument(
        "--image-global",
        choices=("true", "false"),
        help="join the tail with the global distance or not (default: the preset's)",
    )
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="also write the figures to this file")
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    spec = PRESETS[args.preset]
    changes = dict(kv.split("=", 1) for kv in args.set)
    spec = replace(
        spec,
        featurizer=replace(spec.featurizer, **{k: _value(v) for k, v in changes.items()}),
        fit=replace(
            spec.fit,
            max_epochs=args.epochs,
            **{k: _fit_value(v) for k, v in (kv.split("=", 1) for kv in args.fit)},
        ),
    )
    if args.auto:
        spec = replace(spec, image_statistic="auto")
    spec = replace(spec, test_transforms=args.test_transforms)
    if args.dequantize:
        spec = replace(spec, dequantize=args.dequantize == "true")
    if args.image_global:
        spec = replace(spec, image_global=args.image_global == "true")
    train, val, test = render_views(args.texture, args.seed)
    state = None
    if isinstance(spec.featurizer, CNNConfig):
        state = read_backbone_weights("pkg:mobilenet_v2", spec.featurizer)
    t0 = time.perf_counter()
    scorer, _ = fit_scorer(train, val, spec, backbone_state=state)
    fit_s = time.perf_counter() - t0

    def grids(images: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        g, s = [], []
        with torch.no_grad():
            for im in images:
                b = scorer.score([im])
                g.append(np.asarray(b.grid[0]))
                s.append(float(b.summary["anomaly_score"][0]))
        return np.stack(g), np.array(s)

    gv, _ = grids(val)
    gt, own = grids([im for _, im in test])
    labels = np.array([k for k, _ in test])

    def k_lowest(g: np.ndarray, k: int) -> np.ndarray:
        return -np.sort(g.reshape(len(g), -1), axis=1)[:, :k].mean(axis=1)

    def two_sided_mean(g: np.ndarray) -> np.ndarray:
        ref = gv.reshape(len(gv), -1).mean(axis=1)
        c = np.median(ref)
        return np.abs(g.reshape(len(g), -1).mean(axis=1) - c)

    def robust_z(s: np.ndarray, ref: np.ndarray) -> np.ndarray:
        c = np.median(ref)
        return (s - c) / max(1.4826 * float(np.median(np.abs(ref - c))), 1e-9)

    k_own = scorer.image_score.k_for(gt.shape[1], gt.shape[2], scorer.featurizer.geometry)
    tail = robust_z(k_lowest(gt, k_own), k_lowest(gv, k_own))
    mean_z = robust_z(gt.reshape(len(gt), -1).mean(1), gv.reshape(len(gv), -1).mean(1))
    stats = {"model's anomaly_score": own}
    for k in (1, 4, 16, 64):
        stats[f"-mean of {k} lowest"] = k_lowest(gt, min(k, gt[0].size))
    stats["|grid mean - normal|"] = two_sided_mean(gt)
    stats["max(tail z, |mean z|)"] = np.maximum(tail, np.abs(mean_z))
    # per window, two-sided: how far each window's log-likelihood is from the held-out
    # normal windows' median, in robust spreads; the mean of the k farthest windows
    flat_v = gv.reshape(-1)
    centre = float(np.median(flat_v))
    spread = max(1.4826 * float(np.median(np.abs(flat_v - centre))), 1e-9)
    z = np.abs(gt.reshape(len(gt), -1) - centre) / spread
    for k in (4, 16):
        stats[f"mean of {k} farthest |z|"] = -np.sort(-z, axis=1)[:, :k].mean(axis=1)
    stats["mean of 16 highest"] = np.sort(gt.reshape(len(gt), -1), axis=1)[:, -16:].mean(axis=1)
    out: dict[str, dict[str, float]] = {}
    if "image_statistic_choice" in scorer.training_stats:
        print("  auto:", scorer.training_stats["image_statistic_choice"])
    print(
        f"{args.texture} {args.preset} {changes or ''} {args.fit or ''} "
        f"dequantize={spec.dequantize} image_global={spec.image_global} "
        f"grid {gt.shape[1:]} fit {fit_s:.0f} s"
    )
    for name, s in stats.items():
        row = {}
        for kind in KINDS:
            sel = (labels == "normal") | (labels == kind)
            row[kind] = round(float(roc_auc_score(labels[sel] == kind, s[sel])), 3)
        out[name] = row
        print(f"  {name:24s} " + "  ".join(f"{k}={v:.3f}" for k, v in row.items()))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(
                {"texture": args.texture, "preset": args.preset, "set": changes, "auroc": out},
                f,
                indent=1,
            )


if __name__ == "__main__":
    main()
