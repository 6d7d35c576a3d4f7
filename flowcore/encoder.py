"""Autoencoder featurizer: the encoder of a convolutional autoencoder trained on normal
images; each cell of its output grid is the latent code of one window.

    image (N, 3, H, W) in [0, 1]
      ─resize by scale─▶ ─grey (channel mean) if cfg.grey─▶
      encoder: k × [conv 4×4 / 2, padding 1, LeakyReLU] ─▶ conv m×m (valid), m = w / 2^k
      ─▶ (N, L, gh, gw) raw latents ─standardisation (mean, inv_std)─▶ features

A ``window`` × ``window`` image (after ``scale``) gives a 1 × 1 grid: the latent code of the
whole image (small one-class images such as Fashion-MNIST's 28 × 28). A larger image gives
``gh = ⌊H'/2^k⌋ - m + 1`` cells (likewise ``gw``), cell (i, j) being the window whose top-left
corner is at (i·2^k, j·2^k): :attr:`EncoderFeaturizer.geometry` is ``Geometry(window, 2^k,
scale)``. Inside a large image the padded stride-2 convolutions see the pixels around a window
where a window-sized image sees zeros: the border rows of a cell's code depend on up to
2^k - 1 pixels of context beyond its window.

The decoder mirrors the encoder (a transposed m × m conv from the 1 × 1 code, then k ×
[transposed conv 4×4 / 2], linear output) and is kept in the model: it trains the encoder, and it
gives the optional reconstruction term. With ``recon`` other than ``"off"``, each cell's
log-likelihood gets ``extra = recon_gain · log N(window; decoder(code), σ² I)``

    extra = recon_gain · (-r / (2σ²) - d/2 · log(2πσ²)),    r = ‖window - decoder(code)‖²

with σ² the mean squared reconstruction error per value on held-out rows (a density on
the window's d = C·w·w values given its code, as the probabilistic-PCA residual of the window
featurizer), so that ``-log p(z) - log p(x | z)`` scores an image that the encoder maps to a
likely code but the decoder cannot rebuild. ``recon_gain`` is 1 for ``"density"``; for
``"balanced"`` :func:`flowcore.fit.balance_recon` sets it after the flow is fitted so that the
term has the same spread as the flow's log-likelihood on held-out normal images (no labels).

Training (:func:`fit_encoder`): Adam on the mean squared error of random window crops (the
rows of :func:`sample_crops`), early stopping on the error of the last ``ae_val_fraction`` of
the rows (crops are drawn image by image, so these are crops of the last images: whole images
held out, but for the one at the boundary); then the standardisation of the raw codes and σ²
of the reconstructions, both from the training rows' codes and the held-out rows' errors.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .windows import Geometry, resize, scaled_size, to_tensor

__all__ = [
    "RECON_MODES",
    "EncoderConfig",
    "EncoderFeaturizer",
    "AEHistory",
    "encoder_grid_shape",
    "sample_crops",
    "fit_encoder",
]

RECON_MODES: tuple[str, ...] = ("off", "density", "balanced")
"""How the reconstruction term enters a cell's log-likelihood (see the module docstring)."""

MAX_ENCODER_WINDOW = 512
MAX_ENCODER_CHANNELS = 1024
MAX_ENCODER_ELEMENTS = 1 << 27
"""Most parameters (encoder and decoder, 512 MiB in float32) a configuration may ask for."""


@dataclass(frozen=True)
class EncoderConfig:
    """The autoencoder: ``window`` the side of its input in resized pixels (a multiple of
    2^len(channels)), ``scale`` the resize applied to images first, ``grey`` one channel (the
    mean of R, G, B) or RGB, ``channels`` the widths of the stride-2 convolutions, ``latent``
    the length of a code (the flow's features). Training: ``ae_epochs`` at most, Adam at
    ``ae_lr`` with batches of ``ae_batch`` rows, stopping after ``ae_patience`` epochs
    without a better held-out error, ``ae_val_fraction`` of the rows held out. ``recon``: one
    of :data:`RECON_MODES`."""

    window: int = 28
    scale: float = 1.0
    grey: bool = True
    channels: tuple[int, ...] = (32, 64)
    latent: int = 32
    ae_epochs: int = 40
    ae_lr: float = 1e-3
    ae_batch: int = 128
    ae_patience: int = 5
    ae_val_fraction: float = 0.1
    recon: str = "balanced"

    def __post_init__(self) -> None:
        channels: Any = self.channels
        if isinstance(channels, str) or not isinstance(channels, Sequence):
            raise ValueError(f"EncoderConfig.channels must be a list of widths, got {channels!r}")
        object.__setattr__(self, "channels", tuple(channels))
        if not self.channels or any(
            isinstance(c, bool) or not isinstance(c, int) or not 1 <= c <= MAX_ENCODER_CHANNELS
            for c in self.channels
        ):
            raise ValueError(
                f"EncoderConfig.channels must be 1 to 6 integers in [1, {MAX_ENCODER_CHANNELS}], "
                f"got {list(self.channels)}"
            )
        if len(self.channels) > 6:
            raise ValueError("EncoderConfig.channels: at most 6 stride-2 convolutions")
        if not 2 <= self.window <= MAX_ENCODER_WINDOW:
            raise ValueError(f"EncoderConfig.window must be in [2, {MAX_ENCODER_WINDOW}]")
        if self.window % self.stride:
            raise ValueError(
                f"EncoderConfig.window ({self.window}) must be a multiple of 2^{len(self.channels)}"
                f" = {self.stride} (one stride-2 convolution per entry of channels)"
            )
        if not 0 < self.scale <= 1:
            raise ValueError(f"EncoderConfig.scale must be in (0, 1], got {self.scale}")
        if not 1 <= self.latent <= MAX_ENCODER_CHANNELS:
            raise ValueError(f"EncoderConfig.latent must be in [1, {MAX_ENCODER_CHANNELS}]")
        if self.ae_epochs < 1 or self.ae_batch < 1 or self.ae_patience < 0:
            raise ValueError("EncoderConfig: ae_epochs, ae_batch >= 1 and ae_patience >= 0")
        if not 0 < self.ae_lr < 1:
            raise ValueError(f"EncoderConfig.ae_lr must be in (0, 1), got {self.ae_lr}")
        if not 0 < self.ae_val_fraction < 1:
            raise ValueError("EncoderConfig.ae_val_fraction must be in (0, 1)")
        if self.elements > MAX_ENCODER_ELEMENTS:
            raise ValueError(
                f"EncoderConfig: {self.elements} parameters, more than {MAX_ENCODER_ELEMENTS}: "
                "use fewer channels, a smaller latent or a smaller window"
            )
        if self.recon not in RECON_MODES:
            raise ValueError(
                f"EncoderConfig.recon must be one of {', '.join(RECON_MODES)}, got {self.recon!r}"
            )

    @property
    def in_channels(self) -> int:
        return 1 if self.grey else 3

    @property
    def stride(self) -> int:
        """Stride of the grid in resized pixels: 2^len(channels)."""
        return 2 ** len(self.channels)

    @property
    def bottom(self) -> int:
        """Side m of the last feature map of a window, the kernel of the final conv."""
        return self.window // self.stride

    @property
    def elements(self) -> int:
        """Parameters of the encoder and decoder (weights and biases), from the shapes."""
        widths = [self.in_channels, *self.channels]
        convs = sum(a * b * 16 + b for a, b in zip(widths, widths[1:], strict=False))
        deconvs = sum(a * b * 16 + a for a, b in zip(widths, widths[1:], strict=False))
        last = widths[-1] * self.latent * self.bottom**2
        return convs + deconvs + 2 * last + self.latent + widths[-1]

    @property
    def features(self) -> int:
        """Length of a feature vector: the latent code."""
        return self.latent

    @property
    def dims(self) -> int:
        """Length of a row of :func:`sample_crops` (a flattened window): C·w·w."""
        return self.in_channels * self.window * self.window


def encoder_grid_shape(height: int, width: int, cfg: EncoderConfig) -> tuple[int, int]:
    """(gh, gw) of the feature grid of an image of the given full-resolution size."""
    h, w = scaled_size(height, width, cfg.scale)
    if h < cfg.window or w < cfg.window:
        raise ValueError(
            f"image {height}×{width} (×{cfg.scale}) is smaller than the {cfg.window}px window "
            "of the encoder"
        )
    return h // cfg.stride - cfg.bottom + 1, w // cfg.stride - cfg.bottom + 1


def _encoder(cfg: EncoderConfig) -> nn.Sequential:
    layers: list[nn.Module] = []
    c_in = cfg.in_channels
    for c in cfg.channels:
        layers += [nn.Conv2d(c_in, c, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        c_in = c
    layers.append(nn.Conv2d(c_in, cfg.latent, cfg.bottom))
    return nn.Sequential(*layers)


def _decoder(cfg: EncoderConfig) -> nn.Sequential:
    widths = list(reversed(cfg.channels))
    layers: list[nn.Module] = [nn.ConvTranspose2d(cfg.latent, widths[0], cfg.bottom)]
    for c_in, c_out in zip(widths, [*widths[1:], cfg.in_channels], strict=True):
        layers += [nn.LeakyReLU(0.2), nn.ConvTranspose2d(c_in, c_out, 4, stride=2, padding=1)]
    return nn.Sequential(*layers)


class EncoderFeaturizer(nn.Module):
    """(N, 3, H, W) images in [0, 1] -> (N, L, gh, gw) standardised latent codes.

    Parameters: ``encoder``, ``decoder``. Buffers: ``mean``/``inv_std`` (L,) the fitted
    standardisation of the codes (identity until fitted), ``recon_var`` (1,) σ² of the
    reconstruction term, ``recon_gain`` (1,) its weight (0: no term)."""

    mean: Tensor
    inv_std: Tensor
    recon_var: Tensor
    recon_gain: Tensor

    def __init__(self, cfg: EncoderConfig, seed: int = 0) -> None:
        super().__init__()
        self.cfg = cfg
        with torch.random.fork_rng(devices=[]):
            torch.random.default_generator.manual_seed(seed)
            self.encoder = _encoder(cfg)
            self.decoder = _decoder(cfg)
        self.register_buffer("mean", torch.zeros(cfg.latent))
        self.register_buffer("inv_std", torch.ones(cfg.latent))
        self.register_buffer("recon_var", torch.ones(1))
        self.register_buffer("recon_gain", torch.zeros(1))

    @property
    def device(self) -> torch.device:
        return self.mean.device

    @property
    def geometry(self) -> Geometry:
        return Geometry(self.cfg.window, self.cfg.stride, self.cfg.scale)

    def prepare(self, x: Tensor) -> Tensor:
        """(N, 3, H, W) in [0, 1] -> the encoder's input: resized, grey when configured."""
        encoder_grid_shape(x.shape[-2], x.shape[-1], self.cfg)  # a clear error if too small
        x = resize(x, self.cfg.scale)
        return x.mean(dim=1, keepdim=True) if self.cfg.grey else x

    def raw(self, x: Tensor) -> Tensor:
        """(N, 3, H, W) in [0, 1] -> (N, L, gh, gw) codes before standardisation."""
        out: Tensor = self.encoder(self.prepare(x))
        return out

    def forward(self, x: Tensor) -> Tensor:
        return (self.raw(x) - self.mean[:, None, None]) * self.inv_std[:, None, None]

    def reconstruct(self, windows: Tensor) -> Tensor:
        """Windows (n, C, w, w) in [0, 1] -> their reconstructions (n, C, w, w)."""
        out: Tensor = self.decoder(self.encoder(windows))
        return out

    def recon_log_density(self, prepared: Tensor, codes: Tensor) -> Tensor:
        """log N(window; decoder(code), σ² I) of every cell: ``prepared`` (N, C, H', W') the
        encoder's input, ``codes`` (N, L, gh, gw) its raw codes -> (N, gh, gw)."""
        n, latent, gh, gw = codes.shape
        w, s = self.cfg.window, self.cfg.stride
        flat_codes = codes.permute(0, 2, 3, 1).reshape(-1, latent, 1, 1)
        if gh == gw == 1:
            windows = prepared[:, :, :w, :w].reshape(n, -1)
        else:  # (N, C·w·w, gh·gw): the reconstruction of every cell is as large anyway
            windows = F.unfold(prepared, w, stride=s)[..., : gh * gw]
            windows = windows.view(n, -1, gh, gw).permute(0, 2, 3, 1).reshape(n * gh * gw, -1)
        r = torch.cat(
            [
                (self.decoder(c).flatten(1) - x).square().sum(dim=1)
                for c, x in zip(flat_codes.split(4096), windows.split(4096), strict=True)
            ]
        )
        var = self.recon_var.clamp_min(1e-12)
        d = windows.shape[1]
        ll = -r / (2 * var) - 0.5 * d * torch.log(2 * math.pi * var)
        return ll.view(n, gh, gw)

    def featurize(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """(N, 3, H, W) -> (features (N, L, gh, gw), the cells' reconstruction term (N, gh,
        gw) or None when ``recon_gain`` is 0)."""
        prepared = self.prepare(x)
        codes: Tensor = self.encoder(prepared)
        feats = (codes - self.mean[:, None, None]) * self.inv_std[:, None, None]
        if float(self.recon_gain) == 0.0:
            return feats, None
        return feats, self.recon_gain * self.recon_log_density(prepared, codes)

    def set_standardization(self, mean: Tensor, inv_std: Tensor) -> None:
        """Install a fitted standardisation of the codes (shapes (L,), (L,))."""
        d = self.cfg.latent
        if mean.shape != (d,) or inv_std.shape != (d,):
            raise ValueError(f"standardisation shapes must be ({d},), ({d},)")
        with torch.no_grad():
            self.mean.copy_(mean)
            self.inv_std.copy_(inv_std)

    def set_recon(self, var: float, gain: float) -> None:
        """σ² of the reconstruction term and its weight (0: no term)."""
        if not (math.isfinite(var) and var > 0 and math.isfinite(gain) and gain >= 0):
            raise ValueError(f"recon variance must be > 0 and gain >= 0, got {var}, {gain}")
        with torch.no_grad():
            self.recon_var.fill_(var)
            self.recon_gain.fill_(gain)


@torch.no_grad()
def sample_crops(
    images: Sequence[np.ndarray],
    cfg: EncoderConfig,
    per_image: int,
    generator: torch.Generator,
    dequantize: bool = False,
) -> Tensor:
    """``per_image`` random window crops of each RGB uint8 image (resized, grey when
    configured), at any pixel offset: (n, C·w·w) float32 rows in [0, 1], image by image. A
    window-sized image gives its single crop once (repeats would only be duplicates)."""
    rows = []
    w = cfg.window
    for img in images:
        x = resize(to_tensor(np.asarray(img)[None]), cfg.scale)
        if cfg.grey:
            x = x.mean(dim=1, keepdim=True)
        h, wd = x.shape[-2:]
        if h < w or wd < w:
            raise ValueError(f"image {img.shape[:2]} (×{cfg.scale}) is smaller than the window")
        n = 1 if (h, wd) == (w, w) and not dequantize else per_image
        ys = torch.randint(0, h - w + 1, (n,), generator=generator)
        xs = torch.randint(0, wd - w + 1, (n,), generator=generator)
        crops = torch.stack(
            [x[0, :, int(i) : int(i) + w, int(j) : int(j) + w] for i, j in zip(ys, xs, strict=True)]
        )
        if dequantize:
            crops = (crops + torch.rand(crops.shape, generator=generator) / 256.0).clamp_(0, 1)
        rows.append(crops.reshape(n, -1))
    return torch.cat(rows).float()


@dataclass
class AEHistory:
    """Per-epoch mean squared error per value of the autoencoder (training, held out)."""

    train: list[float]
    val: list[float]
    best_epoch: int


def fit_encoder(
    rows: Tensor, cfg: EncoderConfig, seed: int = 0
) -> tuple[EncoderFeaturizer, AEHistory]:
    """Train the autoencoder on crops (n, C·w·w) in [0, 1] (:func:`sample_crops`), keep the
    epoch with the lowest held-out error, then fit the standardisation of the codes (on the
    training rows) and σ² of the reconstruction term (on the held-out rows). The gain of the
    term is 1 for ``recon="density"``, else 0 (``"balanced"`` is set after the flow)."""
    from .cnn import fit_standardization

    if rows.ndim != 2 or rows.shape[1] != cfg.dims:
        raise ValueError(f"rows must be (n, {cfg.dims}), got {tuple(rows.shape)}")
    n = rows.shape[0]
    n_val = min(n - 2, max(1, round(cfg.ae_val_fraction * n)))
    if n_val < 1:
        raise ValueError(f"need at least 3 rows to train an autoencoder, got {n}")
    x = rows.float().view(n, cfg.in_channels, cfg.window, cfg.window)
    x_train, x_val = x[: n - n_val], x[n - n_val :]
    feat = EncoderFeaturizer(cfg, seed=seed).to(rows.device)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam([*feat.encoder.parameters(), *feat.decoder.parameters()], lr=cfg.ae_lr)

    def val_error() -> float:
        with torch.no_grad():
            err = sum(float((feat.reconstruct(b) - b).square().sum()) for b in x_val.split(1024))
        return err / x_val.numel()

    history = AEHistory([], [], 0)
    best, best_state, stale = math.inf, copy.deepcopy(feat.state_dict()), 0
    for epoch in range(cfg.ae_epochs):
        feat.train()
        order = torch.randperm(x_train.shape[0], generator=gen).to(rows.device)
        total = 0.0
        for idx in order.split(cfg.ae_batch):
            b = x_train[idx]
            loss = F.mse_loss(feat.reconstruct(b), b)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * b.shape[0]
        feat.eval()
        history.train.append(total / x_train.shape[0])
        history.val.append(val_error())
        if history.val[-1] < best * (1 - 1e-3):
            best, best_state, stale = history.val[-1], copy.deepcopy(feat.state_dict()), 0
            history.best_epoch = epoch
        else:
            stale += 1
            if stale > cfg.ae_patience:
                break
    feat.load_state_dict(best_state)
    feat.eval()
    with torch.no_grad():
        codes = torch.cat([feat.encoder(b).flatten(1) for b in x_train.split(1024)])
    mean, inv_std = fit_standardization(codes)
    feat.set_standardization(mean, inv_std)
    feat.set_recon(max(best, 1e-8), 1.0 if cfg.recon == "density" else 0.0)
    for p in feat.parameters():
        p.requires_grad_(False)
    return feat, history
