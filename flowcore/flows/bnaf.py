"""Block neural autoregressive flow (De Cao, Titov & Aziz, 2019), data -> latent direction.

Each BNAF transform is a monotone, block-autoregressive MLP R^D -> R^D:

    MaskedWeight(D -> a·D), tanh, [MaskedWeight(a·D -> a·D), tanh]*, MaskedWeight(a·D -> D)

where the weight matrices are block lower-triangular: block (i, j) is free for j < i, positive
(``exp`` of a parameter) for j = i and zero for j > i; each row is weight-normalised. The
Jacobian dz/dx is lower triangular, its diagonal entry d is the product along the chain of the
d-th diagonal blocks and the tanh derivatives, so log|det| is computed exactly in log space
with log-sum-exp products of the (positive) diagonal blocks. There is no closed-form inverse.

The network's last layer mixes bounded tanh units, so on its own the map is onto a bounded set
and the density would miss mass. As in the paper's reference code, a gated residual fixes it:
``z = σ(γ)·net(x) + (1 - σ(γ))·x`` is still monotone and block-triangular, now onto R^D, with
diagonal derivative ``σ(γ)·net'_d + (1 - σ(γ))``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import Bijector, Chain, Permutation

__all__ = ["MaskedWeight", "BNAFTransform", "build_bnaf"]


def _log_tanh_grad(x: Tensor) -> Tensor:
    """log(1 - tanh(x)^2) computed stably: 2·(log 2 - x - softplus(-2x))."""
    return 2.0 * (math.log(2.0) - x - F.softplus(-2.0 * x))


class MaskedWeight(nn.Module):
    """Block lower-triangular weight-normalised linear map, D blocks of a_in -> a_out units.

    ``forward(x, g)`` takes activations x (batch, D·a_in) and the log-gradients
    g (batch, D, a_in) of each unit of block d with respect to input feature d, and returns
    (y, g') with y (batch, D·a_out) and g' (batch, D, a_out).
    """

    diag_mask: Tensor
    tril_mask: Tensor

    def __init__(self, features: int, a_in: int, a_out: int) -> None:
        super().__init__()
        self.features, self.a_in, self.a_out = features, a_in, a_out
        n_in, n_out = features * a_in, features * a_out
        blk_out = torch.arange(n_out) // a_out
        blk_in = torch.arange(n_in) // a_in
        self.register_buffer("diag_mask", (blk_out[:, None] == blk_in[None, :]).float())
        self.register_buffer("tril_mask", (blk_out[:, None] > blk_in[None, :]).float())
        weight = torch.zeros(n_out, n_in)
        for d in range(features):  # per-block init, as the paper's reference
            nn.init.xavier_uniform_(weight[d * a_out : (d + 1) * a_out, : (d + 1) * a_in])
        self.weight = nn.Parameter(weight)
        self.log_norm = nn.Parameter(torch.log(torch.rand(n_out, 1) * 0.9 + 0.1))
        self.bias = nn.Parameter(
            torch.empty(n_out).uniform_(-1.0 / math.sqrt(n_out), 1.0 / math.sqrt(n_out))
        )

    def _weights(self) -> tuple[Tensor, Tensor]:
        """Return the effective weight (n_out, n_in) and the log of its diagonal blocks
        shaped (D, a_out, a_in)."""
        w = torch.exp(self.weight) * self.diag_mask + self.weight * self.tril_mask
        w_sq_norm = w.square().sum(dim=-1, keepdim=True)
        w_eff = torch.exp(self.log_norm) * w * torch.rsqrt(w_sq_norm)
        log_diag = self.weight + self.log_norm - 0.5 * torch.log(w_sq_norm)
        d, ai, ao = self.features, self.a_in, self.a_out
        log_diag = log_diag.view(d, ao, d, ai).diagonal(dim1=0, dim2=2).permute(2, 0, 1)
        return w_eff, log_diag

    def forward(self, x: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
        w, log_diag = self._weights()
        y = F.linear(x, w, self.bias)
        # g'[b, d, o] = logsumexp_i(log_diag[d, o, i] + g[b, d, i])
        g_new = torch.logsumexp(log_diag.unsqueeze(0) + g.unsqueeze(2), dim=-1)
        return y, g_new


class BNAFTransform(Bijector):
    """One BNAF transform x -> z (batch, D); ladj (batch,). No inverse."""

    def __init__(self, features: int, hidden_factor: int = 12, hidden_layers: int = 1) -> None:
        super().__init__()
        if hidden_factor < 1 or hidden_layers < 1:
            raise ValueError("BNAF needs hidden_factor >= 1 and hidden_layers >= 1")
        self.features = features
        dims = [1] + [hidden_factor] * hidden_layers + [1]
        self.layers = nn.ModuleList(
            MaskedWeight(features, a, b) for a, b in zip(dims[:-1], dims[1:], strict=True)
        )
        self.gate = nn.Parameter(torch.zeros(()))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        g = x.new_zeros(x.shape[0], self.features, 1)
        h = x
        last = len(self.layers) - 1
        for k, layer in enumerate(self.layers):
            h, g = layer(h, g)
            if k < last:
                g = g + _log_tanh_grad(h).view(h.shape[0], self.features, -1)
                h = torch.tanh(h)
        log_a = F.logsigmoid(self.gate)
        log_1ma = F.logsigmoid(-self.gate)
        a = torch.exp(log_a)
        z = a * h + (1.0 - a) * x
        log_diag = torch.logaddexp(log_a + g.squeeze(-1), log_1ma)
        return z, log_diag.sum(dim=-1)


def build_bnaf(
    features: int,
    *,
    flows: int = 6,
    hidden_factor: int = 12,
    hidden_layers: int = 1,
    seed: int = 0,
) -> Chain:
    """BNAF: ``flows`` transforms with random permutations (from ``seed``) between them.

    Hidden width is ``hidden_factor · D`` units per layer (the default 12·D)."""
    gen = torch.Generator().manual_seed(seed)
    parts: list[Bijector] = []
    for f in range(flows):
        if f > 0:
            parts.append(Permutation.random(features, gen))
        parts.append(BNAFTransform(features, hidden_factor, hidden_layers))
    return Chain(parts)
