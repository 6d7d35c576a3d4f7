"""Synthetic anomalies made from normal images, for a self-supervised flow (NSA, CutPaste).

At training time each training image gets a copy with one made-up defect:

* ``patch``: a rectangle cut from another normal image (or elsewhere in the same one),
  resized, turned, re-lit and blended in with a feathered edge (CutPaste, NSA);
* ``spot``: a small ellipse whose grey level (and tint) is shifted up or down;
* ``scratch``: a thin, slightly curved stroke, brighter or darker than around it.

Defect areas are drawn log-uniformly between ``area`` fractions of the image, so they follow
the image's size. :func:`defect_cells` names the cells of a featurizer's grid that see the
defect (the defect lies in the central part of the cell's window), and :func:`anomaly_rows`
returns the feature vectors of those cells: the rows the conditional loss of
:func:`flowcore.training.batch_objective` pushes below the normal windows' likelihood.

The same defects, on held-out images, are what :func:`flowcore.fit.choose_image_score` uses
to pick the image statistic without test labels. They are generic shapes, not any test
archive's defects: an archive whose defects look like them (the ``texture`` archive's spots
and scratches do) will show gains that a user's own defects may not.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .windows import Geometry

__all__ = ["KINDS", "DefectConfig", "add_defect", "defect_cells", "auroc"]

KINDS: tuple[str, ...] = ("patch", "spot", "scratch")


@dataclass(frozen=True)
class DefectConfig:
    """What the made-up defects look like. ``area``: (smallest, largest) defect as a fraction
    of the image; ``shift``: (smallest, largest) change of grey level (0-255) of spots and
    scratches; ``kinds``: which of :data:`KINDS` to draw from (uniformly)."""

    kinds: tuple[str, ...] = KINDS
    area: tuple[float, float] = (0.0003, 0.01)
    shift: tuple[float, float] = (35.0, 90.0)

    def __post_init__(self) -> None:
        bad = [k for k in self.kinds if k not in KINDS]
        if not self.kinds or bad:
            raise ValueError(f"synthetic anomaly kinds must be some of {KINDS}, got {self.kinds}")
        lo, hi = self.area
        if not 0 < lo <= hi < 0.5:
            raise ValueError(f"synthetic anomaly area must be 0 < lo <= hi < 0.5, got {self.area}")
        if not 0 < self.shift[0] <= self.shift[1] <= 255:
            raise ValueError(f"synthetic anomaly shift must be in (0, 255], got {self.shift}")


def _ellipse_alpha(
    h: int, w: int, cy: float, cx: float, ry: float, rx: float, angle: float
) -> np.ndarray:
    """Anti-aliased alpha (h, w) of a filled ellipse (one-pixel soft edge)."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    c, s = math.cos(angle), math.sin(angle)
    u = ((x - cx) * c + (y - cy) * s) / rx
    v = (-(x - cx) * s + (y - cy) * c) / ry
    r = np.sqrt(u * u + v * v)
    edge = 1.0 / max(1.0, min(rx, ry))  # one pixel in normalised radius
    return np.clip((1.0 - r) / edge + 0.5, 0.0, 1.0)


def _stroke_alpha(h: int, w: int, pts: np.ndarray, width: float) -> np.ndarray:
    """Anti-aliased alpha (h, w) of a polyline of ``width`` pixels through ``pts`` (n, 2)."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    dist = np.full((h, w), np.inf, np.float32)
    for (y0, x0), (y1, x1) in zip(pts[:-1], pts[1:], strict=True):
        dy, dx = y1 - y0, x1 - x0
        t = np.clip(((y - y0) * dy + (x - x0) * dx) / max(dy * dy + dx * dx, 1e-6), 0, 1)
        d = np.hypot(y - (y0 + t * dy), x - (x0 + t * dx))
        dist = np.minimum(dist, d)
    return np.clip(width / 2.0 - dist + 0.5, 0.0, 1.0)


def _shifted(
    img: np.ndarray, alpha: np.ndarray, rng: np.random.Generator, cfg: DefectConfig
) -> np.ndarray:
    """img with its grey level shifted by ±shift (slightly tinted) where alpha > 0."""
    sign = 1.0 if rng.random() < 0.5 else -1.0
    shift = sign * rng.uniform(*cfg.shift)
    tint = 1.0 + rng.uniform(-0.25, 0.25, size=3)
    return img + alpha[:, :, None] * (shift * tint)[None, None, :]


def add_defect(
    img: np.ndarray,
    rng: np.random.Generator,
    cfg: DefectConfig | None = None,
    donor: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic defect in an RGB uint8 image (H, W, 3): ``(image, alpha)``, the new uint8
    image and the defect's float32 alpha (H, W) in [0, 1] (its mask is ``alpha > 0.5``).
    ``donor``: the image a ``patch`` is cut from (default: ``img`` itself)."""
    cfg = cfg or DefectConfig()
    h, w = img.shape[:2]
    kind = cfg.kinds[int(rng.integers(len(cfg.kinds)))]
    lo, hi = cfg.area
    area = float(np.exp(rng.uniform(math.log(lo), math.log(hi)))) * h * w
    out = img.astype(np.float32)
    if kind == "spot":
        aspect = float(rng.uniform(1.0, 2.5))
        ry = math.sqrt(area / (math.pi * aspect))
        rx = ry * aspect
        cy, cx = rng.uniform(ry, max(ry + 1, h - ry)), rng.uniform(rx, max(rx + 1, w - rx))
        alpha = _ellipse_alpha(h, w, cy, cx, max(ry, 1.0), max(rx, 1.0), rng.uniform(0, np.pi))
        out = _shifted(out, alpha, rng, cfg)
    elif kind == "scratch":
        width = float(rng.uniform(1.0, 3.0))
        length = max(6.0, area / width)
        length = min(length, 0.5 * min(h, w))
        ang = rng.uniform(0, 2 * np.pi)
        cy, cx = rng.uniform(0.2 * h, 0.8 * h), rng.uniform(0.2 * w, 0.8 * w)
        bend = rng.uniform(-0.4, 0.4)
        ts = np.linspace(-0.5, 0.5, 5)
        angs = ang + bend * ts * 2
        pts = np.stack([cy + ts * length * np.sin(angs), cx + ts * length * np.cos(angs)], 1)
        alpha = _stroke_alpha(h, w, pts, width)
        out = _shifted(out, alpha, rng, cfg)
    else:  # patch
        src = img if donor is None else donor
        sh, sw = src.shape[:2]
        aspect = float(np.exp(rng.uniform(math.log(0.5), math.log(2.0))))
        ph = max(3, min(h - 2, int(round(math.sqrt(area / aspect)))))
        pw = max(3, min(w - 2, int(round(math.sqrt(area * aspect)))))
        zoom = float(rng.uniform(0.7, 1.4))  # source region is the patch / zoom
        qh, qw = max(2, min(sh, int(round(ph / zoom)))), max(2, min(sw, int(round(pw / zoom))))
        sy, sx = int(rng.integers(0, sh - qh + 1)), int(rng.integers(0, sw - qw + 1))
        piece = torch.from_numpy(np.ascontiguousarray(src[sy : sy + qh, sx : sx + qw]))
        piece_t = piece.permute(2, 0, 1)[None].float()
        piece_t = F.interpolate(piece_t, size=(ph, pw), mode="bilinear", align_corners=False)
        patch = piece_t[0].permute(1, 2, 0).numpy()
        patch = np.rot90(patch, int(rng.integers(4))) if ph == pw else patch
        patch = patch * rng.uniform(0.75, 1.3) + rng.uniform(-30, 30)
        ph, pw = patch.shape[:2]
        y0, x0 = int(rng.integers(0, h - ph + 1)), int(rng.integers(0, w - pw + 1))
        feather = max(1.0, 0.15 * min(ph, pw))
        yy = np.minimum(np.arange(ph) + 0.5, ph - np.arange(ph) - 0.5)[:, None]
        xx = np.minimum(np.arange(pw) + 0.5, pw - np.arange(pw) - 0.5)[None, :]
        a = np.clip(np.minimum(yy, xx) / feather, 0.0, 1.0).astype(np.float32)
        alpha = np.zeros((h, w), np.float32)
        alpha[y0 : y0 + ph, x0 : x0 + pw] = a
        region = out[y0 : y0 + ph, x0 : x0 + pw]
        out[y0 : y0 + ph, x0 : x0 + pw] = region * (1 - a[:, :, None]) + patch * a[:, :, None]
    return np.clip(out + 0.5, 0, 255).astype(np.uint8), alpha.astype(np.float32)


def defect_cells(alpha: np.ndarray, geometry: Geometry, grid: tuple[int, int]) -> Tensor:
    """Flat indices of the cells of a (gh, gw) grid that see a defect: those whose window's
    central part (``max(stride, window // 2)`` pixels square about the cell's centre, in the
    resized image; for a CNN cell, the stride-wide square about it) holds at least half of
    the defect's alpha, or is at least half covered by it when the defect is
    larger. At least one cell (the one holding the most) whenever the defect touches the
    grid; empty when it does not."""
    gh, gw = grid
    s, win, scale = geometry.stride, geometry.window, geometry.scale
    a = torch.from_numpy(np.ascontiguousarray(alpha, dtype=np.float32))[None, None]
    if scale != 1.0:
        size = (max(1, round(a.shape[-2] * scale)), max(1, round(a.shape[-1] * scale)))
        a = F.interpolate(a, size=size, mode="area" if scale < 1 else "bilinear")
    core = max(s, win // 2)
    off = (win - core) // 2  # negative where the window is smaller than a stride (CNN cells)
    if off < 0:
        a = F.pad(a, (-off, 0, -off, 0))
    else:
        a = a[..., off:, off:]
    if a.shape[-2] < core or a.shape[-1] < core:
        return torch.zeros(0, dtype=torch.long)
    inside = F.avg_pool2d(a, core, s)[0, 0] * (core * core)  # alpha inside each core
    inside = inside[:gh, :gw]
    total = float(a.sum())
    if total <= 0 or inside.numel() == 0:
        return torch.zeros(0, dtype=torch.long)
    need = 0.5 * min(total, core * core)
    flat = torch.zeros(gh, gw)
    flat[: inside.shape[0], : inside.shape[1]] = inside
    flat = flat.reshape(-1)
    cells = torch.nonzero(flat >= need).reshape(-1)
    if cells.numel() == 0 and float(flat.max()) > 0:
        cells = flat.argmax().reshape(1)
    return cells


def auroc(normal: Sequence[float] | np.ndarray, anomalous: Sequence[float] | np.ndarray) -> float:
    """Area under the ROC curve of scores (higher = more anomalous): the probability that an
    anomalous score exceeds a normal one, ties counted half (Mann-Whitney). NaN where either
    side is empty."""
    n = np.asarray(normal, np.float64).reshape(-1)
    a = np.asarray(anomalous, np.float64).reshape(-1)
    if n.size == 0 or a.size == 0:
        return float("nan")
    n = np.nan_to_num(n, nan=np.inf)
    a = np.nan_to_num(a, nan=np.inf)
    both = np.concatenate([n, a])
    order = both.argsort(kind="mergesort")
    ranks = np.empty(both.size, np.float64)
    sorted_v = both[order]
    # average ranks of ties
    i = 0
    while i < both.size:
        j = i
        while j + 1 < both.size and sorted_v[j + 1] == sorted_v[i]:
            j += 1
        ranks[order[i : j + 1]] = 0.5 * (i + j) + 1.0
        i = j + 1
    r_a = ranks[n.size :].sum()
    return float((r_a - a.size * (a.size + 1) / 2.0) / (a.size * n.size))
