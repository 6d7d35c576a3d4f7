"""Pixel AUROC of the likelihood heatmap against the gradient map, in process (no Ray, tables).

    .venv/bin/flowscore synth ARCHIVE --kind harvest --images 150 --seed 1 --anomaly-rate 0.3
    .venv/bin/python scripts/gradient_study.py ARCHIVE [--preset cnn-mobilenet] [--json OUT]

The README's evaluation protocol, in one process: the preset is fitted with
``flowcore.fit.fit_scorer`` (CNN presets with ``pkg:mobilenet_v2`` weights, installed by
``make``) on the normal images of ``year=2017,2018`` (the same held-out split as ``flowscore
train``), then the images of ``year=2019`` are scored. Printed: image AUROC (the model's own
statistic) and pixel AUROC of the window log-likelihood heatmap and of the gradient map
(``flowcore.gradient``; ``--sigma`` overrides its smoothing), beside the four baselines on the
same features (``pipelines.evaluation``), and the in-process images/s of scoring alone and of
scoring with the gradient map. Nothing is chosen on the test labels.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from flowcore.cnn import CNNConfig, read_backbone_weights
from flowcore.fit import PRESETS, feature_rows, fit_scorer, image_generator
from flowcore.gradient import gaussian_blur, gradient_map, pixel_gradient, pool_to_grid
from flowcore.scorer import heatmap_to_image
from pipelines.archive import decode_image, list_archive, read_bytes
from pipelines.evaluation import Evaluator, PixelAUROC, fit_baselines
from pipelines.selection import apply_only, training_split, without_labelled_anomalies
from pipelines.truth import read_labels, read_mask


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("archive")
    ap.add_argument("--preset", default="cnn-mobilenet")
    ap.add_argument("--train-years", default="2017,2018")
    ap.add_argument("--test-years", default="2019")
    ap.add_argument("--max-epochs", type=int, default=30)
    ap.add_argument("--sigma", type=float, default=None, help="gradient map σ in pixels")
    ap.add_argument(
        "--sigmas", default="", help="more σ values (comma list) whose pixel AUROC to report"
    )
    ap.add_argument("--baseline-rows", type=int, default=5000)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args()

    spec = PRESETS[args.preset]
    spec = replace(spec, fit=replace(spec.fit, max_epochs=args.max_epochs))
    labels = read_labels(args.archive)
    entries = sorted(list_archive(args.archive), key=lambda e: e.path)
    train_e = without_labelled_anomalies(
        apply_only(entries, {"year": args.train_years.split(",")}), labels
    )
    fit_e, val_e = training_split(train_e, spec.val_fraction, spec.seed)
    test_e = [
        e for e in apply_only(entries, {"year": args.test_years.split(",")}) if e.path in labels
    ]

    def load(es: list) -> list[np.ndarray]:
        return [decode_image(read_bytes(e.image_uri)).rgb for e in es]

    state = (
        read_backbone_weights("pkg:mobilenet_v2", spec.featurizer)
        if isinstance(spec.featurizer, CNNConfig) and spec.featurizer.backbone == "mobilenet_v2"
        else None
    )
    t0 = time.perf_counter()
    scorer, report = fit_scorer(load(fit_e), load(val_e), spec, backbone_state=state)
    print(
        f"fitted {args.preset} on {len(fit_e)} images ({len(val_e)} held out) in "
        f"{time.perf_counter() - t0:.0f} s, best epoch {report.best_epoch}"
    )
    gen = image_generator(spec.seed, "baseline")
    per = max(1, -(-args.baseline_rows // len(fit_e)))
    rows = feature_rows(scorer.featurizer, spec, load(fit_e), per, gen).numpy()
    ev = Evaluator(
        fit_baselines(rows, seed=spec.seed, max_rows=args.baseline_rows),
        scorer.geometry,
        image_score=scorer.image_score,
    )
    grad_px = PixelAUROC()
    sigmas = [float(v) for v in args.sigmas.split(",") if v]
    more_px = {s: PixelAUROC() for s in sigmas}
    t_score = t_grad = 0.0
    n_img = 0
    for start in range(0, len(test_e), args.batch):
        part = test_e[start : start + args.batch]
        imgs = np.stack(load(part))
        t = time.perf_counter()
        scorer.score(imgs)
        t_score += time.perf_counter() - t
        with torch.inference_mode():
            feats, grid = scorer.features_and_grid(imgs)
        t = time.perf_counter()
        gmap = gradient_map(scorer, imgs, sigma=args.sigma).cpu().numpy()
        t_grad += time.perf_counter() - t
        more: dict[float, np.ndarray] = {}
        if sigmas:  # one backward pass, smoothed at each σ
            x = torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 255.0
            grad, g = pixel_gradient(scorer, x)
            per_pixel = grad.abs().sum(dim=1, keepdim=True)
            for s in sigmas:
                sm = gaussian_blur(per_pixel, s)[:, 0]
                more[s] = pool_to_grid(sm, scorer.geometry, g.shape[1], g.shape[2]).numpy()
        labs = [labels[e.path] for e in part]
        masks = [
            read_mask(args.archive, e.path) if y else None for e, y in zip(part, labs, strict=True)
        ]
        h, w = imgs.shape[1:3]
        ev.add(grid.numpy(), feats.numpy(), labs, masks, h, w)
        for k, y in enumerate(labs):
            if y == 1 and masks[k] is None:
                continue
            grad_px.add(heatmap_to_image(gmap[k], scorer.geometry, h, w).numpy(), masks[k])
            for s, m in more.items():
                more_px[s].add(heatmap_to_image(m[k], scorer.geometry, h, w).numpy(), masks[k])
        n_img += len(part)
    res = ev.result()
    out = {
        "archive": args.archive,
        "preset": args.preset,
        "images": res.images,
        "anomalous": res.anomalous,
        "image_auroc": {m: r.image_auroc for m, r in res.methods.items()},
        "pixel_auroc": {m: r.pixel_auroc for m, r in res.methods.items()},
        "pixel_auroc_gradient": grad_px.value(),
        "sigma": args.sigma,
        "pixel_auroc_gradient_by_sigma": {str(s): p.value() for s, p in more_px.items()},
        "threads": torch.get_num_threads(),
        "score_images_per_s": n_img / t_score,
        "score_and_gradient_images_per_s": n_img / (t_score + t_grad),
        "gradient_images_per_s": n_img / t_grad,
    }
    print(json.dumps(out, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
