"""Shared fixtures: small fitted scorers built from generated data (nothing downloaded)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

from flowcore.fit import ScorerSpec, fit_scorer  # noqa: E402
from flowcore.flows import MAFConfig  # noqa: E402
from flowcore.scorer import Scorer  # noqa: E402
from flowcore.training import FitConfig  # noqa: E402
from flowcore.windows import WindowConfig  # noqa: E402


def texture(n: int, h: int, w: int, seed: int) -> list[np.ndarray]:
    """Smooth brownish random texture: normal images for the small tests."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        coarse = rng.normal(0, 1, (h // 4 + 2, w // 4 + 2, 1))
        up = np.repeat(np.repeat(coarse, 4, 0), 4, 1)[:h, :w]
        base = np.array([150.0, 110.0, 60.0]) + 25 * up + rng.normal(0, 6, (h, w, 3))
        out.append(np.clip(base, 0, 255).astype(np.uint8))
    return out


@pytest.fixture(scope="session")
def small_scorer() -> Scorer:
    """A window scorer fitted in about a second on generated textures."""
    torch.manual_seed(0)
    spec = ScorerSpec(
        featurizer=WindowConfig(window=8, stride=4, components=16),
        flow=MAFConfig(blocks=2, hidden=32),
        fit=FitConfig(max_epochs=8, batch_size=256, lr=3e-3),
        windows_per_image=200,
        basis_rows=2000,
    )
    scorer, _ = fit_scorer(texture(12, 48, 64, 1), texture(4, 48, 64, 2), spec)
    return scorer
