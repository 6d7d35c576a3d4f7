"""Masked autoregressive flow (Papamakarios et al., 2017), data -> latent direction.

One MADE computes, for each feature i, a shift and a log-scale from the features that come
before i in its order:

    z_i = (x_i - mu_i(x_<i)) * exp(-alpha_i(x_<i)),    log|det dz/dx| = -sum_i alpha_i.

The Jacobian is triangular (in the MADE's order), so the density is one network pass; the
inverse needs D passes. Between MADEs a batch-norm bijector keeps activations in range; it
uses batch statistics in training and running statistics in evaluation (``.eval()``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import Bijector, Chain

__all__ = ["MaskedLinear", "MADE", "BatchNormBijector", "build_maf"]


class MaskedLinear(nn.Linear):
    """Linear layer whose weight is multiplied by a fixed 0/1 mask (a buffer)."""

    mask: Tensor

    def __init__(self, mask: Tensor, bias: bool = True) -> None:
        out_features, in_features = mask.shape
        super().__init__(in_features, out_features, bias=bias)
        self.register_buffer("mask", mask.to(self.weight.dtype))

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight * self.mask, self.bias)


class MADE(Bijector):
    """One autoregressive affine layer x -> z, conditioner = masked MLP with ReLU units.

    ``order``: a permutation of 0..D-1; feature ``order[k]`` is the k-th in the autoregressive
    order. Stored as a buffer with the model. Shapes: x, z (batch, D); ladj (batch,).
    """

    order: Tensor
    degrees: Tensor

    def __init__(self, features: int, hidden: int, layers: int, order: Tensor) -> None:
        super().__init__()
        if features < 1 or hidden < 1 or layers < 1:
            raise ValueError("MADE needs features, hidden and layers >= 1")
        order = torch.as_tensor(order, dtype=torch.long)
        if sorted(order.tolist()) != list(range(features)):
            raise ValueError(f"order must be a permutation of 0..{features - 1}")
        self.features = features
        self.register_buffer("order", order)
        # degree of input feature i = its 1-based position in the order
        degrees = torch.empty(features, dtype=torch.long)
        degrees[order] = torch.arange(1, features + 1)
        self.register_buffer("degrees", degrees)

        hidden_deg = torch.arange(hidden) % max(1, features - 1) + 1
        net: list[nn.Module] = []
        prev = degrees
        for _ in range(layers):
            net += [MaskedLinear((hidden_deg[:, None] >= prev[None, :]).float()), nn.ReLU()]
            prev = hidden_deg
        self.hidden = nn.Sequential(*net)
        out_mask = (degrees[:, None] > prev[None, :]).float()
        self.out = MaskedLinear(torch.cat([out_mask, out_mask], dim=0))

    def _params(self, x: Tensor) -> tuple[Tensor, Tensor]:
        mu, alpha = self.out(self.hidden(x)).chunk(2, dim=-1)
        return mu, alpha

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        mu, alpha = self._params(x)
        z = (x - mu) * torch.exp(-alpha)
        return z, -alpha.sum(dim=-1)

    def inverse(self, z: Tensor) -> Tensor:
        x = torch.zeros_like(z)
        for i in self.order.tolist():
            mu, alpha = self._params(x)
            x = x.clone()
            x[:, i] = z[:, i] * torch.exp(alpha[:, i]) + mu[:, i]
        return x


class BatchNormBijector(Bijector):
    """Batch normalisation as a bijector (MAF paper, eq. 18), x -> z, shapes (batch, D).

    z = (x - m) / sqrt(v + eps) * exp(log_gamma) + beta; log|det| = sum(log_gamma - ½log(v+eps)).
    Training: m, v are the batch's (and update the running estimates). Evaluation: running.
    """

    running_mean: Tensor
    running_var: Tensor

    def __init__(self, features: int, momentum: float = 0.1, eps: float = 1e-5) -> None:
        super().__init__()
        self.momentum = momentum
        self.eps = eps
        self.log_gamma = nn.Parameter(torch.zeros(features))
        self.beta = nn.Parameter(torch.zeros(features))
        self.register_buffer("running_mean", torch.zeros(features))
        self.register_buffer("running_var", torch.ones(features))

    def _stats(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if self.training and x.shape[0] > 1:
            mean = x.mean(dim=0)
            var = x.var(dim=0, unbiased=False)
            with torch.no_grad():
                self.running_mean.lerp_(mean.detach(), self.momentum)
                self.running_var.lerp_(var.detach(), self.momentum)
            return mean, var
        return self.running_mean, self.running_var

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        mean, var = self._stats(x)
        inv_std = torch.rsqrt(var + self.eps)
        z = (x - mean) * (inv_std * torch.exp(self.log_gamma)) + self.beta
        ladj = (self.log_gamma + torch.log(inv_std)).sum().expand(x.shape[0])
        return z, ladj

    def inverse(self, z: Tensor) -> Tensor:
        std = torch.sqrt(self.running_var + self.eps)
        return (z - self.beta) * torch.exp(-self.log_gamma) * std + self.running_mean


def build_maf(
    features: int,
    *,
    blocks: int = 5,
    hidden: int = 100,
    layers: int = 1,
    batch_norm: bool = True,
    seed: int = 0,
) -> Chain:
    """MAF: ``blocks`` MADEs (first in natural order, the rest in random orders drawn from
    ``seed``), with a batch-norm bijector between consecutive MADEs."""
    gen = torch.Generator().manual_seed(seed)
    parts: list[Bijector] = []
    for b in range(blocks):
        order = torch.arange(features) if b == 0 else torch.randperm(features, generator=gen)
        if b > 0 and batch_norm:
            parts.append(BatchNormBijector(features))
        parts.append(MADE(features, hidden, layers, order))
    return Chain(parts)
