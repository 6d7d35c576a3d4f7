"""FLOPs per image counted from a scorer's shapes (multiply-adds count 2). Only the matrix
products are counted (the featurizer's projection or convolutions, and the flow's linear
layers); element-wise work (activations, pooling, normalisation, resampling, exp, log-det
sums, quantiles) is small beside them and left out.

Window featurizer: the projection of every window onto the basis, ``2·cells·d·k``. CNN
featurizer: every ``Conv2d`` and ``Linear`` of the truncated backbone, counted by forward hooks
on one dry run of a zero image of the given size (output elements × input channels per group ×
kernel area)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .cnn import CNNFeaturizer, cnn_grid_shape
from .distill import DistilledFeaturizer
from .encoder import EncoderFeaturizer, encoder_grid_shape
from .flows.bnaf import MaskedWeight
from .multiscale import MultiScaleFeaturizer
from .scorer import FeaturizerModule, Scorer
from .windows import grid_shape, scaled_size

__all__ = ["flow_flops_per_row", "backbone_flops", "featurizer_flops", "flops_per_image"]


def flow_flops_per_row(flow: nn.Module) -> int:
    """FLOPs of one flow evaluation on one feature vector (dense matrix products)."""
    total = 0
    for m in flow.modules():
        if isinstance(m, nn.Linear):
            total += 2 * m.in_features * m.out_features
        elif isinstance(m, MaskedWeight):
            total += 2 * m.weight.shape[0] * m.weight.shape[1]
    return total


@torch.no_grad()
def backbone_flops(featurizer: CNNFeaturizer | EncoderFeaturizer, height: int, width: int) -> int:
    """FLOPs of the CNN featurizer's backbone (or of the autoencoder's encoder) on one
    (height × width) image: the convolutions and linear layers it runs, from the shapes seen
    on a dry run of a zero image. The encoder's reconstruction term (the decoder) is not
    counted."""
    total = 0
    net = featurizer.backbone if isinstance(featurizer, CNNFeaturizer) else featurizer.encoder

    def hook(m: nn.Module, inputs: tuple[Tensor, ...], out: Tensor) -> None:
        nonlocal total
        per_out = 0
        if isinstance(m, nn.Conv2d):
            kh, kw = m.kernel_size
            per_out = m.in_channels // m.groups * kh * kw
        elif isinstance(m, nn.Linear):
            per_out = m.in_features
        total += 2 * per_out * out[0].numel()  # one image: the batch is 1

    handles = [
        m.register_forward_hook(hook) for m in net.modules() if isinstance(m, nn.Conv2d | nn.Linear)
    ]
    try:
        featurizer.raw(torch.zeros(1, 3, height, width, device=featurizer.device))
    finally:
        for h in handles:
            h.remove()
    return total


def featurizer_flops(featurizer: FeaturizerModule, height: int, width: int) -> int:
    """FLOPs of the featurizer on one full-resolution (height × width) image."""
    if isinstance(featurizer, CNNFeaturizer | EncoderFeaturizer):
        return backbone_flops(featurizer, height, width)
    if isinstance(featurizer, DistilledFeaturizer):
        return featurizer.flops(height, width)
    if isinstance(featurizer, MultiScaleFeaturizer):
        h, w = scaled_size(height, width, featurizer.cfg.scale)
        return featurizer_flops(featurizer.fine, h, w) + featurizer_flops(featurizer.coarse, h, w)
    cfg = featurizer.cfg
    gh, gw = grid_shape(height, width, cfg)
    return 2 * gh * gw * cfg.dims * cfg.kept


def flops_per_image(scorer: Scorer, height: int, width: int) -> dict[str, int]:
    """{"windows", "projection", "flow", "total"} for one image of the given size: ``windows``
    is the number of grid cells, ``projection`` the featurizer's FLOPs (the PCA projection of
    the windows, or the CNN backbone's convolutions)."""
    feat = scorer.featurizer
    if isinstance(feat, DistilledFeaturizer):  # the student predicts the grid: no flow
        gh, gw = feat.grid_shape(height, width)
        student = feat.flops(height, width)
        return {"windows": gh * gw, "projection": student, "flow": 0, "total": student}
    if isinstance(feat, CNNFeaturizer):
        gh, gw = cnn_grid_shape(height, width, feat.cfg)
    elif isinstance(feat, MultiScaleFeaturizer):
        gh, gw = feat.grid_shape(height, width)
    elif isinstance(feat, EncoderFeaturizer):
        gh, gw = encoder_grid_shape(height, width, feat.cfg)
    else:
        gh, gw = grid_shape(height, width, feat.cfg)
    windows = gh * gw
    projection = featurizer_flops(scorer.featurizer, height, width)
    assert scorer.flow is not None
    flow = windows * flow_flops_per_row(scorer.flow)
    return {"windows": windows, "projection": projection, "flow": flow, "total": projection + flow}
