"""A scorer = featurizer + flow: RGB images -> log-likelihood grid -> per-image summary.

Summary (DESIGN.md): mean, std (population), min, max and the percentiles p01 … p99 of the
window log-likelihoods of an image (linear interpolation between order statistics, as
numpy's default); ``quality = (p25 + p50) / 2`` (lower = worse); ``anomaly_score = -p05``
(higher = more anomalous); ``is_anomaly = anomaly_score > threshold``, the threshold being a
high quantile of ``anomaly_score`` over held-out normal images, stored with the model.
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
from .flows import Flow, FlowConfig, MAFConfig
from .windows import Geometry, WindowFeaturizer, to_tensor

__all__ = [
    "PERCENTILES",
    "SUMMARY_COLUMNS",
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


FeaturizerModule = WindowFeaturizer | CNNFeaturizer
"""The featurizers a :class:`Scorer` (and a bundle) can hold; each has ``cfg``, ``geometry``
and a ``mean`` buffer (which gives the device)."""


@dataclass
class ScoredBatch:
    """Scores of N images: ``grid`` (N, gh, gw) float32 log-likelihoods, ``summary`` column ->
    (N,) float32 array, ``is_anomaly`` (N,) bool."""

    grid: np.ndarray
    summary: dict[str, np.ndarray]
    is_anomaly: np.ndarray


def summarize(grid: Tensor) -> dict[str, Tensor]:
    """Per-image summary of a (N, gh, gw) log-likelihood grid; each value (N,)."""
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
    out["anomaly_score"] = -out["p05"]
    return out


class Scorer(nn.Module):
    """Featurizer + flow, with the threshold and heatmap clip range learnt at training."""

    def __init__(
        self,
        featurizer: FeaturizerModule,
        flow: Flow,
        *,
        flow_config: FlowConfig | None = None,
        threshold: float = math.inf,
        heatmap_clip: tuple[float, float] | None = None,
        chunk_rows: int = 4096,
    ) -> None:
        super().__init__()
        self.featurizer: FeaturizerModule = featurizer
        self.flow = flow
        self.threshold = float(threshold)
        self.heatmap_clip = heatmap_clip
        self.chunk_rows = chunk_rows
        self.flow_config: FlowConfig = flow_config or MAFConfig()
        self.training_stats: dict[str, object] = {}

    @property
    def geometry(self) -> Geometry:
        return self.featurizer.geometry

    @property
    def device(self) -> torch.device:
        return self.featurizer.mean.device

    def features(self, images: np.ndarray | Tensor | Sequence[np.ndarray]) -> Tensor:
        """(N, H, W, 3) uint8 -> (N, D, gh, gw) feature grid."""
        return self.featurizer(to_tensor(images, self.device))

    def grid_from_features(self, feats: Tensor) -> Tensor:
        """(N, D, gh, gw) features -> (N, gh, gw) log-likelihoods, all windows of the batch
        through the flow at once (in chunks of ``chunk_rows`` to bound memory)."""
        n, d, gh, gw = feats.shape
        rows = feats.permute(0, 2, 3, 1).reshape(-1, d)
        ll = torch.cat([self.flow.log_prob(c) for c in rows.split(self.chunk_rows)])
        return ll.view(n, gh, gw)

    def log_likelihood_grid(self, images: np.ndarray | Tensor | Sequence[np.ndarray]) -> Tensor:
        """RGB uint8 images (N, H, W, 3) -> (N, gh, gw) float32 window log-likelihoods."""
        self.eval()
        with torch.inference_mode():
            return self.grid_from_features(self.features(images))

    def score(self, images: np.ndarray | Tensor | Sequence[np.ndarray]) -> ScoredBatch:
        """Grid, summary and anomaly flag of a batch of same-size RGB uint8 images."""
        grid = self.log_likelihood_grid(images)
        with torch.inference_mode():
            host = {k: v.float().cpu().numpy() for k, v in summarize(grid).items()}
        return ScoredBatch(
            grid=grid.float().cpu().numpy(),
            summary=host,
            is_anomaly=host["anomaly_score"] > self.threshold,
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
