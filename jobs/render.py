"""Heatmap overlays: upsample the log-likelihood grid to the image, colour low likelihood dark
red, blend it semi-transparently over the image, clip to the model's training quantiles."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from flowcore.scorer import Geometry, heatmap_to_image

__all__ = ["overlay", "side_by_side", "save_overlay"]

DARK_RED = np.array([139.0, 0.0, 0.0])


def overlay(
    rgb: np.ndarray,
    grid: np.ndarray,
    geometry: Geometry,
    clip: tuple[float, float] | None,
    max_alpha: float = 0.75,
) -> np.ndarray:
    """RGB uint8 (H, W, 3) with the heatmap blended over it: transparent where the window
    log-likelihood is at or above the clip's upper value (typical of normal images), fully
    ``max_alpha`` dark red at or below its lower value."""
    h, w = rgb.shape[:2]
    ll = heatmap_to_image(grid, geometry, h, w).numpy()
    lo, hi = clip if clip else (float(np.quantile(grid, 0.01)), float(np.quantile(grid, 0.99)))
    badness = np.clip((hi - ll) / max(hi - lo, 1e-6), 0.0, 1.0)
    alpha = (max_alpha * badness)[..., None]
    out = rgb.astype(np.float32) * (1 - alpha) + DARK_RED * alpha
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def side_by_side(rgb: np.ndarray, over: np.ndarray, gap: int = 8) -> np.ndarray:
    """Original and overlay next to each other with a white gap."""
    h = rgb.shape[0]
    sep = np.full((h, gap, 3), 255, np.uint8)
    return np.concatenate([rgb, sep, over], axis=1)


def save_overlay(
    path: str | Path,
    rgb: np.ndarray,
    grid: np.ndarray,
    geometry: Geometry,
    clip: tuple[float, float] | None,
) -> Path:
    """Write original | overlay as a PNG."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(side_by_side(rgb, overlay(rgb, grid, geometry, clip))).save(p)
    return p
