"""Affine coupling blocks (RealNVP / Glow style) with soft clamping, data -> latent direction.

A block splits x = (x1, x2) and transforms each half conditioned on the other:

    z2 = x2 · exp(c(s1(x1))) + t1(x1),    z1 = x1 · exp(c(s2(z2))) + t2(z2)

where c is DifferNet's soft clamp ``c(s) = (2α/π)·atan(s/α)`` (|c| < α, so exp cannot
overflow) and the (s, t) conditioners are subnets made by a factory ``subnet(c_in, c_out)``.
log|det| = Σ c(s1) + Σ c(s2). Fixed random permutations sit between blocks. Exact inverse.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from .base import Bijector, Chain, Permutation

__all__ = ["SubnetFactory", "mlp_subnet", "soft_clamp", "AffineCoupling", "build_coupling"]

SubnetFactory = Callable[[int, int], nn.Module]


def soft_clamp(s: Tensor, alpha: float) -> Tensor:
    """(2α/π)·atan(s/α): monotone, slope 2/π at 0, bounded by ±α (DifferNet's clamp)."""
    return (2.0 * alpha / math.pi) * torch.atan(s / alpha)


def mlp_subnet(widths: Sequence[int]) -> SubnetFactory:
    """Factory of ReLU MLPs c_in -> widths... -> c_out; the last layer starts at zero, so a
    fresh block is the identity (tests move it away before checking anything)."""

    def make(c_in: int, c_out: int) -> nn.Module:
        layers: list[nn.Module] = []
        prev = c_in
        for w in widths:
            layers += [nn.Linear(prev, w), nn.ReLU()]
            prev = w
        last = nn.Linear(prev, c_out)
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        layers.append(last)
        return nn.Sequential(*layers)

    return make


class AffineCoupling(Bijector):
    """Glow-style double affine coupling x -> z on (batch, D), D >= 2; ladj (batch,)."""

    def __init__(self, features: int, subnet: SubnetFactory, clamp: float = 3.0) -> None:
        super().__init__()
        if features < 2:
            raise ValueError("affine coupling needs at least 2 features")
        if clamp <= 0:
            raise ValueError("clamp must be > 0")
        self.d1 = features // 2
        self.d2 = features - self.d1
        self.clamp = clamp
        self.net1 = subnet(self.d1, 2 * self.d2)  # conditions x2 on x1
        self.net2 = subnet(self.d2, 2 * self.d1)  # conditions x1 on z2

    def _st(self, net: nn.Module, c: Tensor) -> tuple[Tensor, Tensor]:
        s, t = net(c).chunk(2, dim=-1)
        return soft_clamp(s, self.clamp), t

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x1, x2 = x[:, : self.d1], x[:, self.d1 :]
        s1, t1 = self._st(self.net1, x1)
        z2 = x2 * torch.exp(s1) + t1
        s2, t2 = self._st(self.net2, z2)
        z1 = x1 * torch.exp(s2) + t2
        return torch.cat([z1, z2], dim=-1), s1.sum(dim=-1) + s2.sum(dim=-1)

    def inverse(self, z: Tensor) -> Tensor:
        z1, z2 = z[:, : self.d1], z[:, self.d1 :]
        s2, t2 = self._st(self.net2, z2)
        x1 = (z1 - t2) * torch.exp(-s2)
        s1, t1 = self._st(self.net1, x1)
        x2 = (z2 - t1) * torch.exp(-s1)
        return torch.cat([x1, x2], dim=-1)


def build_coupling(
    features: int,
    *,
    blocks: int = 8,
    hidden: Sequence[int] = (256, 256),
    clamp: float = 3.0,
    seed: int = 0,
    subnet: SubnetFactory | None = None,
) -> Chain:
    """``blocks`` affine couplings with fixed random permutations (from ``seed``) between them.
    ``subnet`` overrides the default MLP factory built from ``hidden`` widths."""
    gen = torch.Generator().manual_seed(seed)
    factory = subnet if subnet is not None else mlp_subnet(hidden)
    parts: list[Bijector] = []
    for b in range(blocks):
        if b > 0:
            parts.append(Permutation.random(features, gen))
        parts.append(AffineCoupling(features, factory, clamp))
    return Chain(parts)
