"""FLOPs per image counted from a scorer's shapes (multiply-adds count 2). Only the matrix
products are counted (projection and the flow's linear layers); element-wise work
(activations, exp, log-det sums, quantiles) is small beside them and left out."""

from __future__ import annotations

from torch import nn

from .flows.bnaf import MaskedWeight
from .scorer import Scorer
from .windows import grid_shape

__all__ = ["flow_flops_per_row", "flops_per_image"]


def flow_flops_per_row(flow: nn.Module) -> int:
    """FLOPs of one flow evaluation on one feature vector (dense matrix products)."""
    total = 0
    for m in flow.modules():
        if isinstance(m, nn.Linear):
            total += 2 * m.in_features * m.out_features
        elif isinstance(m, MaskedWeight):
            total += 2 * m.weight.shape[0] * m.weight.shape[1]
    return total


def flops_per_image(scorer: Scorer, height: int, width: int) -> dict[str, int]:
    """{"projection", "flow", "total", "windows"} for one image of the given size."""
    cfg = scorer.featurizer.cfg
    gh, gw = grid_shape(height, width, cfg)
    windows = gh * gw
    projection = 2 * windows * cfg.dims * cfg.features
    flow = windows * flow_flops_per_row(scorer.flow)
    return {"windows": windows, "projection": projection, "flow": flow, "total": projection + flow}
