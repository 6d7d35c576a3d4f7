"""The multi-scale window featurizer: fine windows in their coarse context, on the fine grid."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from flowcore.bundle import load_bundle, save_bundle
from flowcore.fit import PRESETS, ScorerSpec, feature_rows, fit_scorer, spec_from_dict, spec_to_dict
from flowcore.flops import flops_per_image
from flowcore.flows import MAFConfig
from flowcore.multiscale import MultiScaleConfig, fit_multiscale, split_rows
from flowcore.training import FitConfig
from flowcore.windows import extract_windows, grid_shape, to_tensor


def images(n: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = rng.integers(40, 220, (n, h // 3 + 1, w // 3 + 1, 3), dtype=np.uint8)
    img = np.repeat(np.repeat(base, 3, axis=1), 3, axis=2)[:, :h, :w].astype(int)
    return np.clip(img + rng.integers(-8, 8, img.shape), 0, 255).astype(np.uint8)


def test_training_rows_and_the_scoring_sweep_are_the_same_map() -> None:
    """With both strides 1, fine cell (i, j) is centred exactly on coarse cell (i-2, j-2) of
    7×7 windows around 3×3 ones: its joint feature must equal the projection of that coarse
    window's training row (fine centre + coarse window)."""
    cfg = MultiScaleConfig(
        window=7, stride=1, components=6, fine_window=3, fine_stride=1, fine_components=4
    )
    x = to_tensor(images(2, 20, 24), dtype=torch.float64)
    rows = extract_windows(x, cfg.sampling_config).float()
    feat = fit_multiscale(rows, cfg).double()
    got = feat(x)  # (2, 5 + 7, gh_fine, gw_fine): each scale's components + residual energy
    d = cfg.features
    assert d == 12
    gh, gw = grid_shape(20, 24, cfg.fine_config)
    assert got.shape == (2, d, gh, gw)
    coarse_rows = extract_windows(x, cfg.sampling_config)  # row-major coarse cells
    cgh, cgw = grid_shape(20, 24, cfg.coarse_config)
    want = feat.project(coarse_rows).view(2, cgh, cgw, d)
    for n in range(2):
        for i in range(2, 2 + cgh):
            for j in range(2, 2 + cgw):
                torch.testing.assert_close(got[n, :, i, j], want[n, i - 2, j - 2])
    # the fine half is the plain projection of the fine window at every cell, edges included
    fine_only = feat.fine(x)
    torch.testing.assert_close(got[:, :5], fine_only)


def test_split_rows_takes_the_centre() -> None:
    cfg = MultiScaleConfig(window=5, components=3, fine_window=3, fine_components=2)
    rows = torch.arange(75, dtype=torch.float32).view(1, 75)
    fine, coarse = split_rows(rows, cfg)
    want = rows.view(1, 3, 5, 5)[:, :, 1:4, 1:4].reshape(1, -1)
    torch.testing.assert_close(fine, want)
    assert coarse is rows


def test_a_multiscale_scorer_fits_scores_round_trips_and_counts_its_flops(tmp_path: Path) -> None:
    imgs = images(6, 60, 72, seed=1)
    spec = ScorerSpec(
        featurizer=MultiScaleConfig(
            window=16, stride=4, components=8, fine_window=6, fine_stride=2, fine_components=4
        ),
        flow=MAFConfig(blocks=2, hidden=16),
        fit=FitConfig(max_epochs=2, batch_size=64),
        windows_per_image=64,
        basis_rows=300,
    )
    assert spec_from_dict(spec_to_dict(spec)) == spec
    sc, _ = fit_scorer(list(imgs[:4]), list(imgs[4:]), spec)
    gen = torch.Generator().manual_seed(0)
    assert feature_rows(sc.featurizer, spec, [imgs[0]], 5, gen).shape == (5, 14)
    sb = sc.score(imgs[:2])
    assert sb.grid.shape == (2, *grid_shape(60, 72, spec.featurizer.fine_config))
    assert sc.geometry.window == 6 and sc.geometry.stride == 2
    assert np.isfinite(sb.grid).all()
    save_bundle(sc, tmp_path / "b")
    back = load_bundle(tmp_path / "b")
    np.testing.assert_allclose(back.score(imgs[:2]).grid, sb.grid, rtol=1e-6)
    fl = flops_per_image(sc, 60, 72)
    assert fl["windows"] == sb.grid.shape[1] * sb.grid.shape[2]
    assert fl["projection"] > 0 and fl["total"] == fl["projection"] + fl["flow"]


def test_a_local_spot_lowers_the_fine_grid_where_it_is() -> None:
    imgs = images(8, 64, 64, seed=2)
    spec = replace(
        PRESETS["grain-multiscale"],
        featurizer=MultiScaleConfig(
            window=20, stride=4, components=12, fine_window=6, fine_stride=2, fine_components=8
        ),
        flow=MAFConfig(blocks=2, hidden=32),
        fit=FitConfig(max_epochs=8, batch_size=128),
        windows_per_image=256,
        basis_rows=2000,
    )
    sc, _ = fit_scorer(list(imgs[:6]), list(imgs[6:]), spec)
    bad = imgs[6].copy()
    bad[30:34, 40:44] = 255
    grid = sc.log_likelihood_grid(bad[None])[0].numpy()
    i, j = np.unravel_index(np.argmin(grid), grid.shape)
    s, w = sc.geometry.stride, sc.geometry.window
    # the least likely fine window overlaps the spot
    assert i * s <= 34 and i * s + w >= 30 and j * s <= 44 and j * s + w >= 40, (i, j)


@pytest.mark.parametrize("bad", [{"fine_window": 46}, {"fine_components": 0}])
def test_bad_configs_are_refused(bad: dict) -> None:
    with pytest.raises(ValueError):
        MultiScaleConfig(**bad)
