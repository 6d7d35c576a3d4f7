"""The bijector contract shared by every flow in flowcore.

Direction is always data -> latent (``x -> z``), the direction scoring needs. A bijector's
``forward`` returns ``(z, ladj)`` where ``ladj = log|det dz/dx|`` has shape ``(batch,)``.
A chain sums the log-determinants. ``inverse`` exists only where a closed form does; the
others raise :class:`NotImplementedError` and say so.

A :class:`Flow` puts a standard-normal base density under a bijector:

    log p(x) = log N(z; 0, I) + log|det dz/dx|,   z = f(x).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

__all__ = ["Bijector", "Chain", "Permutation", "Flow", "standard_normal_log_prob"]

_LOG_2PI = math.log(2.0 * math.pi)


class Bijector(nn.Module):
    """x -> z. ``forward`` returns ``(z, ladj)`` with ``ladj = log|det dz/dx|``, shape (batch,)."""

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    def inverse(self, z: Tensor) -> Tensor:
        """z -> x. Raises where no closed-form inverse exists."""
        raise NotImplementedError(f"{type(self).__name__} has no closed-form inverse")


class Chain(Bijector):
    """Composition ``f_n ∘ … ∘ f_1`` applied first to last; log-dets add up."""

    def __init__(self, transforms: Sequence[Bijector]) -> None:
        super().__init__()
        self.transforms = nn.ModuleList(transforms)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        ladj = x.new_zeros(x.shape[0])
        for t in self.transforms:
            x, l_t = t(x)
            ladj = ladj + l_t
        return x, ladj

    def inverse(self, z: Tensor) -> Tensor:
        for t in reversed(self.transforms):
            assert isinstance(t, Bijector)
            z = t.inverse(z)
        return z


class Permutation(Bijector):
    """Fixed permutation of the features: ``z = x[:, perm]``; log-det 0.

    The permutation is a buffer, so it is saved with the model and never re-drawn on load.
    """

    perm: Tensor
    inv_perm: Tensor

    def __init__(self, perm: Tensor) -> None:
        super().__init__()
        perm = torch.as_tensor(perm, dtype=torch.long)
        if sorted(perm.tolist()) != list(range(perm.numel())):
            raise ValueError("Permutation needs a permutation of 0..D-1")
        self.register_buffer("perm", perm)
        self.register_buffer("inv_perm", torch.argsort(perm))

    @classmethod
    def random(cls, features: int, generator: torch.Generator) -> Permutation:
        return cls(torch.randperm(features, generator=generator))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return x[:, self.perm], x.new_zeros(x.shape[0])

    def inverse(self, z: Tensor) -> Tensor:
        return z[:, self.inv_perm]


def standard_normal_log_prob(z: Tensor) -> Tensor:
    """log N(z; 0, I) summed over the last dimension. z: (batch, D) -> (batch,)."""
    return -0.5 * (z.square().sum(dim=-1) + z.shape[-1] * _LOG_2PI)


class Flow(nn.Module):
    """A density on R^D: standard-normal base under a data -> latent bijector."""

    def __init__(self, transform: Bijector, features: int) -> None:
        super().__init__()
        self.transform = transform
        self.features = features
        # the FlowConfig it was built from (set by flowcore.flows.build_flow; None for a flow
        # assembled by hand), so a flow can be saved and rebuilt without its config beside it
        self.config: object | None = None

    def log_prob(self, x: Tensor) -> Tensor:
        """log p(x) for x of shape (batch, D); returns (batch,)."""
        z, ladj = self.transform(x)
        return standard_normal_log_prob(z) + ladj

    def forward(self, x: Tensor) -> Tensor:
        return self.log_prob(x)

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """Draw n samples (needs a closed-form inverse). Returns (n, D)."""
        p = next(self.parameters())
        z = torch.randn(n, self.features, generator=generator, dtype=p.dtype, device=p.device)
        return self.transform.inverse(z)
