"""Evaluation against ground truth: image and pixel AUROC of the flow beside baselines fitted on
the same features and windows.

Every method produces a (gh, gw) grid of *normality* per image (higher = more normal, like a
log-likelihood); the flow's grid is its window log-likelihoods, a baseline's is its score of
each window's feature vector. Grids are then summarised exactly like the flow's (DESIGN.md):

- image score = the model's image statistic of the grid (:class:`flowcore.scorer.ImageScore`,
  e.g. minus the mean of the k lowest windows), the same for the flow and every baseline; the
  flow's own score also takes the model's two-sided transform and per-group offsets where it
  has them, as its ``anomaly_score`` in the tables does (the baselines have no held-out
  images to fit those on). Beside it, the flow's image AUROC
  for every candidate statistic (``image_auroc_by_statistic``), so a user sees why the model's
  choice is what it is;
- pixel map = :func:`flowcore.scorer.heatmap_to_image` of the *negated* grid (higher = more
  anomalous), compared with the ground-truth mask.

Baselines (:func:`fit_baselines`, scikit-learn, deterministic given ``seed``):

=================  ===============================================================
isolation_forest   ``IsolationForest`` (100 trees, 256 rows per tree) on ≤ max_rows
one_class_svm      standardise → ``OneClassSVM`` (RBF, gamma="scale", nu=0.05) on ≤ 2000
gaussian           full-covariance Gaussian, Ledoit–Wolf shrinkage, exact log-density
pca_nn             standardise → PCA (95 % variance, ≤ 32 components) → distance to the
                   nearest of ≤ 5000 training rows, negated
=================  ===============================================================

Pixel AUROC is streamed (:class:`PixelAUROC`): a fixed histogram of an ``asinh`` transform of
the scores per class, so an evaluation set of any size needs about 1 MB per method; its
error is bounded by the tie mass it reports (:meth:`PixelAUROC.error_bound`).

Pixel ground truth: a normal image (label 0) without a mask counts as all-normal pixels; an
anomalous image (label 1) without a mask is left out of the pixel AUROC (where the anomaly
lies is unknown) but still counts for the image AUROC. An archive without masks therefore
has no anomalous pixel and its pixel AUROC is ``None`` (``null`` in JSON).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from sklearn.covariance import LedoitWolf
from sklearn.decomposition import PCA
from sklearn.ensemble import IsolationForest
from sklearn.metrics import roc_auc_score, roc_curve
from sklearn.neighbors import NearestNeighbors
from sklearn.preprocessing import StandardScaler
from sklearn.svm import OneClassSVM

from flowcore.globalscore import GlobalScore
from flowcore.scorer import (
    LEGACY_IMAGE_SCORE,
    STATISTICS,
    Calibration,
    Geometry,
    ImageScore,
    heatmap_to_image,
    image_statistics,
)

__all__ = [
    "METHODS",
    "BASELINES",
    "MIN_TRAIN_ROWS",
    "SVM_ROWS",
    "SVM_NU",
    "MEMORY_ROWS",
    "PCA_VARIANCE",
    "PCA_MAX_COMPONENTS",
    "WindowModel",
    "IsolationForestModel",
    "OneClassSVMModel",
    "GaussianModel",
    "PCANearestNeighbourModel",
    "fit_baselines",
    "score_grid",
    "image_auroc",
    "PixelAUROC",
    "MethodResult",
    "EvaluationResult",
    "Evaluator",
    "format_table",
]

METHODS: tuple[str, ...] = ("flow", "isolation_forest", "one_class_svm", "gaussian", "pca_nn")
BASELINES: tuple[str, ...] = METHODS[1:]

MIN_TRAIN_ROWS = 16
"""Fewest training rows :func:`fit_baselines` accepts."""
SVM_ROWS = 2000
"""Rows the one-class SVM is fitted on. libsvm's fit is ~quadratic in rows and its predict
costs (support vectors × rows × D); 2000 rows give ~100–400 support vectors, which fit in well
under a second and score ~100k windows of D=100 per second."""
SVM_NU = 0.05
"""Upper bound on the fraction of training outliers (and lower bound on support vectors)."""
MEMORY_ROWS = 5000
"""Size of the nearest-neighbour memory bank of ``pca_nn``."""
PCA_VARIANCE = 0.95
"""Fraction of the (standardised) variance the ``pca_nn`` projection keeps ..."""
PCA_MAX_COMPONENTS = 32
"""... with at most this many components."""

_CHUNK_ELEMENTS = 1 << 22  # floats per scoring chunk in score_grid (32 MB as float64)
_HUGE = 1e30  # stands in for non-finite grid values (finite through interpolation in float32)


class WindowModel(Protocol):
    """A density / novelty model on window feature vectors."""

    def score_rows(self, rows: np.ndarray) -> np.ndarray:
        """(n, D) feature rows -> (n,) normality scores (higher = more normal)."""
        ...


# ----------------------------------------------------------------------------- baselines


def _check_rows(rows: np.ndarray, dim: int, what: str) -> np.ndarray:
    """``rows`` as a (n, dim) float64 array, or a ValueError saying what is wrong."""
    a = np.asarray(rows)
    if a.ndim != 2 or a.shape[1] != dim:
        raise ValueError(f"{what}: expected rows of shape (n, {dim}), got {a.shape}")
    a = a.astype(np.float64, copy=False)
    if not np.isfinite(a).all():
        raise ValueError(f"{what}: feature rows contain NaN or infinite values")
    return a


def _subsample(rows: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """At most ``k`` rows drawn without replacement (all of them, in order, if fewer)."""
    if len(rows) <= k:
        return rows
    return rows[np.sort(rng.choice(len(rows), size=k, replace=False))]


class IsolationForestModel:
    """``IsolationForest(random_state=seed)`` with scikit-learn's defaults (100 trees, 256
    rows per tree); score = ``score_samples`` (the negated anomaly score: higher = more
    normal)."""

    def __init__(self, train: np.ndarray, seed: int) -> None:
        self.dim = train.shape[1]
        self.model = IsolationForest(random_state=seed).fit(train)

    def score_rows(self, rows: np.ndarray) -> np.ndarray:
        """(n, D) -> (n,) higher = more normal."""
        return self.model.score_samples(_check_rows(rows, self.dim, "isolation_forest"))


class OneClassSVMModel:
    """Standardise (mean / std of the fitting rows), then ``OneClassSVM(kernel="rbf",
    gamma="scale", nu=SVM_NU)`` on at most :data:`SVM_ROWS` rows; score = ``score_samples``
    (the kernel expansion Σ αᵢ K(svᵢ, x): higher = more normal)."""

    def __init__(self, train: np.ndarray, nu: float = SVM_NU) -> None:
        self.dim = train.shape[1]
        self.scaler = StandardScaler().fit(train)
        self.model = OneClassSVM(kernel="rbf", gamma="scale", nu=nu).fit(
            self.scaler.transform(train)
        )

    def score_rows(self, rows: np.ndarray) -> np.ndarray:
        """(n, D) -> (n,) higher = more normal."""
        x = self.scaler.transform(_check_rows(rows, self.dim, "one_class_svm"))
        return self.model.score_samples(x)


class GaussianModel:
    """One full-covariance Gaussian: mean and Ledoit–Wolf shrunk covariance (well conditioned
    even with D close to or above the number of rows); score = its exact log-density
    ``-(mahalanobis² + log det Σ + D log 2π) / 2``."""

    def __init__(self, train: np.ndarray) -> None:
        self.dim = train.shape[1]
        self.cov = LedoitWolf().fit(train)
        sign, logdet = np.linalg.slogdet(self.cov.covariance_)
        if sign <= 0:
            raise ValueError("gaussian: the shrunk covariance is singular (constant features?)")
        self.log_norm = -0.5 * (logdet + self.dim * math.log(2 * math.pi))

    def score_rows(self, rows: np.ndarray) -> np.ndarray:
        """(n, D) -> (n,) log-density."""
        x = _check_rows(rows, self.dim, "gaussian")
        return self.log_norm - 0.5 * self.cov.mahalanobis(x)


class PCANearestNeighbourModel:
    """Standardise → PCA keeping the fewest components that explain :data:`PCA_VARIANCE` of
    the variance (at most :data:`PCA_MAX_COMPONENTS`) → Euclidean distance to the nearest row
    of a memory bank of at most :data:`MEMORY_ROWS` projected training rows; score = minus
    that distance."""

    def __init__(self, train: np.ndarray, memory: np.ndarray) -> None:
        self.dim = train.shape[1]
        self.scaler = StandardScaler().fit(train)
        z = self.scaler.transform(train)
        pca = PCA(svd_solver="full").fit(z)
        cum = np.cumsum(pca.explained_variance_ratio_)
        k = int(np.searchsorted(cum, PCA_VARIANCE - 1e-12) + 1)
        self.components = min(k, PCA_MAX_COMPONENTS, len(cum))
        self.mean = pca.mean_
        self.basis = pca.components_[: self.components].T  # (D, k)
        self.nn = NearestNeighbors(n_neighbors=1, algorithm="brute").fit(self._project(memory))

    def _project(self, rows: np.ndarray) -> np.ndarray:
        return (self.scaler.transform(rows) - self.mean) @ self.basis

    def score_rows(self, rows: np.ndarray) -> np.ndarray:
        """(n, D) -> (n,) minus the distance to the nearest memory row."""
        x = _check_rows(rows, self.dim, "pca_nn")
        dist, _ = self.nn.kneighbors(self._project(x), n_neighbors=1)
        return -dist[:, 0]


def fit_baselines(
    train_rows: np.ndarray, *, seed: int = 0, max_rows: int = 20000
) -> dict[str, WindowModel]:
    """Fit the four baselines of :data:`BASELINES` on (n, D) training window features.

    Each model sees its own random subsample (drawn with ``numpy.random.default_rng(seed)``):
    isolation_forest and gaussian ≤ ``max_rows`` rows; one_class_svm ≤ ``min(max_rows,
    SVM_ROWS)``; pca_nn fits scaler and PCA on ≤ ``max_rows`` and keeps ≤ ``min(max_rows,
    MEMORY_ROWS)`` of those as its memory bank. Same rows and seed give the same models.
    """
    a = np.asarray(train_rows)
    if a.ndim != 2:
        raise ValueError(f"train_rows must be 2-D (rows, features), got shape {a.shape}")
    n, d = a.shape
    if d < 1:
        raise ValueError("train_rows has no feature columns")
    if n < MIN_TRAIN_ROWS:
        raise ValueError(f"need at least {MIN_TRAIN_ROWS} training rows to fit baselines, got {n}")
    if max_rows < MIN_TRAIN_ROWS:
        raise ValueError(f"max_rows must be at least {MIN_TRAIN_ROWS}, got {max_rows}")
    a = a.astype(np.float64, copy=False)
    if not np.isfinite(a).all():
        raise ValueError("train_rows contain NaN or infinite values")
    rng = np.random.default_rng(seed)
    rows = _subsample(a, max_rows, rng)
    memory = _subsample(rows, min(max_rows, MEMORY_ROWS), rng)
    return {
        "isolation_forest": IsolationForestModel(rows, seed),
        "one_class_svm": OneClassSVMModel(_subsample(a, min(max_rows, SVM_ROWS), rng)),
        "gaussian": GaussianModel(rows),
        "pca_nn": PCANearestNeighbourModel(rows, memory),
    }


# ----------------------------------------------------------------------------- grids


def _host(x: np.ndarray | torch.Tensor) -> np.ndarray:
    """A torch tensor (any device) or array-like as a numpy array."""
    if isinstance(x, torch.Tensor):
        return x.detach().float().cpu().numpy()
    return np.asarray(x)


def score_grid(
    model: WindowModel, feats: np.ndarray | torch.Tensor, *, chunk_rows: int | None = None
) -> np.ndarray:
    """(N, D, gh, gw) features -> (N, gh, gw) float32 normality grid (higher = more normal).

    Rows (one per window, in row-major cell order) go to ``model.score_rows`` in chunks of
    ``chunk_rows`` (default: about 4 M floats, e.g. 11k rows of D=363), so at most one chunk's
    (or one image's) rows are copied at a time."""
    f = _host(feats)
    if f.ndim != 4:
        raise ValueError(f"features must be (N, D, gh, gw), got shape {f.shape}")
    n, d, gh, gw = f.shape
    cells = gh * gw
    step = chunk_rows or max(1, _CHUNK_ELEMENTS // max(d, 1))
    out = np.empty((n, cells), np.float32)
    per_block = max(1, step // max(cells, 1))
    for a in range(0, n, per_block):
        b = min(n, a + per_block)
        rows = np.ascontiguousarray(np.moveaxis(f[a:b], 1, -1)).reshape(-1, d)
        scores = np.empty(len(rows), np.float32)
        for s in range(0, len(rows), step):
            chunk = rows[s : s + step]
            got = np.asarray(model.score_rows(chunk)).reshape(-1)
            if got.shape[0] != chunk.shape[0]:
                raise ValueError(
                    f"score_rows returned {got.shape[0]} scores for {chunk.shape[0]} rows"
                )
            scores[s : s + step] = got
        out[a:b] = scores.reshape(b - a, cells)
    return out.reshape(n, gh, gw)


# ----------------------------------------------------------------------------- metrics


def image_auroc(scores: np.ndarray, labels: np.ndarray) -> float | None:
    """ROC AUC of image anomaly scores (higher = more anomalous) against labels (1 =
    anomalous); None when only one class is present."""
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    y = np.asarray(labels).reshape(-1)
    if s.shape != y.shape:
        raise ValueError(f"{s.shape[0]} scores but {y.shape[0]} labels")
    if not np.isin(y, (0, 1)).all():
        raise ValueError("labels must be 0 (normal) or 1 (anomalous)")
    if not np.isfinite(s).all():
        raise ValueError("image scores contain NaN or infinite values")
    if len(np.unique(y)) < 2:
        return None
    return float(roc_auc_score(y, s))


class PixelAUROC:
    """Streaming pixel ROC AUC: anomalous (mask) pixels against normal pixels, in fixed memory.

    Each anomaly score x is mapped to t = asinh((x - c) / s) and counted, per class, into
    ``bins`` equal bins over t ∈ [-T, T] (T = 40, i.e. |x - c| up to ~10¹⁷·s; values beyond,
    ±inf included, are clamped into the end bins). ``c`` and ``s`` (median and interquartile
    range) are fixed by the first :meth:`add`. The transform is strictly increasing, so ROC
    AUC is unchanged by it; the bins are linear in x within ~±s of c (bin width 0.0012·s with
    the default 65536 bins) and relative further out (≈0.12 % of |x - c|), so unbounded
    log-likelihood tails cost no resolution in the bulk.

    The AUROC from the histogram counts a positive and a negative pixel in the same bin as half
    a correct pair; only such pairs can be wrong, so the error is at most
    ``error_bound() = ½·Σ_b pos_b·neg_b / (P·N)`` (reported, typically ≪ 1e-3).
    """

    T = 40.0

    def __init__(self, bins: int = 1 << 16) -> None:
        if bins < 16:
            raise ValueError(f"bins must be at least 16, got {bins}")
        self.bins = bins
        self.pos = np.zeros(bins, np.int64)
        self.neg = np.zeros(bins, np.int64)
        self.center: float | None = None
        self.scale: float | None = None

    def _calibrate(self, x: np.ndarray) -> None:
        finite = x[np.isfinite(x)]
        if finite.size == 0:
            self.center, self.scale = 0.0, 1.0
            return
        q25, q50, q75 = np.quantile(finite, (0.25, 0.5, 0.75))
        spread = float(q75 - q25)
        if not spread > 0:
            spread = float(finite.std())
        self.center = float(q50)
        self.scale = max(spread, abs(self.center) * 1e-6, 1e-12)

    def _bin(self, x: np.ndarray) -> np.ndarray:
        assert self.center is not None and self.scale is not None
        with np.errstate(over="ignore", invalid="ignore"):
            t = np.arcsinh((x - self.center) / self.scale)
        t = np.clip(t, -self.T, self.T)
        idx = ((t + self.T) * (self.bins / (2 * self.T))).astype(np.int64)
        return np.minimum(idx, self.bins - 1)

    def add(self, anomaly_map: np.ndarray | torch.Tensor, mask: np.ndarray | None) -> None:
        """Count the pixels of one (H, W) anomaly map (higher = more anomalous); ``mask`` (H, W)
        is True / non-zero at anomalous pixels, None for an all-normal image."""
        x = _host(anomaly_map).astype(np.float64, copy=False)
        if x.ndim != 2:
            raise ValueError(f"anomaly map must be (H, W), got shape {x.shape}")
        if np.isnan(x).any():
            raise ValueError("anomaly map contains NaN")
        if mask is not None:
            m = np.asarray(mask)
            if m.shape != x.shape:
                raise ValueError(f"mask shape {m.shape} differs from the map's {x.shape}")
            m = m.astype(bool, copy=False)
        if x.size == 0:
            return
        if self.center is None:
            self._calibrate(x)
        idx = self._bin(x.reshape(-1))
        if mask is None:
            self.neg += np.bincount(idx, minlength=self.bins)
            return
        flat = m.reshape(-1)
        self.pos += np.bincount(idx[flat], minlength=self.bins)
        self.neg += np.bincount(idx[~flat], minlength=self.bins)

    @property
    def positives(self) -> int:
        """Anomalous pixels counted."""
        return int(self.pos.sum())

    @property
    def negatives(self) -> int:
        """Normal pixels counted."""
        return int(self.neg.sum())

    def value(self) -> float | None:
        """ROC AUC (ties within a bin count one half); None unless both classes were seen."""
        p, n = self.positives, self.negatives
        if p == 0 or n == 0:
            return None
        pos = self.pos.astype(np.float64)
        above = np.cumsum(pos[::-1])[::-1] - pos  # positives in strictly higher bins
        wins = float(np.dot(self.neg.astype(np.float64), above + 0.5 * pos))
        return wins / (float(p) * float(n))

    def error_bound(self) -> float | None:
        """Largest possible |value() - exact AUROC|: half the fraction of (positive, negative)
        pairs that share a bin."""
        p, n = self.positives, self.negatives
        if p == 0 or n == 0:
            return None
        same = float(np.dot(self.pos.astype(np.float64), self.neg.astype(np.float64)))
        return 0.5 * same / (float(p) * float(n))

    def curve(self) -> tuple[np.ndarray, np.ndarray]:
        """(fpr, tpr), from (0, 0) to (1, 1), one point per occupied bin from the highest
        threshold down; empty arrays unless both classes were seen."""
        p, n = self.positives, self.negatives
        if p == 0 or n == 0:
            return np.zeros(0), np.zeros(0)
        keep = (self.pos + self.neg)[::-1] > 0
        tpr = np.cumsum(self.pos[::-1])[keep] / p
        fpr = np.cumsum(self.neg[::-1])[keep] / n
        return np.concatenate([[0.0], fpr]), np.concatenate([[0.0], tpr])


# ----------------------------------------------------------------------------- results


@dataclass
class MethodResult:
    """One method's results: AUROCs (None where undefined), ROC curves as (fpr, tpr) (None
    where undefined), the image anomaly scores in :meth:`Evaluator.add` order, and the bound
    on the pixel AUROC's binning error."""

    name: str
    image_auroc: float | None
    pixel_auroc: float | None
    image_roc: tuple[np.ndarray, np.ndarray] | None = None
    pixel_roc: tuple[np.ndarray, np.ndarray] | None = None
    image_scores: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    pixel_error_bound: float | None = None


@dataclass
class EvaluationResult:
    """Per-method results (keyed by :data:`METHODS`) and the image counts."""

    methods: dict[str, MethodResult]
    images: int
    anomalous: int
    labels: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    by_statistic: dict[str, float | None] = field(default_factory=dict)
    statistic: str = LEGACY_IMAGE_SCORE.statistic

    def as_json(
        self, model_uri: str, images: int | None = None, anomalous: int | None = None
    ) -> dict[str, Any]:
        """DESIGN.md's evaluation object: ``model_uri``, ``images``, ``anomalous``,
        ``image_auroc`` and ``pixel_auroc`` (each keyed by the five :data:`METHODS`; None,
        i.e. JSON null, where undefined). ``images`` / ``anomalous`` default to the counts
        seen by the evaluator."""

        def per(attr: str) -> dict[str, float | None]:
            out: dict[str, float | None] = {}
            for m in METHODS:
                r = self.methods.get(m)
                v = None if r is None else getattr(r, attr)
                out[m] = None if v is None else float(v)
            return out

        return {
            "model_uri": str(model_uri),
            "images": int(self.images if images is None else images),
            "anomalous": int(self.anomalous if anomalous is None else anomalous),
            "image_auroc": per("image_auroc"),
            "pixel_auroc": per("pixel_auroc"),
            "image_statistic": self.statistic,
            "image_auroc_by_statistic": dict(self.by_statistic),
        }

    def curves(self, kind: str = "image") -> dict[str, tuple[np.ndarray, np.ndarray, float | None]]:
        """``{method: (fpr, tpr, auroc)}`` of the ``"image"`` or ``"pixel"`` ROC curves, for
        methods where the curve is defined (input of ``pipelines.plots.save_roc_curves``)."""
        if kind not in ("image", "pixel"):
            raise ValueError(f"kind must be 'image' or 'pixel', got {kind!r}")
        out: dict[str, tuple[np.ndarray, np.ndarray, float | None]] = {}
        for m in METHODS:
            r = self.methods.get(m)
            if r is None:
                continue
            roc = r.image_roc if kind == "image" else r.pixel_roc
            auc = r.image_auroc if kind == "image" else r.pixel_auroc
            if roc is not None:
                out[m] = (roc[0], roc[1], auc)
        return out


def _statistics(grid: np.ndarray, geometry: Geometry, image_score: ImageScore) -> dict[str, Any]:
    """(N, gh, gw) normality grid -> every candidate image statistic, each (N,) float64."""
    g = torch.from_numpy(np.ascontiguousarray(grid, dtype=np.float32))
    st = image_statistics(g, geometry, image_score)
    return {k: v.numpy().astype(np.float64) for k, v in st.items()}


def _per_image(values: int | Sequence[int], n: int, what: str) -> list[int]:
    if isinstance(values, int | np.integer):
        return [int(values)] * n
    out = [int(v) for v in values]
    if len(out) != n:
        raise ValueError(f"{what}: {len(out)} values for {n} images")
    return out


class Evaluator:
    """Accumulates image scores and pixel AUROC for the flow and the baselines, batch by batch::

        ev = Evaluator(fit_baselines(train_rows), scorer.geometry)
        for batch in batches:
            ev.add(flow_grid, feats, labels, masks, heights, widths)
        result = ev.result()

    Baselines missing from ``baselines`` report None. ``pixels=False`` skips the pixel maps
    (pixel AUROC None), e.g. when the archive is known to have no masks. Non-finite grid
    values (a flow's -inf log-likelihood, or NaN) are treated as ∓1e30, i.e. NaN as least
    normal, so one broken window cannot stop an evaluation. Memory: the image scores plus one
    :class:`PixelAUROC` (≈1 MB) per method.
    """

    def __init__(
        self,
        baselines: Mapping[str, WindowModel],
        geometry: Geometry,
        *,
        pixels: bool = True,
        pixel_bins: int = 1 << 16,
        image_score: ImageScore = LEGACY_IMAGE_SCORE,
        calibration: Calibration | None = None,
        global_score: GlobalScore | None = None,
    ) -> None:
        unknown = set(baselines) - set(BASELINES)
        if unknown:
            raise ValueError(f"unknown baselines {sorted(unknown)}; expected some of {BASELINES}")
        self.baselines = dict(baselines)
        self.geometry = geometry
        self.pixels = pixels
        self.methods = ("flow", *(m for m in BASELINES if m in self.baselines))
        self.pixel = {m: PixelAUROC(pixel_bins) for m in self.methods}
        self._scores: dict[str, list[np.ndarray]] = {m: [] for m in self.methods}
        self._flow_stats: dict[str, list[np.ndarray]] = {s: [] for s in STATISTICS}
        self._labels: list[int] = []
        self.image_score = image_score
        self.calibration = calibration
        self.global_score = global_score
        self._global: list[np.ndarray] = []

    def add(
        self,
        flow_grid: np.ndarray | torch.Tensor,
        feats: np.ndarray | torch.Tensor,
        labels: Sequence[int],
        masks: Sequence[np.ndarray | None],
        heights: int | Sequence[int],
        widths: int | Sequence[int],
        groups: Sequence[str | None] | None = None,
        global_distance: np.ndarray | None = None,
    ) -> None:
        """One batch of N images: the flow's (N, gh, gw) log-likelihood grid, the (N, D, gh, gw)
        features it came from (scored by every baseline), labels (0 normal / 1 anomalous),
        (H, W) boolean masks or None, each image's full-resolution height and width, (with a
        calibration) each image's value of the calibration column and (with a global score)
        each image's global distance, which the flow's score joins as in the tables."""
        g = _host(flow_grid).astype(np.float32, copy=False)
        if g.ndim != 3:
            raise ValueError(f"flow grid must be (N, gh, gw), got shape {g.shape}")
        n = g.shape[0]
        y = [int(v) for v in labels]
        if len(y) != n or len(masks) != n:
            raise ValueError(f"{n} grids but {len(y)} labels and {len(masks)} masks")
        if any(v not in (0, 1) for v in y):
            raise ValueError("labels must be 0 (normal) or 1 (anomalous)")
        hs = _per_image(heights, n, "heights")
        ws = _per_image(widths, n, "widths")
        grids = {"flow": g}
        if len(self.methods) > 1:
            f = _host(feats)
            if f.ndim != 4 or f.shape[0] != n or f.shape[2:] != g.shape[1:]:
                raise ValueError(
                    f"features of shape {f.shape} do not match the flow grid's {g.shape}"
                )
            for m in self.methods[1:]:
                grids[m] = score_grid(self.baselines[m], f)
        stat = self.image_score.statistic
        for m, grid in grids.items():
            grids[m] = np.nan_to_num(grid, nan=-_HUGE, posinf=_HUGE, neginf=-_HUGE)
            st = _statistics(grids[m], self.geometry, self.image_score)
            score = st[stat]
            if m == "flow":
                for k, v in st.items():
                    self._flow_stats[k].append(v)
                # a two-sided score's centre and spread were fitted on the flow's held-out
                # images: the flow's own score uses them, the baselines' stay one-sided
                score = self.image_score.apply(torch.from_numpy(score)).numpy()
                if self.global_score is not None:
                    if global_distance is None or len(global_distance) != n:
                        raise ValueError("a model with a global score needs each image's distance")
                    dist = np.asarray(global_distance, np.float64)
                    self._global.append(dist)
                    score = self.global_score.combine(score, dist)
                cal = self.calibration
                if cal is not None and groups is not None:
                    off = [cal.offsets.get(g, 0.0) if g is not None else 0.0 for g in groups]
                    score = score - np.asarray(off, np.float64)
            self._scores[m].append(score)
        self._labels.extend(y)
        if not self.pixels:
            return
        for i in range(n):
            mask = masks[i]
            if y[i] == 1 and mask is None:
                continue  # anomalous, location unknown: no pixel ground truth
            for m, grid in grids.items():
                amap = -heatmap_to_image(grid[i], self.geometry, hs[i], ws[i]).numpy()
                self.pixel[m].add(amap, mask)

    def result(self) -> EvaluationResult:
        """AUROCs and ROC curves so far."""
        labels = np.asarray(self._labels, np.int64)
        both = len(np.unique(labels)) == 2
        out: dict[str, MethodResult] = {}
        for m in METHODS:
            if m not in self._scores:
                out[m] = MethodResult(m, None, None)
                continue
            parts = self._scores[m]
            scores = np.concatenate(parts) if parts else np.zeros(0)
            img_roc = None
            if both:
                fpr, tpr, _ = roc_curve(labels, scores)
                img_roc = (fpr, tpr)
            px = self.pixel[m]
            pfpr, ptpr = px.curve()
            out[m] = MethodResult(
                name=m,
                image_auroc=image_auroc(scores, labels) if both else None,
                pixel_auroc=px.value(),
                image_roc=img_roc,
                pixel_roc=(pfpr, ptpr) if pfpr.size else None,
                image_scores=scores,
                pixel_error_bound=px.error_bound(),
            )
        by_statistic: dict[str, float | None] = {}
        for k, parts in self._flow_stats.items():
            v = np.concatenate(parts) if parts else np.zeros(0)
            by_statistic[k] = image_auroc(v, labels) if both else None
        if self._global:  # the global distance alone, beside the tail statistics
            v = np.concatenate(self._global)
            by_statistic["global_distance"] = image_auroc(v, labels) if both else None
        return EvaluationResult(
            methods=out,
            images=len(labels),
            anomalous=int(labels.sum()) if labels.size else 0,
            labels=labels,
            by_statistic=by_statistic,
            statistic=self.image_score.statistic,
        )


def format_table(result: EvaluationResult) -> str:
    """Plain-text table: one row per method, image and pixel AUROC to 3 decimals, "—" where
    undefined."""

    def cell(v: float | None) -> str:
        return "—" if v is None else f"{v:.3f}"

    header = ("method", "image AUROC", "pixel AUROC")
    rows = []
    for m in METHODS:
        r = result.methods.get(m)
        rows.append(
            (
                m,
                cell(None if r is None else r.image_auroc),
                cell(None if r is None else r.pixel_auroc),
            )
        )
    widths = [max(len(header[c]), *(len(r[c]) for r in rows)) for c in range(3)]
    lines = [
        f"{header[0]:<{widths[0]}}  {header[1]:>{widths[1]}}  {header[2]:>{widths[2]}}",
        "  ".join("-" * w for w in widths),
    ]
    lines += [f"{a:<{widths[0]}}  {b:>{widths[1]}}  {c:>{widths[2]}}" for a, b, c in rows]
    lines.append(f"{result.images} images, {result.anomalous} anomalous")
    if result.by_statistic:
        lines.append(
            f"flow image AUROC by image statistic (the model scores {result.statistic}): "
            + ", ".join(f"{k} {cell(v)}" for k, v in result.by_statistic.items())
        )
    return "\n".join(lines)
