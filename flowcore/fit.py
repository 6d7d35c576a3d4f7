"""Two-stage fitting of a window scorer (the grain paper's recipe), in one plain process.

1. Sample random windows from the training images and fit the centred PCA basis.
2. Project the windows and fit the flow by maximum likelihood, early-stopping on the NLL of
   windows from *held-out whole images* (never crops of the training images).
3. Score the held-out images whole: the threshold is a high quantile (default 0.99) of their
   ``anomaly_score``; the heatmap clip range is the 0.1 % and 5 % quantiles of their windows.

Presets name the two configurations of the grain paper. The Ray Train job calls the same
pieces per worker.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch

from .flows import FlowConfig, MAFConfig, build_flow
from .scorer import Scorer
from .training import EpochStats, FitConfig, fit_flow
from .windows import WindowConfig, WindowFeaturizer, fit_window_featurizer, sample_windows

__all__ = ["ScorerSpec", "PRESETS", "FitReport", "fit_scorer", "project_windows", "calibrate"]


@dataclass(frozen=True)
class ScorerSpec:
    """Everything that defines how a window scorer is fitted."""

    windows: WindowConfig
    flow: FlowConfig = field(default_factory=MAFConfig)
    fit: FitConfig = field(default_factory=FitConfig)
    windows_per_image: int = 256
    pca_windows: int = 20_000
    threshold_quantile: float = 0.99
    dequantize: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        if self.windows_per_image < 1 or self.pca_windows < 2:
            raise ValueError("windows_per_image must be >= 1 and pca_windows >= 2")
        if not 0 < self.threshold_quantile < 1:
            raise ValueError("threshold_quantile must be in (0, 1)")


PRESETS: dict[str, ScorerSpec] = {
    # full resolution, 46×46×3 windows, stride 8, top 100 principal components
    "grain-full": ScorerSpec(WindowConfig(window=46, stride=8, scale=1.0, components=100)),
    # 25 % scale, 11×11×3 = 363 dims, stride 2, no reduction
    "grain-quarter": ScorerSpec(WindowConfig(window=11, stride=2, scale=0.25, components=None)),
}


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
    """Rows of flattened windows (n, 3·w·w) -> feature rows (n, k), the same affine map the
    convolution applies (tested equal)."""
    weight, bias = feat.kernel()
    return windows @ weight.reshape(weight.shape[0], -1).T + bias


@torch.no_grad()
def calibrate(
    scorer: Scorer, images: Sequence[np.ndarray], quantile: float, batch: int = 8
) -> tuple[float, tuple[float, float]]:
    """Threshold (``quantile`` of anomaly_score) and heatmap clip range on held-out normal
    images. The clip is (0.1 %, 5 %) of their window log-likelihoods: overlays leave the 95 %
    most typical windows of normal images clear and are fully red at the rarest 0.1 %."""
    scores, lls = [], []
    for start in range(0, len(images), batch):
        sb = scorer.score(np.stack(images[start : start + batch]))
        scores.append(sb.summary["anomaly_score"])
        lls.append(sb.grid.reshape(-1))
    s = np.concatenate(scores)
    ll = np.concatenate(lls)
    lo, hi = np.quantile(ll, [0.001, 0.05])
    return float(np.quantile(s, quantile)), (float(lo), float(hi))


def fit_scorer(
    train_images: Sequence[np.ndarray],
    val_images: Sequence[np.ndarray],
    spec: ScorerSpec,
    on_epoch: Callable[[EpochStats], None] | None = None,
    device: str | torch.device = "cpu",
) -> tuple[Scorer, FitReport]:
    """Fit a window scorer on RGB uint8 images (each H×W×3; sizes may differ between images).
    ``val_images`` are whole images held out from training."""
    if len(train_images) < 1 or len(val_images) < 1:
        raise ValueError("need at least one training and one held-out validation image")
    t0 = time.perf_counter()
    gen = torch.Generator().manual_seed(spec.seed)
    per = spec.windows_per_image
    train_w = sample_windows(train_images, spec.windows, per, gen, spec.dequantize)
    val_w = sample_windows(val_images, spec.windows, per, gen, spec.dequantize)
    pca_idx = torch.randperm(train_w.shape[0], generator=gen)[: spec.pca_windows]
    feat = fit_window_featurizer(train_w[pca_idx], spec.windows, seed=spec.seed)
    x_train = project_windows(feat, train_w)
    x_val = project_windows(feat, val_w)
    del train_w, val_w
    torch.manual_seed(spec.seed)
    flow = build_flow(spec.windows.features, spec.flow).to(device)
    fit_cfg = replace(spec.fit, seed=spec.seed)
    result = fit_flow(flow, x_train.to(device), x_val.to(device), fit_cfg, on_epoch)
    scorer = Scorer(feat.to(device), flow, flow_config=spec.flow).eval()
    threshold, clip = calibrate(scorer, val_images, spec.threshold_quantile)
    scorer.threshold, scorer.heatmap_clip = threshold, clip
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
    return scorer, report
