"""Gradient maps (DifferNet): where in the image the negative log-likelihood is most sensitive.

For a batch of RGB images x (pixels in [0, 1]) and a scorer whose window log-likelihood grid
is ``ll(x)`` (N, gh, gw), the image's negative log-likelihood is ``NLL(x) = -Σ ll(x)`` over all
of its cells, and its gradient map is

    m = avg-pool( gauss_σ( Σ_channels |∂ NLL / ∂ x| ) )  sampled at the grid's cell centres

- ``∂ NLL / ∂ x`` by backpropagation through the flow and the featurizer to the
  full-resolution pixels (the resize to the featurizer's scale is part of the graph);
- ``|·|`` summed over the three channels: one non-negative value per pixel;
- a Gaussian of ``σ`` full-resolution pixels (default: half a grid stride,
  :func:`default_sigma`), which turns the speckle of a network's input gradient into blobs;
- a box average over one stride × stride footprint around each cell's centre (in
  full-resolution pixels: ``stride / scale``), read at the centres that
  :class:`flowcore.windows.Geometry` gives, so the map has exactly the likelihood grid's
  (gh, gw) shape and :func:`flowcore.scorer.heatmap_to_image` places it the same way.

Higher = more anomalous. Only CNN featurizers (presets ``cnn``, ``cnn-mobilenet``): the
window models' grids are already local (a window's likelihood depends on its pixels only),
and their heatmap is the better map there.

**In the tables.** The ``heatmap`` column holds "low = anomalous" values (log-likelihoods), so
a gradient map is stored negated, ``-m`` (:func:`heatmap_grid`), and its ``heatmap_kind`` is
``gradient``: overlays paint the lowest values, pixel AUROC negates the column, and the
report clips the overlay to the run's own quantiles rather than the model's log-likelihood
clip. The image's summary (``quality``, ``anomaly_score``, percentiles) is always from the
likelihood grid.

The map is computed in float32 on the untransformed image (test-time transforms and a bf16
featurizer change the likelihood grid, not this map), ``batch`` images per backward pass.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .cnn import CNNFeaturizer
from .windows import Geometry, to_tensor

if TYPE_CHECKING:
    from .scorer import Scorer

__all__ = [
    "HEATMAP_KINDS",
    "GradientMapError",
    "check_gradient_support",
    "default_sigma",
    "gaussian_blur",
    "pixel_gradient",
    "pool_to_grid",
    "gradient_map",
    "heatmap_grid",
]

HEATMAP_KINDS: tuple[str, ...] = ("likelihood", "gradient")
"""What the ``heatmap`` column of a scoring run holds: the window log-likelihood grid
(default) or minus the gradient map (CNN models only)."""

GRADIENT_BATCH = 4
"""Images per backward pass (bounds the activations kept for the backward pass)."""


class GradientMapError(ValueError):
    """A model the gradient map is not offered for (one-line message)."""


def check_gradient_support(scorer: Scorer) -> None:
    """Raise :class:`GradientMapError` unless ``scorer``'s featurizer is a CNN."""
    feat = getattr(scorer, "featurizer", None)
    if not isinstance(feat, CNNFeaturizer):
        kind = {
            "WindowFeaturizer": "pixel windows (presets grain-full, grain-quarter)",
            "MultiScaleFeaturizer": "multi-scale windows (preset grain-multiscale)",
            "EncoderFeaturizer": "an autoencoder (preset ae-flow)",
            "DistilledFeaturizer": "a distilled student (no flow to differentiate)",
        }.get(type(feat).__name__, type(feat).__name__)
        raise GradientMapError(
            f"--heatmap gradient needs a CNN featurizer (presets cnn, cnn-mobilenet); this "
            f"model's featurizer is {kind}: use --heatmap likelihood"
        )


def default_sigma(geometry: Geometry) -> float:
    """Half a grid stride in full-resolution pixels (8 px for cnn-mobilenet: stride 8 at
    scale 0.5)."""
    return 0.5 * geometry.stride / geometry.scale


def gaussian_blur(x: Tensor, sigma: float) -> Tensor:
    """Separable Gaussian blur of (N, 1, H, W), kernel ±3σ, edges reflected (σ ≤ 0: none)."""
    if sigma <= 0:
        return x
    radius = max(1, int(math.ceil(3 * sigma)))
    radius = min(radius, x.shape[-2] - 1, x.shape[-1] - 1)
    if radius < 1:
        return x
    t = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    x = F.pad(x, (radius, radius, radius, radius), mode="reflect")
    x = F.conv2d(x, k.view(1, 1, 1, -1))
    return F.conv2d(x, k.view(1, 1, -1, 1))


def pool_to_grid(pixel_map: Tensor, geometry: Geometry, gh: int, gw: int) -> Tensor:
    """(N, H, W) full-resolution map -> (N, gh, gw): the mean over a ``stride / scale`` pixel
    box around each cell's centre (``(i·s + w/2) / scale``, as :class:`Geometry` says),
    interpolated bilinearly between pixel centres, edges held."""
    n, h, w = pixel_map.shape
    size = max(1, int(round(geometry.stride / geometry.scale)))
    x = pixel_map[:, None]
    if size > 1:  # box mean at every pixel (zero padding left out of the mean)
        box = F.avg_pool2d(x, size, stride=1, padding=size // 2, count_include_pad=False)
        x = box[..., :h, :w]  # an even box has one more row/column than the image
        shift = 0.5 if size % 2 == 0 else 0.0  # an even box's mean sits half a pixel up-left
    else:
        shift = 0.0
    s, win, sc = geometry.stride, geometry.window, geometry.scale

    def axis(cells: int, pixels: int) -> Tensor:
        centre = (torch.arange(cells, dtype=x.dtype, device=x.device) * s + win / 2.0) / sc
        idx = centre - 0.5 + shift  # pixel k's centre is at k + 0.5
        return idx * (2.0 / max(pixels - 1, 1)) - 1.0 if pixels > 1 else torch.zeros_like(idx)

    gy, gx = torch.meshgrid(axis(gh, h), axis(gw, w), indexing="ij")
    grid = torch.stack([gx, gy], dim=-1)[None].expand(n, -1, -1, -1)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=True)
    return out[:, 0]


def pixel_gradient(scorer: Scorer, x: Tensor) -> tuple[Tensor, Tensor]:
    """(N, 3, H, W) float images in [0, 1] on the scorer's device -> (∂ NLL / ∂ x of the same
    shape, the (N, gh, gw) window log-likelihood grid), NLL = minus the sum of each image's
    grid (images are independent: one backward pass gives every image's gradient)."""
    x = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        feats = scorer.featurizer(x)
        grid = scorer.grid_from_features(feats)
        nll = -grid.sum()
        (grad,) = torch.autograd.grad(nll, x)
    return grad, grid.detach()


def gradient_map(
    scorer: Scorer,
    images: np.ndarray | Tensor | Sequence[np.ndarray],
    *,
    sigma: float | None = None,
    batch: int = GRADIENT_BATCH,
) -> Tensor:
    """(N, H, W, 3) uint8 RGB images -> the (N, gh, gw) float32 gradient map (higher = more
    anomalous; see the module docstring), on the scorer's device. ``sigma``: the Gaussian's
    width in full-resolution pixels (None: :func:`default_sigma`; 0: no smoothing)."""
    check_gradient_support(scorer)
    if isinstance(images, Sequence) and not isinstance(images, np.ndarray):
        images = np.stack(list(images))
    geometry: Geometry = scorer.geometry
    sig = default_sigma(geometry) if sigma is None else float(sigma)
    dev = scorer.device
    was_training = scorer.training
    scorer.eval()
    outs = []
    try:
        for start in range(0, len(images), max(1, batch)):
            x = to_tensor(images[start : start + max(1, batch)], dev)
            grad, grid = pixel_gradient(scorer, x)
            with torch.no_grad():
                per_pixel = grad.abs().sum(dim=1, keepdim=True)  # (b, 1, H, W)
                smooth = gaussian_blur(per_pixel, sig)[:, 0]
                outs.append(pool_to_grid(smooth, geometry, grid.shape[1], grid.shape[2]))
    finally:
        scorer.train(was_training)
    return torch.cat(outs).float()


def heatmap_grid(
    scorer: Scorer,
    images: np.ndarray | Tensor | Sequence[np.ndarray],
    kind: str,
    likelihood_grid: np.ndarray,
) -> np.ndarray:
    """The ``heatmap`` column's (N, gh, gw) float32 values for one kind of
    :data:`HEATMAP_KINDS`: the likelihood grid as given, or minus the gradient map ("low =
    anomalous", as a log-likelihood)."""
    if kind == "likelihood":
        return likelihood_grid
    if kind != "gradient":
        raise ValueError(f"heatmap must be one of {', '.join(HEATMAP_KINDS)}, not {kind!r}")
    g = gradient_map(scorer, images)
    return (-g).cpu().numpy().astype(np.float32)
