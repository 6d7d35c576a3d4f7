"""A scorer = featurizer + flow: RGB images -> log-likelihood grid -> per-image summary.

Summary (DESIGN.md): mean, std (population), min, max and the percentiles p01 … p99 of the
window log-likelihoods of an image (linear interpolation between order statistics, as
numpy's default); ``quality = (p25 + p50) / 2`` (lower = worse); ``anomaly_score`` (higher =
more anomalous) is the model's :class:`ImageScore`, a tail statistic of the grid chosen at
training (default: minus the mean of the k lowest windows, k from the geometry; bundles from
before it score ``-p05``), or, for a model with a global score (:mod:`flowcore.globalscore`),
the larger of that statistic and the image's global distance, each standardised on normal
images; ``is_anomaly = anomaly_score > threshold``, the threshold being a
high quantile of ``anomaly_score`` over held-out normal images, stored with the model, and
optionally one per value of a path column (:class:`Calibration`), with the global one as the
fallback.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from torch import Tensor, nn

from .cnn import CNNFeaturizer
from .distill import DistilledFeaturizer
from .encoder import EncoderFeaturizer
from .flows import Flow, FlowConfig, MAFConfig
from .globalscore import GlobalScore
from .multiscale import MultiScaleFeaturizer
from .windows import Geometry, WindowFeaturizer, to_tensor

__all__ = [
    "PERCENTILES",
    "SUMMARY_COLUMNS",
    "STATISTICS",
    "PRECISIONS",
    "TRANSFORMS",
    "resolve_precision",
    "ImageScore",
    "Calibration",
    "image_statistics",
    "windows_covering",
    "Geometry",
    "Featurizer",
    "FeaturizerModule",
    "Scorer",
    "ScoredBatch",
    "summarize",
    "heatmap_to_image",
]

PERCENTILES: tuple[int, ...] = (1, 5, 10, 25, 50, 75, 90, 95, 99)
SUMMARY_COLUMNS: tuple[str, ...] = (
    "ll_mean",
    "ll_std",
    "ll_min",
    "ll_max",
    *(f"p{p:02d}" for p in PERCENTILES),
    "quality",
    "anomaly_score",
)


class Featurizer(Protocol):
    """The featurizer slot: (N, 3, H, W) in [0, 1] -> (N, D, gh, gw)."""

    def __call__(self, x: Tensor) -> Tensor: ...

    @property
    def geometry(self) -> Geometry: ...


FeaturizerModule = (
    WindowFeaturizer
    | CNNFeaturizer
    | MultiScaleFeaturizer
    | EncoderFeaturizer
    | DistilledFeaturizer
)
"""The featurizers a :class:`Scorer` (and a bundle) can hold; each has ``cfg``, ``geometry``
and a ``mean`` buffer (which gives the device). A :class:`DistilledFeaturizer` predicts the
log-likelihood grid itself: its scorer has no flow (``flow=None``)."""


@dataclass
class ScoredBatch:
    """Scores of N images: ``grid`` (N, gh, gw) float32 log-likelihoods, ``summary`` column ->
    (N,) float32 array, ``is_anomaly`` (N,) bool."""

    grid: np.ndarray
    summary: dict[str, np.ndarray]
    is_anomaly: np.ndarray
    threshold_source: list[str] | None = None


CPU_CHUNK_ROWS = 4096
"""Rows per flow call on a CPU (the activations of a chunk stay in cache)."""
GPU_MAX_CHUNK_ROWS = 1 << 20
"""Most rows per flow call on a GPU."""


def _hidden_widths(cfg: FlowConfig, d: int) -> list[int]:
    """The hidden layer widths of a flow config on d features (for sizing chunks)."""
    if hasattr(cfg, "hidden_factor"):
        return [int(cfg.hidden_factor) * d]
    hidden = getattr(cfg, "hidden", ())
    return [hidden] if isinstance(hidden, int) else list(hidden or ())


TRANSFORMS: tuple[str, ...] = (
    "identity",
    "hflip",
    "vflip",
    "rot180",
    "brighter",
    "darker",
    "rot90",
    "rot270",
)
"""Test-time transforms (DifferNet), in the order ``Scorer.transforms = N`` takes the first N
of: flips and turns are undone on the grid before averaging; brighter / darker scale the
pixel values by 1.04 / 0.96."""


def _transform(name: str, x: Tensor) -> Tensor:
    """A test-time transform of (N, H, W, 3) uint8 images."""
    if name == "hflip":
        return x.flip(2)
    if name == "vflip":
        return x.flip(1)
    if name == "rot180":
        return x.flip(1, 2)
    if name in ("brighter", "darker"):
        gain = 1.04 if name == "brighter" else 0.96
        return (x.float() * gain).round_().clamp_(0, 255).to(torch.uint8)
    if name == "rot90":
        return x.rot90(1, (1, 2))
    if name == "rot270":
        return x.rot90(-1, (1, 2))
    return x


def _untransform(name: str, grid: Tensor) -> Tensor:
    """A (N, gh, gw) grid of transformed images back in the original images' layout (cells
    align within a stride: a flipped sweep starts at the other edge)."""
    if name == "hflip":
        return grid.flip(2)
    if name == "vflip":
        return grid.flip(1)
    if name == "rot180":
        return grid.flip(1, 2)
    if name == "rot90":
        return grid.rot90(-1, (1, 2))
    if name == "rot270":
        return grid.rot90(1, (1, 2))
    return grid


PRECISIONS: tuple[str, ...] = ("fp32", "bf16")
"""Arithmetic of the featurizer (:meth:`Scorer.set_precision`)."""


def resolve_precision(
    precision: str,
    device: str | torch.device = "cpu",
    validated: Sequence[str] = ("fp32",),
    *,
    bf16_units: bool | None = None,
) -> str:
    """``fp32``/``bf16`` as given; ``auto``: bf16 where the model was validated in bf16 at
    training (``validated``, :attr:`Scorer.validated_precisions`) and the device multiplies
    bf16 in hardware (``bf16_units``; ``None``: :func:`flowcore.precision.has_bf16_units`),
    else fp32. A model that missed the accuracy gates in bf16 scores in fp32 under ``auto``
    (on this project's CPU the grain-full window model moved the 99th percentile of window
    log-likelihoods by 0.6 nats, past the 0.5 gate; the README's Speed section)."""
    if precision in PRECISIONS:
        return precision
    if precision != "auto":
        raise ValueError(f"precision must be fp32, bf16 or auto, not {precision!r}")
    if "bf16" not in validated:
        return "fp32"
    if bf16_units is None:
        from .precision import has_bf16_units

        bf16_units = has_bf16_units(device)
    return "bf16" if bf16_units else "fp32"


STATISTICS: tuple[str, ...] = (
    "neg_mean_k_lowest",
    "neg_p05",
    "neg_p01",
    "neg_min",
    "p50_minus_p01",
)
"""Candidate image statistics of a window log-likelihood grid (higher = more anomalous)."""


def windows_covering(fraction: float, gh: int, gw: int, geometry: Geometry) -> int:
    """How many windows of a (gh, gw) grid a square defect covering ``fraction`` of the image
    lies inside of, at least 1: with side ``a`` = √(fraction · area) pixels of the (resized)
    image, a window of width w at stride s contains it at ``⌊(w - a)/s⌋ + 1`` offsets per
    axis (1 when a ≥ w). These are the windows whose log-likelihood such a defect lowers most,
    so the mean of that many lowest windows is moved by the whole of one small defect."""
    s, w = geometry.stride, geometry.window
    h_px = (gh - 1) * s + w  # the part of the resized image the grid covers
    w_px = (gw - 1) * s + w
    side = math.sqrt(max(fraction, 0.0) * h_px * w_px)
    per_axis = max(1, int((w - side) // s) + 1) if side < w else 1
    return max(1, min(gh * gw, per_axis * per_axis))


@dataclass(frozen=True)
class ImageScore:
    """The image statistic behind ``anomaly_score`` (higher = more anomalous):

    - ``neg_mean_k_lowest``: minus the mean of the k lowest window log-likelihoods; ``k`` fixed,
      or (``k=None``) :func:`windows_covering` of ``defect_fraction`` of the image;
    - ``neg_p05``, ``neg_p01``: minus a low percentile; ``neg_min``: minus the lowest window;
    - ``p50_minus_p01``: how far the tail lies below the image's own median."""

    statistic: str = "neg_mean_k_lowest"
    k: int | None = None
    defect_fraction: float = 0.001
    two_sided: bool = False
    centre: float | None = None
    spread: float | None = None

    def __post_init__(self) -> None:
        if self.statistic not in STATISTICS:
            raise ValueError(f"image statistic must be one of {STATISTICS}, got {self.statistic!r}")
        if self.k is not None and not 1 <= self.k <= 1_000_000:
            raise ValueError(f"image score k must be in [1, 1000000], got {self.k}")
        if not 0 < self.defect_fraction < 1:
            raise ValueError(f"defect_fraction must be in (0, 1), got {self.defect_fraction}")
        for name in ("centre", "spread"):
            v = getattr(self, name)
            if v is not None and not math.isfinite(v):
                raise ValueError(f"image score {name} must be finite, got {v}")
        if self.spread is not None and self.spread <= 0:
            raise ValueError(f"image score spread must be > 0, got {self.spread}")

    def apply(self, raw: Tensor) -> Tensor:
        """The statistic's raw values -> anomaly scores: unchanged, or for a two-sided
        (typicality) score ``|raw - centre| / spread``, so an image whose windows are all
        *more* likely than normal images' (less contrast, a flattened texture) is as
        atypical as one with a low tail. Before :func:`flowcore.fit.calibrate` has set the
        centre and spread of held-out normal images, two-sided scores are the raw ones."""
        if not self.two_sided or self.centre is None or self.spread is None:
            return raw
        return (raw - self.centre).abs() / self.spread

    def k_for(self, gh: int, gw: int, geometry: Geometry) -> int:
        """k for a (gh, gw) grid."""
        if self.k is not None:
            return min(self.k, gh * gw)
        return windows_covering(self.defect_fraction, gh, gw, geometry)

    def as_dict(self) -> dict[str, object]:
        return {
            "statistic": self.statistic,
            "k": self.k,
            "defect_fraction": self.defect_fraction,
            "two_sided": self.two_sided,
            "centre": self.centre,
            "spread": self.spread,
        }


LEGACY_IMAGE_SCORE = ImageScore("neg_p05")
"""What bundles written before the image statistic was stored score with."""


def _statistic(
    name: str, flat: Tensor, p01: Tensor, p05: Tensor, p50: Tensor, k: int | None
) -> Tensor:
    """One of :data:`STATISTICS` of (N, cells) log-likelihoods, from their percentiles and,
    for ``neg_mean_k_lowest``, k."""
    if name == "neg_mean_k_lowest":
        if k is None:
            raise ValueError("neg_mean_k_lowest needs the grid's geometry (for k)")
        return -flat.topk(k, dim=1, largest=False).values.mean(dim=1)
    if name == "neg_p05":
        return -p05
    if name == "neg_p01":
        return -p01
    if name == "neg_min":
        return -flat.amin(dim=1)
    return p50 - p01  # p50_minus_p01


def image_statistics(
    grid: Tensor, geometry: Geometry, image_score: ImageScore
) -> dict[str, Tensor]:
    """Every candidate of :data:`STATISTICS` for a (N, gh, gw) grid (``neg_mean_k_lowest``
    with ``image_score``'s k); each (N,), higher = more anomalous."""
    n, gh, gw = grid.shape
    flat = grid.reshape(n, -1).float()
    q = torch.tensor([0.01, 0.05, 0.5], dtype=flat.dtype, device=flat.device)
    p01, p05, p50 = torch.quantile(flat, q, dim=1)
    k = image_score.k_for(gh, gw, geometry)
    return {name: _statistic(name, flat, p01, p05, p50, k) for name in STATISTICS}


def summarize(
    grid: Tensor, geometry: Geometry | None = None, image_score: ImageScore | None = None
) -> dict[str, Tensor]:
    """Per-image summary of a (N, gh, gw) log-likelihood grid; each value (N,).
    ``anomaly_score`` is ``image_score``'s statistic (default, and without a geometry:
    ``-p05``, as bundles from before the choice existed)."""
    flat = grid.reshape(grid.shape[0], -1).float()
    q = torch.tensor([p / 100.0 for p in PERCENTILES], dtype=flat.dtype, device=flat.device)
    pct = torch.quantile(flat, q, dim=1)  # (9, N)
    out = {
        "ll_mean": flat.mean(dim=1),
        "ll_std": flat.std(dim=1, correction=0),
        "ll_min": flat.amin(dim=1),
        "ll_max": flat.amax(dim=1),
    }
    for p, row in zip(PERCENTILES, pct, strict=True):
        out[f"p{p:02d}"] = row
    out["quality"] = (out["p25"] + out["p50"]) / 2
    score = image_score or LEGACY_IMAGE_SCORE
    k = None if geometry is None else score.k_for(grid.shape[1], grid.shape[2], geometry)
    raw = _statistic(score.statistic, flat, out["p01"], out["p05"], out["p50"], k)
    out["anomaly_score"] = score.apply(raw)
    return out


@dataclass(frozen=True)
class Calibration:
    """Per-group calibration by a path column (``by``, e.g. ``camera``): for each value seen
    among the held-out normal images, a threshold on ``anomaly_score`` and an ``offset``
    subtracted from it first (the group's median held-out score minus the global median, so
    that scores of cameras with different baselines rank on one scale). A value without an
    entry uses no offset and the global threshold."""

    by: str
    thresholds: dict[str, float]
    offsets: dict[str, float]

    def __post_init__(self) -> None:
        if not self.by:
            raise ValueError("calibration needs a column name")
        for what, d in (("thresholds", self.thresholds), ("offsets", self.offsets)):
            for k, v in d.items():
                if not isinstance(k, str) or not math.isfinite(float(v)):
                    raise ValueError(f"calibration {what}[{k!r}] must be a finite number")

    def as_dict(self) -> dict[str, object]:
        return {"by": self.by, "thresholds": self.thresholds, "offsets": self.offsets}


class Scorer(nn.Module):
    """Featurizer + flow, with the threshold and heatmap clip range learnt at training."""

    def __init__(
        self,
        featurizer: FeaturizerModule,
        flow: Flow | None,
        *,
        flow_config: FlowConfig | None = None,
        threshold: float = math.inf,
        heatmap_clip: tuple[float, float] | None = None,
        image_score: ImageScore | None = None,
        calibration: Calibration | None = None,
        chunk_rows: int | None = None,
    ) -> None:
        super().__init__()
        self.featurizer: FeaturizerModule = featurizer
        self.flow = flow
        self.threshold = float(threshold)
        self.heatmap_clip = heatmap_clip
        self.image_score = image_score or ImageScore()
        self.calibration = calibration
        # rows per flow call; None: by device (CPU_CHUNK_ROWS, or from a GPU's free memory)
        self.chunk_rows = chunk_rows
        self._staging: tuple[Tensor, torch.cuda.Event | None] | None = None
        self.precision = "fp32"  # set_precision
        # the precisions this model passed the accuracy gates in (flowcore.precision), stored
        # in the bundle; "auto" picks bf16 only where it is listed
        self.validated_precisions: tuple[str, ...] = ("fp32",)
        # the flow's config: given, else the one build_flow recorded on the flow
        built = getattr(flow, "config", None)
        self.flow_config: FlowConfig = flow_config or (
            built if isinstance(built, FlowConfig) else MAFConfig()
        )
        # test-time transforms averaged per window (the first N of TRANSFORMS); stored in
        # the bundle: the threshold was calibrated with them
        self.transforms = 1
        self.training_stats: dict[str, object] = {}
        # optional: the image-level score of changes over the whole image, joined with the
        # tail statistic in anomaly_score (flowcore.globalscore); its tensors are in the bundle
        self.global_score: GlobalScore | None = None

    @property
    def geometry(self) -> Geometry:
        return self.featurizer.geometry

    @property
    def device(self) -> torch.device:
        return self.featurizer.mean.device

    def features(self, images: np.ndarray | Tensor | Sequence[np.ndarray]) -> Tensor:
        """(N, H, W, 3) uint8 -> (N, D, gh, gw) feature grid."""
        return self.featurizer(self._upload(images))

    def _upload(self, images: np.ndarray | Tensor | Sequence[np.ndarray]) -> Tensor:
        """Images -> (N, 3, H, W) float in [0, 1] on the device. To a GPU, the uint8 pixels go
        through a reused page-locked staging buffer and an asynchronous copy: measured on an
        H200, 64 images of 460×640 upload in 1.0 ms from page-locked memory against 18 ms
        from ordinary memory (the README's GPU section)."""
        dev = self.device
        if dev.type != "cuda" or isinstance(images, Tensor):
            return to_tensor(images, dev)
        host = np.ascontiguousarray(
            np.stack(list(images)) if not isinstance(images, np.ndarray) else images
        )
        if host.ndim != 4 or host.shape[-1] != 3 or host.dtype != np.uint8:
            return to_tensor(host, dev)
        if self._staging is None or self._staging[0].numel() < host.size:
            self._staging = (torch.empty(host.size, dtype=torch.uint8).pin_memory(), None)
        buf, done = self._staging
        if done is not None:
            done.synchronize()  # the previous copy out of the buffer has finished
        view = buf[: host.size].view(host.shape)
        view.numpy()[...] = host
        on_device = view.to(dev, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self._staging = (buf, event)
        return to_tensor(on_device, dev)

    def flow_chunk_rows(self) -> int:
        """Rows per flow call: ``chunk_rows`` when set; on a CPU :data:`CPU_CHUNK_ROWS` (cache
        sized); on a GPU as many as a quarter of its free memory holds (measured on an H200:
        grain-full 460 images/s at 4,096 rows a call, 1,890 at 1 M; launch overhead)."""
        if self.chunk_rows:
            return self.chunk_rows
        dev = self.device
        if dev.type != "cuda":
            return CPU_CHUNK_ROWS
        free, _ = torch.cuda.mem_get_info(dev)
        d = int(getattr(self.featurizer.cfg, "features", 128))
        widest = max([d, *(int(h) for h in _hidden_widths(self.flow_config, d))])
        per_row = 4 * 8 * (d + widest)  # float32 activations, with room for temporaries
        return int(min(GPU_MAX_CHUNK_ROWS, max(CPU_CHUNK_ROWS, free // 4 // per_row)))

    def set_precision(self, precision: str) -> None:
        """``"fp32"`` (default) or ``"bf16"``: the featurizer's projection (window models) or
        backbone (CNN) in bfloat16 with float32 accumulation; the flow, the residual and the
        summaries stay float32. Not stored in a bundle: a property of the run."""
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
        dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        full_res = getattr(self.featurizer.cfg, "scale", 1.0) == 1.0
        for m in self.featurizer.modules():
            if isinstance(m, WindowFeaturizer):
                m.compute_dtype = dtype
                m.pixel_levels = full_res and m.cfg.scale == 1.0
        self.precision = precision

    def features_and_grid(
        self, images: np.ndarray | Tensor | Sequence[np.ndarray]
    ) -> tuple[Tensor, Tensor]:
        """(N, H, W, 3) uint8 -> the (N, D, gh, gw) features the flow sees and the (N, gh, gw)
        window log-likelihoods (the flow's, plus the residual of a residual window model)."""
        x = self._upload(images)
        if isinstance(self.featurizer, DistilledFeaturizer):  # the student predicts the grid
            return self.featurizer.featurize(x)
        if isinstance(self.featurizer, WindowFeaturizer | MultiScaleFeaturizer):
            feats, extra = self.featurizer.featurize(x)
        elif isinstance(self.featurizer, EncoderFeaturizer):
            if self.precision == "bf16":
                with torch.autocast(self.device.type, dtype=torch.bfloat16):
                    feats, extra = self.featurizer.featurize(x)
                feats = feats.float()
                extra = None if extra is None else extra.float()
            else:
                feats, extra = self.featurizer.featurize(x)
        elif self.precision == "bf16":
            with torch.autocast(self.device.type, dtype=torch.bfloat16):
                feats = self.featurizer(x)
            feats, extra = feats.float(), None
        else:
            feats, extra = self.featurizer(x), None
        grid = self.grid_from_features(feats)
        return feats, grid if extra is None else grid + extra.to(grid.dtype)

    def grid_from_features(self, feats: Tensor) -> Tensor:
        """(N, D, gh, gw) features -> (N, gh, gw) flow log-likelihoods, all windows of the
        batch through the flow at once (in chunks of ``chunk_rows`` to bound memory). Without
        a residual window model's extra term: use :meth:`features_and_grid` for the density."""
        if self.flow is None:
            raise ValueError("a distilled scorer has no flow: use features_and_grid")
        n, d, gh, gw = feats.shape
        rows = feats.permute(0, 2, 3, 1).reshape(-1, d)
        ll = torch.cat([self.flow.log_prob(c) for c in rows.split(self.flow_chunk_rows())])
        return ll.view(n, gh, gw)

    def log_likelihood_grid(self, images: np.ndarray | Tensor | Sequence[np.ndarray]) -> Tensor:
        """RGB uint8 images (N, H, W, 3) -> (N, gh, gw) float32 window log-likelihoods; with
        ``transforms`` > 1, the mean over that many :data:`TRANSFORMS` of the images (each
        grid put back in the original layout), at that many times the cost."""
        self.eval()
        with torch.inference_mode():
            if self.transforms <= 1:
                return self.features_and_grid(images)[1]
            if self.transforms > len(TRANSFORMS):
                raise ValueError(f"at most {len(TRANSFORMS)} test-time transforms")
            x = self._upload_uint8(images)
            total: Tensor | None = None
            for name in TRANSFORMS[: self.transforms]:
                g = _untransform(name, self.features_and_grid(_transform(name, x))[1])
                if total is not None and g.shape != total.shape:  # odd sizes after a turn
                    h, w = min(g.shape[1], total.shape[1]), min(g.shape[2], total.shape[2])
                    g, total = g[:, :h, :w], total[:, :h, :w]
                total = g if total is None else total + g
            assert total is not None
            return total / self.transforms

    def _upload_uint8(self, images: np.ndarray | Tensor | Sequence[np.ndarray]) -> Tensor:
        """(N, H, W, 3) uint8 images on the device, unconverted (for test-time transforms)."""
        if isinstance(images, Tensor):
            return images.to(self.device)
        host = np.stack(list(images)) if not isinstance(images, np.ndarray) else images
        return torch.as_tensor(np.ascontiguousarray(host)).to(self.device)

    def grid_and_distance(
        self, images: np.ndarray | Tensor | Sequence[np.ndarray]
    ) -> tuple[Tensor, np.ndarray | None]:
        """The log-likelihood grid (:meth:`log_likelihood_grid`) and, with a
        :attr:`global_score`, each image's global distance (N,) (of the untransformed image's
        features; None without one)."""
        if self.global_score is None:
            return self.log_likelihood_grid(images), None
        grid, feats = self.grid_and_features(images)
        with torch.inference_mode():
            return grid, self.global_score.distance(feats).cpu().numpy()

    def grid_and_features(
        self, images: np.ndarray | Tensor | Sequence[np.ndarray]
    ) -> tuple[Tensor, Tensor]:
        """The log-likelihood grid (:meth:`log_likelihood_grid`, test-time transforms
        included) and the untransformed images' (N, D, gh, gw) features."""
        self.eval()
        with torch.inference_mode():
            if self.transforms <= 1:
                feats, grid = self.features_and_grid(images)
                return grid, feats
            return self.log_likelihood_grid(images), self.features(images)

    def combine(self, tail: np.ndarray, distance: np.ndarray | None) -> np.ndarray:
        """Raw image statistics and global distances -> anomaly scores (unchanged without a
        :attr:`global_score`), before any per-group offset (:meth:`flag`)."""
        if self.global_score is None or distance is None:
            return np.asarray(tail)
        return self.global_score.combine(tail, distance).astype(np.float32)

    def summarize(self, grid: Tensor) -> dict[str, Tensor]:
        """The per-image summary of a grid, with this model's image statistic."""
        return summarize(grid, self.geometry, self.image_score)

    def flag(
        self, anomaly_score: np.ndarray, groups: Sequence[str | None] | None = None
    ) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """Apply the calibration: (calibrated anomaly_score, is_anomaly, threshold_source)
        for N raw scores and, with a per-group calibration, each image's value of its column
        (None: unknown). ``threshold_source`` is ``"<column>=<value>"`` where a group's own
        threshold was used and ``"global"`` otherwise."""
        score = np.asarray(anomaly_score, np.float32).copy()
        thr = np.full(score.shape, self.threshold, np.float64)
        source = ["global"] * len(score)
        cal = self.calibration
        if cal is not None and groups is not None:
            for i, g in enumerate(groups):
                if g is not None and g in cal.thresholds:
                    score[i] -= cal.offsets.get(g, 0.0)
                    thr[i] = cal.thresholds[g]
                    source[i] = f"{cal.by}={g}"
        return score, score > thr, source

    def score(
        self,
        images: np.ndarray | Tensor | Sequence[np.ndarray],
        groups: Sequence[str | None] | None = None,
    ) -> ScoredBatch:
        """Grid, summary and anomaly flag of a batch of same-size RGB uint8 images;
        ``groups``: each image's value of the calibration column (see :meth:`flag`)."""
        grid, distance = self.grid_and_distance(images)
        with torch.inference_mode():
            host = {k: v.float().cpu().numpy() for k, v in self.summarize(grid).items()}
        if distance is not None:
            host["anomaly_score"] = self.combine(host["anomaly_score"], distance)
        host["anomaly_score"], flags, source = self.flag(host["anomaly_score"], groups)
        return ScoredBatch(
            grid=grid.float().cpu().numpy(),
            summary=host,
            is_anomaly=flags,
            threshold_source=source,
        )


def heatmap_to_image(
    grid: np.ndarray | Tensor, geometry: Geometry, height: int, width: int
) -> Tensor:
    """Upsample a (gh, gw) grid to an (height, width) map: each cell's value sits at its
    window's centre and is interpolated bilinearly between centres (held at the borders)."""
    g = torch.as_tensor(np.asarray(grid), dtype=torch.float32)
    gh, gw = g.shape
    s, w, sc = geometry.stride, geometry.window, geometry.scale

    def coords(n_px: int, n_cells: int) -> tuple[Tensor, Tensor, Tensor]:
        # position of pixel centres in (resized) window-grid coordinates
        pos = ((torch.arange(n_px, dtype=torch.float32) + 0.5) * sc - w / 2.0) / s
        pos = pos.clamp(0, n_cells - 1)
        lo = pos.floor().long().clamp(max=max(0, n_cells - 2))
        hi = (lo + 1).clamp(max=n_cells - 1)
        return lo, hi, pos - lo.float()

    y0, y1, fy = coords(height, gh)
    x0, x1, fx = coords(width, gw)
    top = g[y0][:, x0] * (1 - fx) + g[y0][:, x1] * fx
    bot = g[y1][:, x0] * (1 - fx) + g[y1][:, x1] * fx
    return top * (1 - fy[:, None]) + bot * fy[:, None]
