"""Two-stage fitting of a window scorer (the grain paper's recipe), in one plain process.

1. Sample random windows from the training images and fit the centred PCA basis.
2. Project the windows and fit the flow by maximum likelihood, early-stopping on the NLL of
   windows from *held-out whole images* (never crops of the training images).
3. Score the held-out images whole: the threshold is a high quantile (default 0.99) of their
   ``anomaly_score``; the heatmap clip range is the 0.1 % and 5 % quantiles of their windows.

Presets name the two configurations of the grain paper, and ``cnn`` (a resnet18 feature grid
with an affine-coupling flow). The Ray Train job calls the same pieces per worker.

The featurizer-generic steps and how a CNN backbone's weights reach them (``backbone_state``:
a plain ``dict[str, Tensor]`` from :func:`flowcore.cnn.read_backbone_weights`, read once from
the user's file and shipped to workers as tensors; ``None`` = the random backbone seeded by
``spec.seed``, identical in every process)::

    base = init_featurizer(spec, backbone_state)          # once per process; windows: identity
    rows = basis_sample(spec, images, per_image, gen, featurizer=base)       # per image
    feat = fit_featurizer(spec, all_rows, backbone_state)  # or featurizer=base
    x = feature_rows(feat, spec, images, per_image, gen)                     # per image

The window featurizer needs neither ``featurizer=`` nor ``backbone_state``. For the CNN,
``basis_sample`` without ``featurizer=`` uses the seeded random backbone (cached per process),
so it must be given ``base`` whenever weights are given.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import math
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from .cnn import CNNConfig, CNNFeaturizer, fit_standardization, sample_cells
from .distill import DistilledFeaturizer
from .encoder import EncoderConfig, EncoderFeaturizer, fit_encoder, sample_crops
from .flows import (
    build_flow,
)
from .globalscore import GlobalScore, descriptors
from .multiscale import MultiScaleConfig, MultiScaleFeaturizer, fit_multiscale
from .scorer import (
    Calibration,
    FeaturizerModule,
    ImageScore,
    Scorer,
    summarize,
)
from .spec import (
    AUTO_STATISTIC,
    FEATURIZER_TYPES,
    PRESETS,
    ConfigError,
    FeaturizerConfig,
    ScorerSpec,
    apply_overrides,
    featurizer_config_from_dict,
    featurizer_config_to_dict,
    spec_from_dict,
    spec_to_dict,
)
from .synthetic import DefectConfig, add_defect, auroc, defect_cells
from .training import EpochStats, fit_flow
from .windows import (
    QUANTISATION_VARIANCE,
    WindowConfig,
    WindowFeaturizer,
    fit_window_featurizer,
    sample_windows,
    to_tensor,
)

__all__ = [
    "FeaturizerConfig",
    "ScorerSpec",
    "PRESETS",
    "FitReport",
    "fit_scorer",
    "fit_global_score",
    "constant_dimensions_warning",
    "GLOBAL_MAX_TRAIN_IMAGES",
    "project_windows",
    "init_featurizer",
    "basis_sample",
    "fit_featurizer",
    "feature_rows",
    "anomaly_rows",
    "balance_recon",
    "DEFECTS_PER_IMAGE",
    "image_generator",
    "split_holdout",
    "calibrate",
    "Calibrated",
    "StatisticChoice",
    "choose_image_score",
    "choice_copies",
    "AUTO_STATISTIC",
    "MIN_GROUP_IMAGES",
    "ConfigError",
    "FEATURIZER_TYPES",
    "featurizer_config_to_dict",
    "featurizer_config_from_dict",
    "spec_to_dict",
    "spec_from_dict",
    "apply_overrides",
]


@dataclass
class FitReport:
    train_images: int
    val_images: int
    train_windows: int
    val_windows: int
    best_epoch: int
    best_val_nll: float
    epochs: list[EpochStats]
    threshold: float
    heatmap_clip: tuple[float, float]
    seconds: float

    def as_dict(self) -> dict[str, Any]:
        return {
            "train_images": self.train_images,
            "val_images": self.val_images,
            "train_windows": self.train_windows,
            "val_windows": self.val_windows,
            "best_epoch": self.best_epoch,
            "best_val_nll": self.best_val_nll,
            "epochs": len(self.epochs),
            "threshold": self.threshold,
            "heatmap_clip": list(self.heatmap_clip),
            "seconds": round(self.seconds, 3),
        }


@torch.no_grad()
def project_windows(feat: WindowFeaturizer, windows: torch.Tensor) -> torch.Tensor:
    """Rows of flattened windows (n, 3·w·w) -> feature rows (n, features), the same map the
    convolution applies (tested equal)."""
    return feat.project(windows)


# The featurizer-generic steps of fitting. Each works on a few images at a time, so the Ray
# Train job can run them in data tasks, image by image.


@functools.lru_cache(maxsize=1)
def _seeded_cnn(cfg: CNNConfig, seed: int) -> CNNFeaturizer:
    """The random backbone of (cfg, seed), built once per process (read-only: callers that
    modify it get a copy)."""
    return CNNFeaturizer(cfg, seed=seed).eval()


def init_featurizer(
    spec: ScorerSpec, backbone_state: Mapping[str, torch.Tensor] | None = None
) -> FeaturizerModule:
    """The unfitted featurizer of ``spec``: for the CNN, the backbone with ``backbone_state``
    loaded (checked by name and shape; see :func:`flowcore.cnn.read_backbone_weights`), or
    with its random initialisation seeded by ``spec.seed`` when ``None`` (the same in every
    process), and identity standardisation; for windows, the identity projection (windows
    take no ``backbone_state``)."""
    cfg = spec.featurizer
    if isinstance(cfg, CNNConfig):
        if backbone_state is None:
            return copy.deepcopy(_seeded_cnn(cfg, spec.seed))
        feat = CNNFeaturizer(cfg, init=False)  # every tensor is overwritten by the state
        feat.load_backbone_state(backbone_state)
        return feat.eval()
    if backbone_state is not None:
        raise ValueError("backbone weights were given, but the windows featurizer has none")
    if isinstance(cfg, MultiScaleConfig):
        return MultiScaleFeaturizer(cfg)
    if isinstance(cfg, EncoderConfig):
        return EncoderFeaturizer(cfg, seed=spec.seed)
    return WindowFeaturizer(cfg)


def _cnn_base(spec: ScorerSpec, featurizer: FeaturizerModule | None) -> CNNFeaturizer:
    assert isinstance(spec.featurizer, CNNConfig)
    if featurizer is None:
        return _seeded_cnn(spec.featurizer, spec.seed)
    if not isinstance(featurizer, CNNFeaturizer) or featurizer.cfg != spec.featurizer:
        raise ValueError(
            f"featurizer does not match the spec's {spec.featurizer}: pass the one "
            f"init_featurizer(spec, backbone_state) built"
        )
    return featurizer


def basis_sample(
    spec: ScorerSpec,
    images: Sequence[np.ndarray],
    per_image: int,
    gen: torch.Generator,
    featurizer: FeaturizerModule | None = None,
) -> torch.Tensor:
    """Rows that fit the featurizer, ``per_image`` from each RGB uint8 image: (n, d) float32
    on the CPU. Windows: raw windows for the PCA basis (d = 3·w·w). CNN: raw (unstandardised)
    feature vectors at random cells (d = D), computed with ``featurizer`` (the one of
    :func:`init_featurizer`, which carries the backbone weights; ``None`` = the random
    backbone seeded by ``spec.seed``)."""
    if isinstance(spec.featurizer, CNNConfig):
        base = _cnn_base(spec, featurizer)
        return sample_cells(base, images, per_image, gen, raw=True).cpu()
    if isinstance(spec.featurizer, MultiScaleConfig):
        return sample_windows(images, spec.featurizer.sampling_config, per_image, gen)
    if isinstance(spec.featurizer, EncoderConfig):
        return sample_crops(images, spec.featurizer, per_image, gen)
    return sample_windows(images, spec.featurizer, per_image, gen)


def fit_featurizer(
    spec: ScorerSpec,
    rows: torch.Tensor,
    backbone_state: Mapping[str, torch.Tensor] | None = None,
    *,
    featurizer: FeaturizerModule | None = None,
) -> FeaturizerModule:
    """Fit the featurizer on the rows of :func:`basis_sample`. Windows: the PCA basis. CNN:
    the per-channel mean and 1/std (floored) of the raw rows, installed in a new featurizer
    whose backbone is ``featurizer``'s (copied; the one ``basis_sample`` used), else built
    from ``backbone_state``, else the random one seeded by ``spec.seed``."""
    cfg = spec.featurizer
    if isinstance(cfg, CNNConfig):
        if featurizer is not None and backbone_state is not None:
            raise ValueError("pass either featurizer= or backbone_state, not both")
        if rows.ndim != 2 or rows.shape[1] != cfg.features:
            raise ValueError(f"rows must be (n, {cfg.features}), got {tuple(rows.shape)}")
        feat: FeaturizerModule = (
            copy.deepcopy(_cnn_base(spec, featurizer))
            if featurizer is not None
            else init_featurizer(spec, backbone_state)
        )
        assert isinstance(feat, CNNFeaturizer)
        mean, inv_std = fit_standardization(rows)
        feat.set_standardization(mean.to(feat.device), inv_std.to(feat.device))
        return feat
    if backbone_state is not None:
        raise ValueError("backbone weights were given, but the windows featurizer has none")
    if isinstance(cfg, MultiScaleConfig):
        return fit_multiscale(rows, cfg, seed=spec.seed)
    if isinstance(cfg, EncoderConfig):
        return fit_encoder(rows, cfg, seed=spec.seed)[0]
    return fit_window_featurizer(rows, cfg, seed=spec.seed)


def constant_dimensions_warning(spec: ScorerSpec, rows: torch.Tensor) -> str | None:
    """A warning when a window model keeps every dimension (``components`` None or at least
    the rank) of basis ``rows`` that do not vary in some directions (a grey camera stores R =
    G = B: 242 of an 11×11×3 window's 363 dimensions) and trains on exact windows: its flow
    shrinks those directions to nothing and then ranks images by float rounding (gravel spots
    at image AUROC 0.485 against 0.972 dequantised; README, Evaluation). None otherwise."""
    cfg = spec.featurizer
    if spec.dequantize or not isinstance(cfg, WindowConfig) or rows.shape[0] < 2:
        return None
    x = rows.double()
    eig = torch.linalg.eigvalsh(torch.cov(x.T)).flip(0)
    flat = int((eig < QUANTISATION_VARIANCE).sum())
    kept = cfg.kept
    if flat == 0 or kept <= eig.numel() - flat:
        return None
    return (
        f"{flat} of the {eig.numel()} window dimensions never vary in the training images "
        f"(grey images stored as RGB?) and the model keeps {kept} of them: a flow trained on "
        "exact windows collapses on those and scores float rounding. Set dequantize = true "
        "(grain-quarter and grain-fine do) or fewer components."
    )


@torch.no_grad()
def feature_rows(
    featurizer: FeaturizerModule,
    spec: ScorerSpec,
    images: Sequence[np.ndarray],
    per_image: int,
    gen: torch.Generator,
) -> torch.Tensor:
    """Feature rows for the flow, ``per_image`` random positions from each image (with the
    dequantisation noise when ``spec.dequantize``): (n, D) float32 on the featurizer's
    device. CNN: standardised features at random cells of the grid."""
    if isinstance(featurizer, CNNFeaturizer):
        if featurizer.cfg != spec.featurizer:
            raise ValueError(f"featurizer {featurizer.cfg} does not match {spec.featurizer}")
        return sample_cells(featurizer, images, per_image, gen, dequantize=spec.dequantize)
    if isinstance(featurizer, MultiScaleFeaturizer):
        if featurizer.cfg != spec.featurizer:
            raise ValueError(f"featurizer {featurizer.cfg} does not match {spec.featurizer}")
        return featurizer.sample_cells(images, per_image, gen, spec.dequantize)
    if isinstance(featurizer, EncoderFeaturizer):
        if featurizer.cfg != spec.featurizer:
            raise ValueError(f"featurizer {featurizer.cfg} does not match {spec.featurizer}")
        return _encoder_cells(featurizer, images, per_image, gen, spec.dequantize)
    if isinstance(featurizer, DistilledFeaturizer):  # a student's features (its teacher's spec)
        return _encoder_cells(featurizer, images, per_image, gen, spec.dequantize)
    if not isinstance(spec.featurizer, WindowConfig):
        raise TypeError(f"a {type(featurizer).__name__} does not fit {spec.featurizer}")
    windows = sample_windows(images, spec.featurizer, per_image, gen, spec.dequantize)
    return project_windows(featurizer, windows.to(featurizer.mean.device))


def _encoder_cells(
    featurizer: EncoderFeaturizer | DistilledFeaturizer,
    images: Sequence[np.ndarray],
    per_image: int,
    gen: torch.Generator,
    dequantize: bool,
) -> torch.Tensor:
    """Standardised codes at ``per_image`` random cells of each image, drawn without
    replacement (all cells where the grid has fewer: a window-sized image gives its one code
    once, repeats would only be duplicates)."""
    rows = []
    dev = featurizer.device
    for img in images:
        x = to_tensor(np.asarray(img)[None])
        if dequantize:
            x += torch.rand(x.shape, generator=gen) / 256.0
        f = featurizer(x.to(dev)).flatten(2)[0]  # (D, cells)
        cells = f.shape[1]
        pick = torch.randperm(cells, generator=gen)[: min(per_image, cells)]
        rows.append(f[:, pick.to(dev)].T)
    return torch.cat(rows).float()


@torch.no_grad()
def balance_recon(scorer: Scorer, images: Iterable[np.ndarray], batch: int = 64) -> float | None:
    """For an encoder featurizer with ``recon="balanced"``: set the weight of the
    reconstruction term to the ratio of the standard deviations of the flow's cell
    log-likelihoods and of the term over held-out normal images (both terms then move an
    image's score by as much per unit of their own spread); returns the weight, or ``None``
    for any other featurizer (nothing changed). Uses no anomalies and no labels."""
    feat = scorer.featurizer
    if not isinstance(feat, EncoderFeaturizer) or feat.cfg.recon != "balanced":
        return None
    var = float(feat.recon_var)
    feat.set_recon(var, 1.0)
    flow_ll, recon_ll = [], []
    pending: list[np.ndarray] = []

    def flush() -> None:
        if pending:
            feats, extra = feat.featurize(to_tensor(np.stack(pending), feat.device))
            assert extra is not None
            flow_ll.append(scorer.grid_from_features(feats).reshape(-1).double().cpu())
            recon_ll.append(extra.reshape(-1).double().cpu())
            pending.clear()

    for img in images:
        if pending and (img.shape != pending[0].shape or len(pending) >= batch):
            flush()
        pending.append(img)
    flush()
    if not flow_ll:
        raise ValueError("balancing the reconstruction term needs at least one held-out image")
    a, b = torch.cat(flow_ll), torch.cat(recon_ll)
    spread_b = float(b.std()) if b.numel() > 1 else 0.0
    gain = float(a.std()) / spread_b if b.numel() > 1 and spread_b > 0 else 1.0
    if not math.isfinite(gain) or gain <= 0:
        gain = 1.0
    feat.set_recon(var, gain)
    return gain


DEFECTS_PER_IMAGE = 4
"""Synthetic-anomaly copies made of each training image per draw of :func:`anomaly_rows`."""


def _crop_around(img: np.ndarray, alpha: np.ndarray, margin: int) -> tuple[np.ndarray, np.ndarray]:
    """The part of an image (and of a defect's alpha) within ``margin`` pixels of the defect:
    featurizing it costs a small fraction of the whole image."""
    ys, xs = np.nonzero(alpha > 0)
    h, w = alpha.shape
    y0, y1 = max(0, int(ys.min()) - margin), min(h, int(ys.max()) + 1 + margin)
    x0, x1 = max(0, int(xs.min()) - margin), min(w, int(xs.max()) + 1 + margin)
    return img[y0:y1, x0:x1], alpha[y0:y1, x0:x1]


@torch.no_grad()
def anomaly_rows(
    featurizer: FeaturizerModule,
    spec: ScorerSpec,
    images: Sequence[np.ndarray],
    gen: torch.Generator,
    *,
    donors: Sequence[np.ndarray] | None = None,
    defects: DefectConfig | None = None,
) -> torch.Tensor:
    """Feature rows of synthetic anomalies (:mod:`flowcore.synthetic`): each image gets
    :data:`DEFECTS_PER_IMAGE` copies with one made-up defect each, and each copy gives the
    feature vectors of up to ``spec.fit.synthetic_rows // DEFECTS_PER_IMAGE`` cells that see
    its defect (:func:`flowcore.synthetic.defect_cells`). Only the region around the defect
    is featurized. ``donors``: images that ``patch`` defects are cut from (default: the image
    itself). (n, D) float32 on the featurizer's device; (0, D) when no defect reaches a
    cell (an image smaller than the window)."""
    rng = np.random.default_rng(int(torch.randint(0, 2**62, (1,), generator=gen)))
    per = max(1, spec.fit.synthetic_rows // DEFECTS_PER_IMAGE)
    geometry = featurizer.geometry
    # the context a cell's features depend on: its window, or for a CNN cell (window 1) a
    # receptive field of several strides
    margin = int(math.ceil(max(geometry.window, 8 * geometry.stride) / geometry.scale)) + 2
    device = featurizer.mean.device
    rows = []
    for img in images:
        for _ in range(DEFECTS_PER_IMAGE):
            donor = donors[int(rng.integers(len(donors)))] if donors else None
            bad, alpha = add_defect(np.asarray(img), rng, defects, donor=donor)
            if not (alpha > 0).any():
                continue
            crop, a = _crop_around(bad, alpha, margin)
            small = min(crop.shape[0], crop.shape[1]) * geometry.scale < geometry.window
            if small:
                continue
            feats = featurizer(to_tensor(crop[None], device))  # (1, D, gh, gw)
            cells = defect_cells(a, geometry, (feats.shape[-2], feats.shape[-1]))
            if cells.numel() == 0:
                continue
            if cells.numel() > per:
                cells = cells[torch.randperm(cells.numel(), generator=gen)[:per]]
            rows.append(feats[0].flatten(1)[:, cells.to(device)].T)
    if not rows:
        return torch.zeros((0, spec.features), device=device)
    return torch.cat(rows).float()


def image_generator(seed: int, key: str) -> torch.Generator:
    """A generator seeded from ``seed`` and a stable key (an image path): the same image
    always yields the same validation windows, on any worker."""
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def split_holdout(keys: Sequence[str], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Split items (by a stable key such as the image path) into (train, held-out) indices.
    Whole images are held out: the ``round(fraction · n)`` items (at least one, never all)
    whose keys hash lowest under ``seed``. The split depends only on the set of keys and the
    seed, not on their order, so it is the same on every run and machine."""
    if len(keys) < 2:
        raise ValueError(f"need at least 2 images to hold some out, got {len(keys)}")
    u = [hashlib.sha256(f"{seed}:{k}".encode()).digest() for k in keys]
    n_val = min(len(keys) - 1, max(1, round(fraction * len(keys))))
    held = set(sorted(range(len(keys)), key=lambda i: (u[i], keys[i]))[:n_val])
    return [i for i in range(len(keys)) if i not in held], sorted(held)


MIN_GROUP_IMAGES = 3
"""Fewest held-out images of a path-column value that get their own threshold and offset."""


@dataclass
class Calibrated:
    """What :func:`calibrate` learns from held-out normal images."""

    threshold: float
    heatmap_clip: tuple[float, float]
    calibration: Calibration | None = None
    image_score: ImageScore | None = None  # with a two-sided score: its centre and spread

    def install(self, scorer: Scorer) -> None:
        scorer.threshold, scorer.heatmap_clip = self.threshold, self.heatmap_clip
        scorer.calibration = self.calibration
        if self.image_score is not None:
            scorer.image_score = self.image_score


@torch.no_grad()
def calibrate(
    scorer: Scorer,
    images: Iterable[np.ndarray],
    quantile: float,
    batch: int = 8,
    *,
    groups: Sequence[str | None] | None = None,
    by: str = "",
) -> Calibrated:
    """Threshold (``quantile`` of anomaly_score) and heatmap clip range on held-out normal
    images. The clip is (0.1 %, 5 %) of their window log-likelihoods: overlays leave the 95 %
    most typical windows of normal images clear and are fully red at the rarest 0.1 %.
    Images of different sizes are scored in separate batches.

    With ``by`` (a path column) and ``groups`` (each image's value of it, in order): every
    value with at least :data:`MIN_GROUP_IMAGES` held-out images gets an offset (its median
    score minus the global median) and a threshold (the ``quantile`` of its offset scores);
    other values use the global threshold.

    A two-sided image score (``ImageScore.two_sided``) first gets its centre and spread: the
    median and the scaled median absolute deviation (floored) of the statistic over these
    images; the threshold is then a quantile of the two-sided scores. The scorer is not
    changed: :meth:`Calibrated.install` does that."""
    scores, lls = [], []
    pending: list[np.ndarray] = []
    fitted = scorer.image_score
    if fitted.two_sided:
        # score the raw statistic (one-sided) here; the two-sided transform comes after
        fitted = replace(fitted, centre=None, spread=None)
    keep, scorer.image_score = scorer.image_score, fitted

    def flush() -> None:
        if pending:
            sb = scorer.score(np.stack(pending))
            scores.append(sb.summary["anomaly_score"])
            lls.append(sb.grid.reshape(-1))
            pending.clear()

    try:
        for img in images:
            if pending and (img.shape != pending[0].shape or len(pending) >= batch):
                flush()
            pending.append(img)
        flush()
    finally:
        scorer.image_score = keep
    if not scores:
        raise ValueError("calibration needs at least one held-out image")
    s = np.concatenate(scores).astype(np.float64)
    ll = np.concatenate(lls)
    lo, hi = np.quantile(ll, [0.001, 0.05])
    finite = np.nan_to_num(s, nan=np.inf).clip(-1e30, 1e30)
    image_score = None
    if fitted.two_sided:
        centre = float(np.median(finite))
        mad = 1.4826 * float(np.median(np.abs(finite - centre)))
        spread = max(mad, 1e-6 * max(1.0, abs(centre)))
        image_score = replace(fitted, centre=centre, spread=spread)
        finite = np.abs(finite - centre) / spread
    out = Calibrated(
        float(np.quantile(finite, quantile)), (float(lo), float(hi)), image_score=image_score
    )
    if by:
        if groups is None or len(groups) != len(s):
            raise ValueError(f"calibration by {by!r} needs one value per held-out image")
        centre = float(np.median(finite))
        thresholds: dict[str, float] = {}
        offsets: dict[str, float] = {}
        for g in sorted({g for g in groups if g is not None}):
            mine = finite[[i for i, v in enumerate(groups) if v == g]]
            if len(mine) >= MIN_GROUP_IMAGES:
                offsets[g] = float(np.median(mine)) - centre
                thresholds[g] = float(np.quantile(mine - offsets[g], quantile))
        out.calibration = Calibration(by=by, thresholds=thresholds, offsets=offsets)
    return out


def _with_anomalies(
    feat: FeaturizerModule,
    spec: ScorerSpec,
    x: torch.Tensor,
    images: Sequence[np.ndarray],
    gen: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Normal rows x and the synthetic-anomaly rows of the images, with labels (0, 1)."""
    bad = anomaly_rows(feat, spec, images, gen, donors=images).to(x.device)
    y = torch.cat([torch.zeros(x.shape[0]), torch.ones(bad.shape[0])]).to(x.device)
    return torch.cat([x, bad]), y


@dataclass
class StatisticChoice:
    """What :func:`choose_image_score` measured and picked: the image AUROC of each
    candidate (``neg_mean_k_lowest@K`` for each k tried) on held-out normal images against
    synthetic-anomaly copies of them."""

    image_score: ImageScore
    chosen: str
    aurocs: dict[str, float]
    normal_images: int
    anomalous_images: int

    def as_dict(self) -> dict[str, Any]:
        return {
            "chosen": self.chosen,
            "auroc_by_candidate": {k: round(v, 4) for k, v in self.aurocs.items()},
            "normal_images": self.normal_images,
            "anomalous_images": self.anomalous_images,
        }


CHOICE_ANOMALIES = 32
"""Synthetic-anomaly images :func:`choice_copies` aims for (2 to 8 copies per image)."""


def choice_copies(held_out: int) -> int:
    """Copies per held-out image for :func:`choose_image_score`: enough for about
    :data:`CHOICE_ANOMALIES` anomalous images (a handful of held-out images alone would
    decide the statistic by noise), 2 to 8."""
    return max(2, min(8, -(-CHOICE_ANOMALIES // max(1, held_out))))


CHOICE_TIE = 0.005
"""AUROC difference under which :func:`choose_image_score` keeps the earlier candidate (the
default statistic comes first)."""


@torch.no_grad()
def choose_image_score(
    scorer: Scorer,
    images: Iterable[np.ndarray],
    *,
    seed: int = 0,
    copies: int = 2,
    defects: DefectConfig | None = None,
) -> StatisticChoice:
    """Pick the image statistic on held-out normal images: each image is scored as it is and
    as ``copies`` copies with one synthetic defect each (:mod:`flowcore.synthetic`, patches
    cut from the previous image), and the candidate with the highest image AUROC of copies
    against originals wins; within :data:`CHOICE_TIE` of the best, the earlier candidate
    (the default, minus the mean of the k lowest windows at the geometry's k, comes first).
    Candidates: ``neg_mean_k_lowest`` at k/4, k and 4k, then ``neg_p01``, ``neg_min``,
    ``p50_minus_p01`` and ``neg_p05``. A two-sided score keeps its transform (set later by
    :func:`calibrate`). Only per-image scalars are kept, so any number of images streams."""
    rng = np.random.default_rng(seed)
    base = scorer.image_score
    geometry = scorer.geometry
    names: list[str] = []
    normal: dict[str, list[float]] = {}
    bad: dict[str, list[float]] = {}
    scores: dict[str, ImageScore] = {}
    previous: np.ndarray | None = None
    n_img = n_bad = 0

    def stats(grid: torch.Tensor) -> dict[str, float]:
        gh, gw = grid.shape[-2:]
        if not scores:
            k0 = base.k_for(gh, gw, geometry)
            for k in dict.fromkeys((k0, max(1, k0 // 4), min(gh * gw, 4 * k0))):
                scores[f"neg_mean_k_lowest@{k}"] = replace(
                    base, statistic="neg_mean_k_lowest", k=k, centre=None, spread=None
                )
            for name in ("neg_p01", "neg_min", "p50_minus_p01", "neg_p05"):
                scores[name] = replace(base, statistic=name, k=None, centre=None, spread=None)
            names.extend(scores)
        return {
            name: float(summarize(grid, geometry, sc)["anomaly_score"][0])
            for name, sc in scores.items()
        }

    for img in images:
        img = np.asarray(img)
        for name, v in stats(scorer.log_likelihood_grid(img[None])).items():
            normal.setdefault(name, []).append(v)
        n_img += 1
        donor = previous if previous is not None and previous.shape == img.shape else None
        for _ in range(copies):
            copy_img, alpha = add_defect(img, rng, defects, donor=donor)
            if not (alpha > 0.5).any():
                continue
            for name, v in stats(scorer.log_likelihood_grid(copy_img[None])).items():
                bad.setdefault(name, []).append(v)
            n_bad += 1
        previous = img
    if not n_img or not n_bad:
        raise ValueError("choosing the image statistic needs at least one held-out image")
    aurocs = {name: auroc(normal[name], bad[name]) for name in names}
    best = max(v for v in aurocs.values() if math.isfinite(v))
    chosen = next(n for n in names if math.isfinite(aurocs[n]) and aurocs[n] >= best - CHOICE_TIE)
    return StatisticChoice(scores[chosen], chosen, aurocs, n_img, n_bad)


GLOBAL_MAX_TRAIN_IMAGES = 500
"""Most training images whose descriptors fit the global score (:func:`fit_global_score`):
the Gaussian has at most 32 dimensions, and each image costs one scoring pass."""


@torch.no_grad()
def fit_global_score(
    scorer: Scorer,
    train_images: Iterable[np.ndarray],
    val_images: Iterable[np.ndarray],
    *,
    max_train_images: int = GLOBAL_MAX_TRAIN_IMAGES,
) -> GlobalScore:
    """Fit the image-level global score (:mod:`flowcore.globalscore`) of a fitted scorer on
    normal images: each image is scored once (its descriptor and its raw tail statistic);
    the first ``max_train_images`` training images fit the descriptors' Gaussian. The scorer
    is not changed: set ``scorer.global_score`` to the result."""
    if isinstance(scorer.featurizer, DistilledFeaturizer):
        raise ValueError("a distilled model has no features for a global score")
    keep, scorer.global_score = scorer.global_score, None

    def collect(images: Iterable[np.ndarray], limit: int | None) -> tuple[np.ndarray, list[float]]:
        descs: list[np.ndarray] = []
        tails: list[float] = []
        for img in images:
            if limit is not None and len(descs) >= limit:
                break
            grid, feats = scorer.grid_and_features(np.asarray(img)[None])
            descs.append(descriptors(feats).cpu().numpy()[0])
            tails.append(float(scorer.summarize(grid)["anomaly_score"][0]))
        return np.asarray(descs, np.float64), tails

    try:
        train_d, train_t = collect(train_images, max_train_images)
        val_d, val_t = collect(val_images, None)
    finally:
        scorer.global_score = keep
    if len(train_d) < 3:
        raise ValueError(f"a global score needs at least 3 training images, got {len(train_d)}")
    return GlobalScore.fit(train_d, train_t, val_d, val_t).to(scorer.device)


def fit_scorer(
    train_images: Sequence[np.ndarray],
    val_images: Sequence[np.ndarray],
    spec: ScorerSpec,
    on_epoch: Callable[[EpochStats], None] | None = None,
    device: str | torch.device = "cpu",
    backbone_state: Mapping[str, torch.Tensor] | None = None,
    val_groups: Sequence[str | None] | None = None,
) -> tuple[Scorer, FitReport]:
    """Fit a scorer in this process on RGB uint8 images (each H×W×3; sizes may differ).
    ``val_images`` are whole images held out from training. The windows are drawn once (the
    Ray Train job draws fresh ones every epoch). ``backbone_state``: CNN backbone weights
    (:func:`flowcore.cnn.read_backbone_weights`); ``None`` = random, seeded by ``spec.seed``.
    ``val_groups``: each held-out image's value of ``spec.calibrate_by`` (when set)."""
    if len(train_images) < 1 or len(val_images) < 1:
        raise ValueError("need at least one training and one held-out validation image")
    t0 = time.perf_counter()
    gen = torch.Generator().manual_seed(spec.seed)
    per_basis = max(1, -(-spec.basis_rows // len(train_images)))
    if isinstance(spec.featurizer, CNNConfig):
        base = init_featurizer(spec, backbone_state).to(device)
        rows = basis_sample(spec, train_images, per_basis, gen, featurizer=base)
        feat = fit_featurizer(spec, rows, featurizer=base)
    else:
        rows = basis_sample(spec, train_images, per_basis, gen)
        warning = constant_dimensions_warning(spec, rows)
        if warning:
            warnings.warn(warning, stacklevel=2)
        feat = fit_featurizer(spec, rows, backbone_state).to(device)
    x_train = feature_rows(feat, spec, train_images, spec.windows_per_image, gen)
    x_val = feature_rows(feat, spec, val_images, spec.windows_per_image, gen)
    y_train = y_val = None
    if spec.fit.synthetic_anomalies:
        x_train, y_train = _with_anomalies(feat, spec, x_train, train_images, gen)
        x_val, y_val = _with_anomalies(feat, spec, x_val, val_images, gen)
    torch.manual_seed(spec.seed)
    flow = build_flow(spec.features, spec.flow).to(device)
    fit_cfg = replace(spec.fit, seed=spec.seed)
    result = fit_flow(flow, x_train, x_val, fit_cfg, on_epoch, train_y=y_train, val_y=y_val)
    scorer = Scorer(feat, flow, image_score=spec.image_score).eval()
    scorer.transforms = spec.test_transforms
    recon_gain = balance_recon(scorer, val_images)
    choice = None
    if spec.image_statistic == AUTO_STATISTIC:
        choice = choose_image_score(
            scorer, val_images, seed=spec.seed, copies=choice_copies(len(val_images))
        )
        scorer.image_score = choice.image_score
    if spec.image_global:
        scorer.global_score = fit_global_score(scorer, train_images, val_images)
    cal = calibrate(
        scorer,
        val_images,
        spec.threshold_quantile,
        groups=val_groups,
        by=spec.calibrate_by,
    )
    cal.install(scorer)
    threshold, clip = cal.threshold, cal.heatmap_clip
    report = FitReport(
        train_images=len(train_images),
        val_images=len(val_images),
        train_windows=int(x_train.shape[0]),
        val_windows=int(x_val.shape[0]),
        best_epoch=result.best_epoch,
        best_val_nll=result.best_val_nll,
        epochs=result.history,
        threshold=threshold,
        heatmap_clip=clip,
        seconds=time.perf_counter() - t0,
    )
    scorer.training_stats = report.as_dict()
    if recon_gain is not None:
        scorer.training_stats["recon_gain"] = recon_gain
    if choice is not None:
        scorer.training_stats["image_statistic_choice"] = choice.as_dict()
    return scorer, report
