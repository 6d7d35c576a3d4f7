"""Pixel-window featurizer: square windows of an image projected onto a centred PCA basis.

A window is the ``3 × w × w`` block of an RGB image (values in [0, 1]) whose top-left corner is
at ``(i·s, j·s)`` of the image resized by ``scale``; flattened channel-first it is a vector of
``d = 3·w·w`` values. Its feature vector is

    f = ((window - mean) @ basis) * inv_scale          (basis: d × k, k components)

The sweep over all windows of a batch of images is one strided convolution whose kernels are
the basis vectors (``kernel = (basis * inv_scale).T`` reshaped to ``k × 3 × w × w``) and whose
bias is ``-(mean @ basis) * inv_scale``: no Python loop over windows, no unfolded copy of the
image. Grid size: ``gh = floor((H' - w) / s) + 1`` and likewise ``gw``, with H' the resized
height.

**The residual (probabilistic PCA).** With ``residual=True`` and k < d, the window's density
covers every one of its d dimensions, not only the k the flow sees. Write the centred window
as ``x - mean = P a + Q b`` with P the (orthonormal) basis, ``a = Pᵀ(x - mean)`` and Q its
orthonormal complement. The flow models the whitened ``f = a ⊙ inv_scale``; the discarded
``b`` is an isotropic Gaussian N(0, σ² I_{d-k}) with σ² the mean discarded eigenvalue of the
training windows. So::

    log p(x) = log p_flow(f) + Σ log inv_scale - (d-k)/2 · log(2πσ²) - r / (2σ²)
    r = ‖b‖² = ‖x - mean‖² - ‖a‖²,    ‖a‖² = Σ_j f_j² / inv_scale_j²

``‖x - mean‖²`` over every window is one more convolution, of ``[y, y²]`` (y = the image minus
a per-channel constant, which keeps float32 accurate) with the kernel ``[-2(mean - c), 1]``:
a 6-channel input to 1 output, about 2 % of the projection's arithmetic. A defect that lives
outside the top components (a spot far smaller than a window, a flattened patch) raises r,
where the projection alone would never see it.

**The complexity correction** (``complexity=True``, an option). A likelihood ranks simple
windows (flat, dark, smooth) as likely, even where they are the defect (Nalisnick et al. 2019).
Following Serrà et al. 2020, the window score becomes the log-likelihood *minus* that of a
generic model of image windows, a lossless coder's view of complexity: each pixel predicted
by the mean of its left and upper neighbours (PNG's "average" filter), the prediction error
Laplace-distributed with the scale b fitted on the training windows::

    score(x) = log p(x) - log p_generic(x),   log p_generic(x) = -Σ|e| / b - 3w² · log 2b

A flat patch is very likely under both models, so its score drops; texture that only this
data has keeps a high score. ``Σ|e|`` over each window is one more box-sum convolution.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "Geometry",
    "WindowConfig",
    "WindowFeaturizer",
    "to_tensor",
    "resize",
    "conv_windows_bf16",
    "scaled_size",
    "grid_shape",
    "sample_windows",
    "fit_window_featurizer",
    "extract_windows",
    "prediction_errors",
    "QUANTISATION_VARIANCE",
]


@dataclass(frozen=True)
class Geometry:
    """Maps heatmap cell (i, j) to the image: it covers rows [i·s/scale, (i·s + w)/scale) and
    columns [j·s/scale, (j·s + w)/scale) of the full-resolution image; its centre is at
    ((i·s + w/2)/scale, (j·s + w/2)/scale). (Defined here, re-exported by ``flowcore.scorer``,
    so that every featurizer module can name it without an import cycle.)"""

    window: int
    stride: int
    scale: float


MAX_BASIS_ELEMENTS = 1 << 28
"""Largest PCA basis (d × k values, 1 GiB in float32) a configuration may ask for."""

QUANTISATION_VARIANCE = 1.0 / (12 * 255.0**2)
"""Variance of uniform rounding noise of one 8-bit pixel value in [0, 1] units."""


@dataclass(frozen=True)
class WindowConfig:
    """Window geometry and projection. ``components=None`` keeps all 3·w·w dimensions (no
    reduction: the basis is the full rotation onto the principal axes). ``whiten`` divides
    each component by its standard deviation on the training windows, which conditions the
    flow's input."""

    window: int = 46
    stride: int = 8
    scale: float = 1.0
    components: int | None = 100
    whiten: bool = True
    residual: bool = False
    """Add the isotropic Gaussian of the discarded dimensions (probabilistic PCA) to each
    window's log-likelihood, so the model is a density on the whole window. Off for bundles
    written before it existed (their JSON has no such key), which score as they always did."""
    complexity: bool = False
    """Subtract a generic complexity model's log-likelihood from each window's (see the
    module docstring)."""
    residual_feature: bool = False
    """Give the flow one more feature: the standardised log of the window's residual energy
    ``r`` (what the top k components leave of it), so that it learns how much detail
    beyond them each kind of normal window carries (see the module docstring)."""

    def __post_init__(self) -> None:
        if self.window < 1 or self.stride < 1:
            raise ValueError("window and stride must be >= 1")
        if not 0 < self.scale <= 1:
            raise ValueError(f"scale must be in (0, 1], got {self.scale}")
        if self.window > 1024 or self.stride > 1024:
            raise ValueError("window and stride must be <= 1024")
        if self.components is not None and not 1 <= self.components <= self.dims:
            raise ValueError(f"components must be in [1, {self.dims}] or None")
        if self.dims * self.kept > MAX_BASIS_ELEMENTS:
            raise ValueError(
                f"a basis of {self.dims} × {self.kept} is larger than {MAX_BASIS_ELEMENTS} "
                "values: use fewer components or smaller windows"
            )

    @property
    def dims(self) -> int:
        """Length of a flattened window, 3·w·w."""
        return 3 * self.window * self.window

    @property
    def kept(self) -> int:
        """Principal components kept (k)."""
        return self.dims if self.components is None else self.components

    @property
    def features(self) -> int:
        """Length of a feature vector: the k components, and the residual energy feature."""
        return self.kept + int(self.has_residual_feature)

    @property
    def has_residual(self) -> bool:
        """Whether the window density has a residual term (``residual`` and k < d)."""
        return self.residual and self.kept < self.dims

    @property
    def has_residual_feature(self) -> bool:
        """Whether the flow sees the residual energy (``residual_feature`` and k < d)."""
        return self.residual_feature and self.kept < self.dims


def to_tensor(
    images: np.ndarray | Tensor | Sequence[np.ndarray],
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """RGB uint8 images (N, H, W, 3) -> float tensor (N, 3, H, W) in [0, 1] on ``device``."""
    if isinstance(images, Sequence) and not isinstance(images, np.ndarray):
        images = np.stack(list(images))
    t = torch.as_tensor(images)
    if t.ndim != 4 or t.shape[-1] != 3:
        raise ValueError(f"expected RGB images shaped (N, H, W, 3), got {tuple(t.shape)}")
    t = t.to(device=device, non_blocking=True)
    # one strided pass NHWC uint8 -> NCHW float (3× faster than converting, then permuting)
    out = torch.empty((t.shape[0], 3, t.shape[1], t.shape[2]), dtype=dtype, device=t.device)
    out.copy_(t.permute(0, 3, 1, 2))
    return out.mul_(1.0 / 255.0)


_BF16_CHUNK = 4  # images per bf16 convolution: 2, 4 and 8 measured alike, 16 at once ~15 % slower


def conv_windows_bf16(
    xs: Tensor,
    weight: Tensor,
    bias: Tensor,
    window: int,
    stride: int,
    centre: Tensor,
    levels: bool = True,
) -> Tensor:
    """``conv2d(xs, weight, bias, stride)`` with bfloat16 operands and float32 accumulation
    (AMX tiles on a CPU that has them, tensor cores on a GPU), as accurate as bf16 allows:

    - with ``levels`` (pixels that are k/255: decoded 8-bit images at full resolution) they
      enter as grey levels k - round(255·centre), integers in [-255, 255] that bf16 holds
      exactly, and the weights take the 1/255. Other inputs (resized images) are centred,
      x - centre, before rounding: bf16 keeps 8 bits of each, which whitened models without
      a reduction (grain-quarter) amplify;
    - space-to-depth: the image is cut into stride × stride cells stacked as channels
      (3·s² of them), the kernel padded to a multiple of the stride likewise, and the
      strided convolution becomes a stride-1 one with many input channels, the shape the
      matrix units are fast at (3 input channels are not);
    - the bias is added in float32 afterwards. Returns float32 (N, out, gh, gw)."""
    n, _, h, w = xs.shape
    if n > _BF16_CHUNK:  # a few images at a time: their bf16 copies stay in cache
        return torch.cat(
            [
                conv_windows_bf16(part, weight, bias, window, stride, centre, levels)
                for part in xs.split(_BF16_CHUNK)
            ]
        )
    gh, gw = (h - window) // stride + 1, (w - window) // stride + 1
    if levels:  # grey levels minus an integer centre: exact in bf16
        c_int = torch.round(centre.to(xs.dtype) * 255.0).view(1, 3, 1, 1)
        y = torch.round(xs * 255.0).sub_(c_int).to(torch.bfloat16)
        bias = bias + (weight * (c_int / 255.0)).sum((1, 2, 3))
        weight = weight / 255.0
    else:
        c = centre.to(xs.dtype).view(1, 3, 1, 1)
        y = (xs - c).to(torch.bfloat16)
        bias = bias + (weight * c).sum((1, 2, 3))
    hp, wp = -(-h // stride) * stride, -(-w // stride) * stride
    if (hp, wp) != (h, w):
        y = F.pad(y, (0, wp - w, 0, hp - h))
    ys = F.pixel_unshuffle(y, stride).contiguous(memory_format=torch.channels_last)
    kp = -(-window // stride) * stride
    ks = F.pixel_unshuffle(F.pad(weight, (0, kp - window, 0, kp - window)), stride)
    out = F.conv2d(ys, ks.to(torch.bfloat16).contiguous(memory_format=torch.channels_last))
    return out[:, :, :gh, :gw].float() + bias.float().view(1, -1, 1, 1)


def resize(x: Tensor, scale: float) -> Tensor:
    """Antialiased bilinear resize of (N, 3, H, W) by ``scale`` (sizes rounded)."""
    if scale == 1.0:
        return x
    size = scaled_size(x.shape[-2], x.shape[-1], scale)
    return F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)


def scaled_size(height: int, width: int, scale: float) -> tuple[int, int]:
    """Size of an image after :func:`resize` by ``scale``."""
    if scale == 1.0:
        return height, width
    return max(1, round(height * scale)), max(1, round(width * scale))


def grid_shape(height: int, width: int, cfg: WindowConfig) -> tuple[int, int]:
    """(gh, gw) of the heatmap of an image of the given full-resolution size."""
    h, w = scaled_size(height, width, cfg.scale)
    if h < cfg.window or w < cfg.window:
        raise ValueError(
            f"image {height}×{width} (×{cfg.scale}) is smaller than the {cfg.window}px window"
        )
    return (h - cfg.window) // cfg.stride + 1, (w - cfg.window) // cfg.stride + 1


class WindowFeaturizer(nn.Module):
    """(N, 3, H, W) images in [0, 1] -> (N, k, gh, gw) feature grid, by one strided conv."""

    mean: Tensor
    basis: Tensor
    inv_scale: Tensor
    residual_var: Tensor
    complexity_scale: Tensor
    residual_feature_stats: Tensor

    def __init__(self, cfg: WindowConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d, k = cfg.dims, cfg.kept
        self.register_buffer("mean", torch.zeros(d))
        self.register_buffer("basis", torch.eye(d, k))
        self.register_buffer("inv_scale", torch.ones(k))
        if cfg.has_residual:
            # σ² of the discarded dimensions (a 1-element tensor: safetensors stores it)
            self.register_buffer("residual_var", torch.ones(1))
        if cfg.complexity:
            # b of the generic model's Laplace prediction errors
            self.register_buffer("complexity_scale", torch.ones(1))
        if cfg.has_residual_feature:
            # mean and 1/std of log(r + floor) over the training windows
            self.register_buffer("residual_feature_stats", torch.tensor([0.0, 1.0]))

    @property
    def geometry(self) -> Geometry:
        """Cell (i, j) is the window at (i·stride, j·stride) of the image resized by scale."""
        return Geometry(self.cfg.window, self.cfg.stride, self.cfg.scale)

    def set_basis(
        self,
        mean: Tensor,
        basis: Tensor,
        inv_scale: Tensor,
        residual_var: float | None = None,
        complexity_scale: float | None = None,
        residual_feature_stats: tuple[float, float] | None = None,
    ) -> None:
        """Install a fitted basis (shapes (d,), (d, k), (k,)) and, for a residual model, the
        variance σ² > 0 of each discarded dimension; with the complexity correction, the
        generic model's Laplace scale b > 0; with the residual feature, the (mean, 1/std)
        of the log residual energy."""
        d, k = self.cfg.dims, self.cfg.kept
        if mean.shape != (d,) or basis.shape != (d, k) or inv_scale.shape != (k,):
            raise ValueError(f"basis shapes must be ({d},), ({d}, {k}), ({k},)")
        if self.cfg.has_residual and not (residual_var is not None and residual_var > 0):
            raise ValueError("a residual window model needs residual_var > 0")
        if self.cfg.complexity and not (complexity_scale is not None and complexity_scale > 0):
            raise ValueError("the complexity correction needs complexity_scale > 0")
        with torch.no_grad():
            self.mean.copy_(mean)
            self.basis.copy_(basis)
            self.inv_scale.copy_(inv_scale)
            if self.cfg.has_residual:
                assert residual_var is not None
                self.residual_var.fill_(float(residual_var))
            if self.cfg.complexity:
                assert complexity_scale is not None
                self.complexity_scale.fill_(float(complexity_scale))
            if self.cfg.has_residual_feature:
                if residual_feature_stats is None:
                    raise ValueError("the residual feature needs its (mean, 1/std)")
                self.residual_feature_stats.copy_(torch.tensor(residual_feature_stats))

    #: the projection's arithmetic: float32, or torch.bfloat16 (``Scorer.set_precision``);
    #: not stored in a bundle (a property of the run, not of the model)
    compute_dtype: torch.dtype = torch.float32
    #: whether the pixels reaching the projection are 8-bit levels (k/255): full resolution
    pixel_levels: bool = True

    def kernel(self) -> tuple[Tensor, Tensor]:
        """The folded convolution: weight (k, 3, w, w) and bias (k,). Recomputed per call: it
        is d·k multiply-adds, under 1 ms beside the ~100 ms convolution of a batch."""
        proj = self.basis * self.inv_scale  # (d, k)
        weight = proj.T.reshape(-1, 3, self.cfg.window, self.cfg.window).contiguous()
        return weight, -(self.mean @ proj)

    def forward(self, x: Tensor) -> Tensor:
        if self.cfg.has_residual_feature:
            return self.featurize(x)[0]
        weight, bias = self.kernel()
        return self._conv(resize(x, self.cfg.scale), weight, bias)

    def _shifted_mean(self) -> tuple[Tensor, Tensor]:
        """(c, m): a constant per channel (the mean window's average) and the mean window
        minus it, (3,) and (3, w, w). Sums of squares of the image minus c stay small, which
        keeps them accurate in float32."""
        w = self.cfg.window
        mean = self.mean.view(3, w, w)
        c = mean.mean(dim=(1, 2))
        return c, mean - c.view(3, 1, 1)

    def _sweep(self, xs: Tensor) -> tuple[Tensor, Tensor | None]:
        """The projection of every window of resized images and, where a residual is
        needed, each window's ``-2 Σ m·(x - c)`` (see :meth:`residual_energy`) as one more
        output channel of the same convolution: about 1 % more of its arithmetic, where a
        separate 1-channel convolution cost a quarter of the scorer's time."""
        weight, bias = self.kernel()
        if not (self.cfg.has_residual or self.cfg.has_residual_feature):
            return self._conv(xs, weight, bias), None
        c, m = self._shifted_mean()
        w_ext = torch.cat([weight, (-2.0 * m)[None]])
        b_ext = torch.cat([bias, (2.0 * (m * c.view(3, 1, 1)).sum())[None]])
        out = self._conv(xs, w_ext, b_ext)
        k = self.cfg.kept
        return out[:, :k], out[:, k]

    def _conv(self, xs: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
        """Every window of ``xs`` through the projection: float32, or bfloat16 matrix units
        when :attr:`compute_dtype` says so (:func:`conv_windows_bf16`)."""
        if self.compute_dtype == torch.bfloat16:
            centre = self._shifted_mean()[0]
            return conv_windows_bf16(
                xs, weight, bias, self.cfg.window, self.cfg.stride, centre, self.pixel_levels
            )
        return F.conv2d(xs, weight.to(xs.dtype), bias.to(xs.dtype), stride=self.cfg.stride)

    def residual_energy(self, xs: Tensor, feats: Tensor, cross: Tensor | None = None) -> Tensor:
        """``r = ‖x - mean‖² - ‖Pᵀ(x - mean)‖²`` of every window of resized images ``xs``
        whose k projected (whitened) components are ``feats`` (N, k, gh, gw): (N, gh, gw).
        With y = x - c and m = mean - c, ``‖x - mean‖² = Σy² - 2Σm·y + Σm²``: Σy² is a box
        sum (an average pool), ``cross`` = -2Σm·y comes from :meth:`_sweep` (computed here
        when not given)."""
        w, st = self.cfg.window, self.cfg.stride
        c, m = self._shifted_mean()
        y = xs - c.view(1, 3, 1, 1).to(xs.dtype)
        if cross is None:
            cross = F.conv2d(y, (-2.0 * m)[None].to(xs.dtype), stride=st)[:, 0]
        # the box sum, separably: w rows, then w columns (w + w adds per window, not w²)
        sq = (y * y).sum(1, keepdim=True)
        sq = F.avg_pool2d(F.avg_pool2d(sq, (w, 1), stride=(st, 1)), (1, w), stride=(1, st))
        sq = sq[:, 0] * (w * w)
        total = sq + cross + m.square().sum().to(xs.dtype)  # ‖x - mean‖² per window
        var_k = self.inv_scale.reciprocal().square().to(feats.dtype)  # unwhitening
        kept = torch.einsum("nkhw,k->nhw", feats.square(), var_k)  # ‖Pᵀ(x - mean)‖²
        return (total - kept).clamp_min(0)

    def residual_feature(self, r: Tensor) -> Tensor:
        """Residual energies -> the standardised feature ``(log(r + floor) - mean) / std``."""
        m, inv = self.residual_feature_stats.to(r.dtype)
        return (torch.log(r + _energy_floor(self.cfg)) - m) * inv

    def project(self, rows: Tensor) -> Tensor:
        """Flattened windows (n, 3·w·w) -> feature rows (n, features): the same map as the
        convolution sweep (tested equal), the residual feature included."""
        weight, bias = self.kernel()
        a = rows @ weight.reshape(weight.shape[0], -1).T + bias
        if not self.cfg.has_residual_feature:
            return a
        xc = rows - self.mean
        var_k = self.inv_scale.reciprocal().square()
        r = (xc.square().sum(1) - (a.square() * var_k).sum(1)).clamp_min(0)
        return torch.cat([a, self.residual_feature(r)[:, None]], dim=1)

    def featurize(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """(N, 3, H, W) -> the (N, k, gh, gw) features and, for a residual model, the
        (N, gh, gw) log-density of each window that the flow's does not include: the
        whitening's log-determinant plus the isotropic Gaussian of the discarded part (None
        without a residual; see the module docstring)."""
        xs = resize(x, self.cfg.scale)
        feats, cross = self._sweep(xs)
        extra = None
        if cross is not None:
            r = self.residual_energy(xs, feats, cross)
            if self.cfg.has_residual:
                extra = self.residual_log_prob(xs, feats, r)
            if self.cfg.has_residual_feature:
                feats = torch.cat([feats, self.residual_feature(r)[:, None]], dim=1)
        if self.cfg.complexity:
            generic = self.generic_log_prob(xs)
            extra = -generic if extra is None else extra - generic
        return feats, extra

    def generic_log_prob(self, xs: Tensor) -> Tensor:
        """The generic complexity model's log-likelihood of every window of resized images
        (N, 3, H', W'): (N, gh, gw). Pixels on the image's first row or column are predicted
        from themselves (replicate padding)."""
        w = self.cfg.window
        err = prediction_errors(xs).abs()
        ones = torch.ones(1, 3, w, w, dtype=xs.dtype, device=xs.device)
        total = F.conv2d(err, ones, stride=self.cfg.stride)[:, 0]
        b = self.complexity_scale.to(xs.dtype)
        return -total / b - 3 * w * w * torch.log(2 * b)

    def residual_log_prob(self, xs: Tensor, feats: Tensor, r: Tensor | None = None) -> Tensor:
        """Log-density terms outside the flow for the windows of already-resized images ``xs``
        (N, 3, H', W') whose features are ``feats`` (N, k, gh, gw): (N, gh, gw). ``r``: their
        residual energies, if already known."""
        d, k = self.cfg.dims, self.cfg.kept
        if r is None:
            r = self.residual_energy(xs, feats[:, :k])
        s2 = self.residual_var.to(r.dtype)
        const = self.inv_scale.log().sum() - 0.5 * (d - k) * torch.log(2 * math.pi * s2)
        return const.to(r.dtype) - r / (2 * s2)


def _energy_floor(cfg: WindowConfig) -> float:
    """Residual energy of 8-bit quantisation noise alone over one window: the floor under
    ``log r`` (a perfectly flat window would otherwise give log 0)."""
    return 3 * cfg.window**2 * QUANTISATION_VARIANCE


def prediction_errors(x: Tensor) -> Tensor:
    """(..., H, W) -> each pixel minus the mean of its left and upper neighbours (PNG's
    "average" predictor; the first row and column use themselves: replicate padding)."""
    left = torch.cat([x[..., :, :1], x[..., :, :-1]], dim=-1)
    up = torch.cat([x[..., :1, :], x[..., :-1, :]], dim=-2)
    return x - 0.5 * (left + up)


def extract_windows(x: Tensor, cfg: WindowConfig) -> Tensor:
    """Reference extraction (tests, PCA fitting of small samples): every window of resized
    images (N, 3, H, W) as rows (N·gh·gw, 3·w·w), in grid row-major order. Materialises the
    unfold: use it on small inputs only."""
    x = resize(x, cfg.scale)
    cols = F.unfold(x, kernel_size=cfg.window, stride=cfg.stride)  # (N, d, L)
    return cols.transpose(1, 2).reshape(-1, cfg.dims)


def sample_windows(
    images: Sequence[np.ndarray] | np.ndarray,
    cfg: WindowConfig,
    per_image: int,
    generator: torch.Generator,
    dequantize: bool = False,
) -> Tensor:
    """Random windows (any pixel offset, not only the stride grid) from each RGB uint8 image,
    as float32 rows (n, 3·w·w) in [0, 1]. With ``dequantize``, uniform noise of one grey level
    is added (the grain paper's dequantisation of 8-bit pixels)."""
    w = cfg.window
    rows = []
    for img in images:
        x = resize(to_tensor(np.asarray(img)[None]), cfg.scale)[0]
        _, h, wd = x.shape
        if h < w or wd < w:
            raise ValueError(f"image {h}×{wd} is smaller than the {w}px window")
        ys = torch.randint(0, h - w + 1, (per_image,), generator=generator)
        xs = torch.randint(0, wd - w + 1, (per_image,), generator=generator)
        # gather the windows by advanced indexing on a small per-image index grid
        ar = torch.arange(w)
        yy = (ys[:, None] + ar[None, :])[:, :, None]  # (n, w, 1)
        xx = (xs[:, None] + ar[None, :])[:, None, :]  # (n, 1, w)
        win = x[:, yy, xx]  # (3, n, w, w)
        rows.append(win.permute(1, 0, 2, 3).reshape(per_image, -1))
    out = torch.cat(rows)
    if dequantize:
        out = out + torch.rand(out.shape, generator=generator) / 256.0
    return out


def fit_window_featurizer(windows: Tensor, cfg: WindowConfig, seed: int = 0) -> WindowFeaturizer:
    """Fit the centred PCA basis on sampled windows (n, d) and return the featurizer.

    With ``components=k`` the basis is the top-k right singular vectors of the centred windows
    (randomised SVD, exact enough for k ≪ d; computed in float64); with ``components=None`` it
    is every eigenvector of the covariance (no reduction, a rotation). ``whiten`` scales each
    component to unit variance."""
    if windows.ndim != 2 or windows.shape[1] != cfg.dims:
        raise ValueError(f"windows must be (n, {cfg.dims}), got {tuple(windows.shape)}")
    n = windows.shape[0]
    if n < 2:
        raise ValueError("need at least 2 windows to fit a basis")
    x = windows.double()
    mean = x.mean(dim=0)
    xc = x - mean
    total_var = float(xc.square().sum() / (n - 1))  # trace of the covariance
    if cfg.components is None:
        # all d components (no reduction): a rotation onto the principal axes, which
        # decorrelates the window's pixels before the flow sees them
        cov = xc.T @ xc / (n - 1)
        var, basis = torch.linalg.eigh(cov)
        var, basis = var.flip(0), basis.flip(1)
        signs = torch.sign(basis.gather(0, basis.abs().argmax(0, keepdim=True)))
        basis = basis * signs
    else:
        k = cfg.components
        if k > min(n, cfg.dims):
            raise ValueError(f"{k} components need at least {k} windows, got {n}")
        torch.manual_seed(seed)  # svd_lowrank draws its sketch from the global generator
        q = min(k + 20, min(n, cfg.dims))
        _, s, v = torch.svd_lowrank(xc, q=q, niter=4)
        basis = v[:, :k]
        var = s[:k].square() / (n - 1)
        # fix the sign of each component (largest-magnitude loading positive): deterministic
        signs = torch.sign(basis.gather(0, basis.abs().argmax(0, keepdim=True)))
        basis = basis * signs
    # floor each component's variance at the 8-bit quantisation noise of one pixel value,
    # (1/255)² / 12: directions the training windows never vary in (flat metal, JPEG-smoothed
    # areas) would otherwise get a scale of 1e6 and send any deviation to -inf log-likelihood
    residual_var = None
    if cfg.has_residual:
        # the mean eigenvalue of the d - k discarded directions (their variance is what the
        # top k leave of the trace), floored like the components
        left = max(total_var - float(var.sum()), 0.0)
        residual_var = max(left / (cfg.dims - cfg.kept), QUANTISATION_VARIANCE)
    complexity_scale = None
    if cfg.complexity:
        # maximum-likelihood Laplace scale: the mean |error| inside the windows (a window's
        # first row and column have no neighbours within it and are left out)
        wins = windows.view(n, 3, cfg.window, cfg.window).double()
        err = prediction_errors(wins)[..., 1:, 1:]
        complexity_scale = max(float(err.abs().mean()), 0.5 / 255.0) if err.numel() else 1.0
    var = var.clamp_min(QUANTISATION_VARIANCE)
    inv_scale = torch.rsqrt(var) if cfg.whiten else torch.ones_like(var)
    stats = None
    if cfg.has_residual_feature:
        r = (xc.square().sum(1) - (xc @ basis).square().sum(1)).clamp_min(0)
        lr = torch.log(r + _energy_floor(cfg))
        stats = (float(lr.mean()), 1.0 / max(float(lr.std()), 1e-3))
    feat = WindowFeaturizer(cfg)
    feat.set_basis(
        mean.float(), basis.float(), inv_scale.float(), residual_var, complexity_scale, stats
    )
    return feat
