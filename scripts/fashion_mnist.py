"""Fashion-MNIST for flowscore: an archive converter and the one-vs-rest study, in process.

The images come from Debian's ``dataset-fashion-mnist`` package (``apt-get install
dataset-fashion-mnist``), which installs the four IDX files under
``/usr/share/datasets/fashion-mnist``; their SHA-256 are checked before anything is read.
Nothing is downloaded.

    # an archive with class 0 (T-shirt/top) as the normal class
    .venv/bin/python scripts/fashion_mnist.py archive OUT --normal 0 --train 2000 --test 2000
    # the 10-class table: encoder + flow against IsolationForest and OneClassSVM
    .venv/bin/python scripts/fashion_mnist.py study --json fmnist.json

``archive`` writes ``split=train/class=K/NNNNN.png`` (normal training images, from the
official training set) and ``split=test/class=K/NNNNN.png`` (test images of every class,
from the official test set), and ``_truth/labels.csv`` (``path,label``: 1 = not the normal
class) for the test images; the training images are all normal and are listed with label 0.
Sizes are subsampled with a fixed seed.

``study`` runs the protocol of the paper: for each class K, the normal class is K and the
other nine are the anomalies. The encoder + flow (``flowcore.fit.fit_scorer`` with the
``ae-flow`` preset) is fitted on normal training images, with a held-out part of them
(``val_fraction``) for early stopping, the reconstruction weight and the threshold;
IsolationForest and OneClassSVM (scikit-learn, default settings) are fitted on the very
same training images, once on raw pixels and once on the encoder's latent codes. Every
method is scored on the same test images. Nothing is chosen on test labels: the labels
are only used to compute the AUROC that is printed.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import hashlib
import json
import struct
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

DATA_DIR = Path("/usr/share/datasets/fashion-mnist")
"""Where Debian's dataset-fashion-mnist package installs the IDX files."""

SHA256 = {
    "train-images-idx3-ubyte.gz": (
        "b0564c3eedabfbf835052cff8503ea422014ce006caf5b757f851416ee8300c7"
    ),
    "train-labels-idx1-ubyte.gz": (
        "0ae29f65d86684f32d1b9c85147786c547b9c6aebcaf235f0400a0cce308b056"
    ),
    "t10k-images-idx3-ubyte.gz": (
        "cc1d090a38ace84dfa1aa66e3ada7c336ef481a96936906477e6dd344da56eaa"
    ),
    "t10k-labels-idx1-ubyte.gz": (
        "8d3605d196f4be44669e46906da9733c8131fef761fdbfec72c424d5222f1a05"
    ),
}
CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)


class DatasetError(RuntimeError):
    """The dataset is missing or not the pinned one; the message says what to do."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def check_files(root: Path = DATA_DIR) -> None:
    """Every IDX file present with its pinned SHA-256, else :class:`DatasetError`."""
    for name, want in SHA256.items():
        path = root / name
        if not path.is_file():
            raise DatasetError(
                f"{path}: not found; install Debian's Fashion-MNIST package "
                f"(apt-get install dataset-fashion-mnist) or pass --data DIR"
            )
        got = _sha256(path)
        if got != want:
            raise DatasetError(f"{path}: SHA-256 {got}, expected {want} (not the pinned file)")


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (gzip): uint8 images (n, rows, cols) or labels (n,)."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    (magic,) = struct.unpack(">I", data[:4])
    if magic >> 8 != 0x08:  # unsigned byte
        raise DatasetError(f"{path}: not an unsigned-byte IDX file (magic {magic:#x})")
    ndim = magic & 0xFF
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    arr = np.frombuffer(data, np.uint8, offset=4 + 4 * ndim)
    if arr.size != int(np.prod(shape)):
        raise DatasetError(f"{path}: {arr.size} values, the header says {shape}")
    return arr.reshape(shape)


def load(split: str, root: Path = DATA_DIR) -> tuple[np.ndarray, np.ndarray]:
    """(images (n, 28, 28) uint8, labels (n,) uint8) of ``train`` or ``t10k``, checked."""
    check_files(root)
    images = read_idx(root / f"{split}-images-idx3-ubyte.gz")
    labels = read_idx(root / f"{split}-labels-idx1-ubyte.gz")
    if images.shape[0] != labels.shape[0] or images.shape[1:] != (28, 28):
        raise DatasetError(f"{root}: {split} images {images.shape} and labels {labels.shape}")
    return images, labels


def subsample(idx: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """At most n of the indices, drawn without replacement, in increasing order."""
    if n <= 0 or n >= idx.size:
        return idx
    return np.sort(rng.choice(idx, size=n, replace=False))


def split_indices(
    normal: int, n_train: int, n_test: int, seed: int, root: Path = DATA_DIR, dev: bool = False
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(train images, train labels, train idx, test images, test labels, test idx): ``n_train``
    of the normal class's official training images, and ``n_test`` test images of every class
    (the same draw for every normal class). Both draws are seeded by ``seed``. With ``dev``,
    the test images are drawn from the official *training* images that were not drawn for
    training (a development set: design choices are made there, never on the test set)."""
    tr_x, tr_y = load("train", root)
    tr_idx = subsample(
        np.flatnonzero(tr_y == normal), n_train, np.random.default_rng([seed, normal])
    )
    if dev:
        rest = np.setdiff1d(np.arange(tr_y.size), tr_idx)
        te_idx = subsample(rest, n_test, np.random.default_rng([seed, 10]))
        return tr_x, tr_y, tr_idx, tr_x, tr_y, te_idx
    te_x, te_y = load("t10k", root)
    te_idx = subsample(np.arange(te_y.size), n_test, np.random.default_rng([seed, 10]))
    return tr_x, tr_y, tr_idx, te_x, te_y, te_idx


def rgb(images: np.ndarray) -> list[np.ndarray]:
    """Grey (n, h, w) uint8 -> RGB images (h, w, 3), as flowscore decodes a grey PNG."""
    return [np.repeat(im[:, :, None], 3, axis=2) for im in images]


# ------------------------------------------------------------------------------ archive


def write_archive(out: Path, normal: int, n_train: int, n_test: int, seed: int, root: Path) -> int:
    """Write the archive for one normal class; returns the number of images written."""
    from PIL import Image

    tr_x, tr_y, tr_idx, te_x, te_y, te_idx = split_indices(normal, n_train, n_test, seed, root)
    rows: list[tuple[str, int]] = []
    for split, xs, ys, idx in (("train", tr_x, tr_y, tr_idx), ("test", te_x, te_y, te_idx)):
        for i in idx:
            rel = f"split={split}/class={int(ys[i])}/{int(i):05d}.png"
            path = out / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(xs[i], mode="L").save(path)
            rows.append((rel, int(ys[i] != normal)))
    truth = out / "_truth"
    truth.mkdir(parents=True, exist_ok=True)
    with (truth / "labels.csv").open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["path", "label"])
        w.writerows(rows)
    return len(rows)


# -------------------------------------------------------------------------------- study


def _auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    from flowcore.synthetic import auroc

    return round(auroc(scores[~labels], scores[labels]), 4)


def study_class(
    normal: int, args: argparse.Namespace, spec: Any
) -> tuple[dict[str, float], dict[str, Any]]:
    """AUROC of every method for one normal class, and what was fitted."""
    import torch
    from sklearn.ensemble import IsolationForest
    from sklearn.svm import OneClassSVM

    from flowcore.fit import fit_scorer, split_holdout
    from flowcore.windows import to_tensor

    tr_x, _, tr_idx, te_x, te_y, te_idx = split_indices(
        normal, args.train, args.test, args.seed, Path(args.data), dev=args.dev
    )
    train_all = rgb(tr_x[tr_idx])
    fit_i, val_i = split_holdout([str(i) for i in tr_idx], spec.val_fraction, args.seed)
    t0 = time.perf_counter()
    scorer, report = fit_scorer([train_all[i] for i in fit_i], [train_all[i] for i in val_i], spec)
    fit_s = time.perf_counter() - t0
    test = rgb(te_x[te_idx])
    labels = te_y[te_idx] != normal
    feat = scorer.featurizer
    own, flow_only, recon_only, codes_test = [], [], [], []
    with torch.inference_mode():
        for k in range(0, len(test), 256):
            batch = np.stack(test[k : k + 256])
            own.append(scorer.score(batch).summary["anomaly_score"])
            x = to_tensor(batch)
            prepared = feat.prepare(x)
            raw = feat.encoder(prepared)
            z = (raw - feat.mean[:, None, None]) * feat.inv_std[:, None, None]
            flow_only.append(-scorer.grid_from_features(z).flatten().numpy())
            recon_only.append(-feat.recon_log_density(prepared, raw).flatten().numpy())
            codes_test.append(z.flatten(1).numpy())
        codes_train = np.concatenate(
            [
                feat(to_tensor(np.stack(train_all[k : k + 256]))).flatten(1).numpy()
                for k in range(0, len(train_all), 256)
            ]
        )
    pixels_train = tr_x[tr_idx].reshape(len(tr_idx), -1) / 255.0
    pixels_test = te_x[te_idx].reshape(len(te_idx), -1) / 255.0
    scores = {
        "ae_flow": np.concatenate(own),
        "ae_flow_latent_only": np.concatenate(flow_only),
        "ae_recon_only": np.concatenate(recon_only),
    }
    t1 = time.perf_counter()
    for name, (a, b) in {
        "pixels": (pixels_train, pixels_test),
        "codes": (codes_train, np.concatenate(codes_test)),
    }.items():
        forest = IsolationForest(random_state=args.seed).fit(a)
        scores[f"isolation_forest_{name}"] = -forest.score_samples(b)
        svm = OneClassSVM(gamma="scale").fit(a)
        scores[f"one_class_svm_{name}"] = -svm.decision_function(b)
    base_s = time.perf_counter() - t1
    row = {name: _auroc(labels, s) for name, s in scores.items()}
    info = {
        "fit_seconds": round(fit_s, 1),
        "baseline_seconds": round(base_s, 1),
        "train_images": len(fit_i),
        "val_images": len(val_i),
        "test_images": len(test),
        "test_anomalous": int(labels.sum()),
        "recon_gain": scorer.training_stats.get("recon_gain"),
        "best_epoch": report.best_epoch,
    }
    return row, info


COLUMNS = (
    ("ae_flow", "encoder+flow"),
    ("ae_flow_latent_only", "−log p(z) only"),
    ("ae_recon_only", "recon only"),
    ("isolation_forest_pixels", "IForest pixels"),
    ("one_class_svm_pixels", "OC-SVM pixels"),
    ("isolation_forest_codes", "IForest codes"),
    ("one_class_svm_codes", "OC-SVM codes"),
)


def run_study(args: argparse.Namespace) -> int:
    import torch

    from flowcore.encoder import EncoderConfig
    from flowcore.fit import PRESETS

    torch.set_num_threads(args.threads)
    spec = PRESETS["ae-flow"]
    changes = {k: _value(v) for k, v in (kv.split("=", 1) for kv in args.set)}
    assert isinstance(spec.featurizer, EncoderConfig)
    spec = replace(spec, featurizer=replace(spec.featurizer, **changes))
    t0 = time.perf_counter()
    rows: dict[int, dict[str, float]] = {}
    infos: dict[int, dict[str, Any]] = {}
    for k in args.classes:
        rows[k], infos[k] = study_class(k, args, spec)
        print(f"class {k}: {rows[k]} {infos[k]}", file=sys.stderr, flush=True)
    mean = {c: round(float(np.mean([r[c] for r in rows.values()])), 4) for c, _ in COLUMNS}
    seconds = time.perf_counter() - t0
    where = "official training images not used for training (dev)" if args.dev else "t10k"
    print(
        f"Fashion-MNIST one-vs-rest, image AUROC; {args.train} normal training images per "
        f"class ({infos[args.classes[0]]['train_images']} fit, "
        f"{infos[args.classes[0]]['val_images']} held out), {args.test} test images from "
        f"{where}, seed {args.seed}, {args.threads} thread(s), {seconds / 60:.1f} min"
    )
    print()
    print("| class | " + " | ".join(title for _, title in COLUMNS) + " |")
    print("|---|" + "---:|" * len(COLUMNS))
    for k, r in rows.items():
        print(f"| {k} {CLASSES[k]} | " + " | ".join(f"{r[c]:.3f}" for c, _ in COLUMNS) + " |")
    print("| **mean** | " + " | ".join(f"**{mean[c]:.3f}**" for c, _ in COLUMNS) + " |")
    if args.json:
        out = {
            "protocol": "one-vs-rest",
            "test_source": where,
            "train_per_class": args.train,
            "test_images": args.test,
            "seed": args.seed,
            "spec_featurizer": changes,
            "auroc": {str(k): r for k, r in rows.items()},
            "mean": mean,
            "info": {str(k): v for k, v in infos.items()},
            "seconds": round(seconds, 1),
        }
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n", encoding="utf-8")
    return 0


def _value(text: str) -> Any:
    if "," in text:
        return tuple(int(t) for t in text.split(",") if t)
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--data", default=str(DATA_DIR), help="folder of the four IDX .gz files")
    sub = ap.add_subparsers(dest="command", required=True)
    a = sub.add_parser("archive", help="write a flowscore archive for one normal class")
    a.add_argument("out", help="the archive folder to write")
    a.add_argument("--normal", type=int, choices=range(10), required=True)
    a.add_argument("--train", type=int, default=2000, help="normal training images (0: all)")
    a.add_argument("--test", type=int, default=2000, help="test images (0: all 10000)")
    a.add_argument("--seed", type=int, default=0)
    sub.add_parser("check", help="check that the four files are there, with their SHA-256")
    s = sub.add_parser("study", help="the 10-class one-vs-rest table, in process")
    s.add_argument("--train", type=int, default=2000, help="normal training images per class")
    s.add_argument("--test", type=int, default=2000, help="test images (all classes)")
    s.add_argument("--classes", type=int, nargs="+", default=list(range(10)))
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--threads", type=int, default=1)
    s.add_argument("--dev", action="store_true", help="test on unused training images")
    s.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a field of the ae-flow preset's EncoderConfig",
    )
    s.add_argument("--json", help="also write the figures to this file")
    args = ap.parse_args(argv)
    try:
        if args.command == "check":
            check_files(Path(args.data))
            print(f"{args.data}: the four Fashion-MNIST files, SHA-256 as pinned")
            return 0
        if args.command == "archive":
            n = write_archive(
                Path(args.out), args.normal, args.train, args.test, args.seed, Path(args.data)
            )
            print(f"{args.out}: {n} images, ground truth in _truth/labels.csv")
            return 0
        return run_study(args)
    except DatasetError as e:
        print(f"fashion_mnist: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
