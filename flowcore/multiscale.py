"""Multi-scale window featurizer: a fine grid of small windows, each with the coarse window
around it as context, for defects smaller than a coarse window.

    image ─resize by scale─▶ fine conv  (fine_window², stride fine_stride, fine_components)
                           └▶ coarse conv (window², stride, components) ─bilinear at the fine
                              cells' centres─▶ concatenated: (N, k_fine + k_coarse, gh, gw)

One flow models the joint vector, so a cell's log-likelihood is that of its small window *in
its context*: a spot that is normal somewhere (a dark kernel edge) but not here scores low.
The heatmap is on the fine grid (:attr:`MultiScaleFeaturizer.geometry`). Each scale's
options apply as in :mod:`flowcore.windows`: ``residual_feature`` (on by default) gives the
flow each scale's residual energy, ``residual`` adds each scale's probabilistic-PCA residual
density (the coarse one resampled like its features).

This is the "fine grid beside the coarse one" of the detection issue, built as one joint
density rather than two flows whose standardised scores are averaged: one flow, one
training, one threshold, and no standardisation constants to estimate. Training pairs are
a random coarse window and the fine window at its centre (:func:`split_rows`); at scoring
the coarse features are interpolated between coarse cells, which are ``stride`` apart.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .windows import Geometry, WindowConfig, WindowFeaturizer, fit_window_featurizer, resize

__all__ = ["MultiScaleConfig", "MultiScaleFeaturizer", "fit_multiscale", "split_rows"]


@dataclass(frozen=True)
class MultiScaleConfig:
    """The coarse windows (``window``, ``stride``, ``components``) and the fine ones
    (``fine_window``, ``fine_stride``, ``fine_components``), both at ``scale``."""

    window: int = 46
    stride: int = 8
    components: int = 100
    fine_window: int = 11
    fine_stride: int = 4
    fine_components: int = 32
    scale: float = 1.0
    whiten: bool = True
    residual: bool = False
    residual_feature: bool = True

    def __post_init__(self) -> None:
        if not 1 <= self.fine_window < self.window:
            raise ValueError("fine_window must be >= 1 and smaller than window")
        self.coarse_config  # noqa: B018 - validates the windows, strides and components
        self.fine_config  # noqa: B018

    @property
    def coarse_config(self) -> WindowConfig:
        return WindowConfig(  # on the already-resized image: scale 1
            window=self.window,
            stride=self.stride,
            components=self.components,
            whiten=self.whiten,
            residual=self.residual,
            residual_feature=self.residual_feature,
        )

    @property
    def fine_config(self) -> WindowConfig:
        return WindowConfig(
            window=self.fine_window,
            stride=self.fine_stride,
            components=self.fine_components,
            whiten=self.whiten,
            residual=self.residual,
            residual_feature=self.residual_feature,
        )

    @property
    def sampling_config(self) -> WindowConfig:
        """Where training rows come from: coarse windows of the image resized by ``scale``."""
        return WindowConfig(window=self.window, stride=self.stride, scale=self.scale)

    @property
    def dims(self) -> int:
        """Length of a raw training row: one flattened coarse window."""
        return 3 * self.window * self.window

    @property
    def features(self) -> int:
        return self.fine_config.features + self.coarse_config.features


def split_rows(rows: Tensor, cfg: MultiScaleConfig) -> tuple[Tensor, Tensor]:
    """Raw coarse windows (n, 3·w·w) -> (fine windows at their centres (n, 3·f·f), the coarse
    windows themselves). Where w - f is odd the fine window sits half a pixel up and left."""
    w, f = cfg.window, cfg.fine_window
    o = (w - f) // 2
    fine = rows.view(-1, 3, w, w)[:, :, o : o + f, o : o + f].reshape(rows.shape[0], -1)
    return fine, rows


def _centres(n_out: int, stride_out: int, win_out: int, stride_in: int, win_in: int) -> Tensor:
    """Positions, in input-grid index units, of the output cells' centres."""
    pos = torch.arange(n_out, dtype=torch.float32) * stride_out + win_out / 2.0
    return (pos - win_in / 2.0) / stride_in


def _resample(grid: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
    """Bilinear samples of (N, C, H, W) at fractional (rows, cols) indices, held at borders."""
    _, _, h, w = grid.shape
    r = rows.clamp(0, h - 1)
    c = cols.clamp(0, w - 1)
    r0 = r.floor().long().clamp(max=max(h - 2, 0))
    c0 = c.floor().long().clamp(max=max(w - 2, 0))
    r1 = (r0 + 1).clamp(max=h - 1)
    c1 = (c0 + 1).clamp(max=w - 1)
    fr = (r - r0).to(grid.dtype).view(1, 1, -1, 1)
    fc = (c - c0).to(grid.dtype).view(1, 1, 1, -1)
    top = grid[:, :, r0][:, :, :, c0] * (1 - fc) + grid[:, :, r0][:, :, :, c1] * fc
    bot = grid[:, :, r1][:, :, :, c0] * (1 - fc) + grid[:, :, r1][:, :, :, c1] * fc
    return top * (1 - fr) + bot * fr


class MultiScaleFeaturizer(nn.Module):
    """(N, 3, H, W) in [0, 1] -> (N, k_fine + k_coarse, gh, gw) on the fine grid."""

    def __init__(self, cfg: MultiScaleConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.fine = WindowFeaturizer(cfg.fine_config)
        self.coarse = WindowFeaturizer(cfg.coarse_config)

    @property
    def mean(self) -> Tensor:
        """The fine mean (gives the device, as every featurizer's ``mean``)."""
        return self.fine.mean

    @property
    def geometry(self) -> Geometry:
        """Cells of the fine grid."""
        return Geometry(self.cfg.fine_window, self.cfg.fine_stride, self.cfg.scale)

    def _coarse_at_fine(self, coarse: Tensor, gh: int, gw: int) -> Tensor:
        cfg = self.cfg
        rows = _centres(gh, cfg.fine_stride, cfg.fine_window, cfg.stride, cfg.window)
        cols = _centres(gw, cfg.fine_stride, cfg.fine_window, cfg.stride, cfg.window)
        return _resample(coarse, rows.to(coarse.device), cols.to(coarse.device))

    def featurize(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """Features on the fine grid and the residual log-density terms of both scales
        (None without ``residual``)."""
        xs = resize(x, self.cfg.scale)
        fine, fine_extra = self.fine.featurize(xs)
        coarse, coarse_extra = self.coarse.featurize(xs)
        gh, gw = fine.shape[-2:]
        feats = torch.cat([fine, self._coarse_at_fine(coarse, gh, gw)], dim=1)
        if fine_extra is None or coarse_extra is None:
            return feats, None
        extra = fine_extra + self._coarse_at_fine(coarse_extra[:, None], gh, gw)[:, 0]
        return feats, extra

    def forward(self, x: Tensor) -> Tensor:
        return self.featurize(x)[0]

    @torch.no_grad()
    def project(self, rows: Tensor) -> Tensor:
        """Raw coarse windows (n, 3·w·w) -> joint feature rows (n, k_fine + k_coarse): the
        fine window at the centre and the coarse window, each projected."""
        fine, coarse = split_rows(rows, self.cfg)
        return torch.cat([self.fine.project(fine), self.coarse.project(coarse)], dim=1)


def fit_multiscale(rows: Tensor, cfg: MultiScaleConfig, seed: int = 0) -> MultiScaleFeaturizer:
    """Fit both PCA bases on raw coarse windows (n, 3·w·w): the coarse one on the windows,
    the fine one on their centres."""
    if rows.ndim != 2 or rows.shape[1] != cfg.dims:
        raise ValueError(f"rows must be (n, {cfg.dims}), got {tuple(rows.shape)}")
    fine_rows, coarse_rows = split_rows(rows, cfg)
    feat = MultiScaleFeaturizer(cfg)
    feat.fine = fit_window_featurizer(fine_rows.contiguous(), cfg.fine_config, seed=seed)
    feat.coarse = fit_window_featurizer(coarse_rows, cfg.coarse_config, seed=seed)
    return feat
