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
    """With both strides 1, 7×7 windows around 3×3 ones: the grid starts 2 fine cells in,
    where cell (i, j) is centred exactly on coarse cell (i, j), and its joint feature must
    equal the projection of that coarse window (its centre + itself)."""
    cfg = MultiScaleConfig(
        window=7, stride=1, components=6, fine_window=3, fine_stride=1, fine_components=4
    )
    x = to_tensor(images(2, 20, 24), dtype=torch.float64)
    rows = extract_windows(x, cfg.sampling_config).float()
    feat = fit_multiscale(rows, cfg).double()
    got = feat(x)  # (2, 5 + 7, gh_fine, gw_fine): each scale's components + residual energy
    d = cfg.features
    assert d == 12
    assert feat.first_cell == 2
    cgh, cgw = grid_shape(20, 24, cfg.coarse_config)
    assert got.shape == (2, d, cgh, cgw) == (2, d, *feat.grid_shape(20, 24))
    coarse_rows = extract_windows(x, cfg.sampling_config)  # row-major coarse cells
    want = feat.project(coarse_rows).view(2, cgh, cgw, d).permute(0, 3, 1, 2)
    torch.testing.assert_close(got, want)
    # the fine half is the plain projection of the fine window, from the third cell on
    torch.testing.assert_close(got[:, :5], feat.fine(x)[:, :, 2 : 2 + cgh, 2 : 2 + cgw])
    # the geometry puts cell (0, 0)'s centre on the first coarse window's centre (3.5, 3.5)
    geo = feat.geometry
    assert geo.window / 2 == 3.5 and geo.stride == 1


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
    rows = feature_rows(sc.featurizer, spec, [imgs[0]], 5, gen)
    assert rows.shape == (5, 14)
    # training rows are cells of the very sweep that scoring runs
    sweep = sc.featurizer(to_tensor(imgs[:1]))[0].reshape(14, -1).T
    for r in rows:
        assert torch.isclose(sweep, r[None]).all(dim=1).any()
    sb = sc.score(imgs[:2])
    assert sb.grid.shape == (2, *sc.featurizer.grid_shape(60, 72))
    # 3 fine cells (6 px) in: the first cell has its whole 16-px context around it
    assert (sc.geometry.window, sc.geometry.stride) == (2 * 6 + 6, 2)
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
    # the least likely fine window (6 px around its centre) overlaps the spot
    ci, cj = i * s + w / 2, j * s + w / 2
    assert abs(ci - 32) <= 5 and abs(cj - 42) <= 5, (ci, cj)


@pytest.mark.parametrize("bad", [{"fine_window": 46}, {"fine_components": 0}])
def test_bad_configs_are_refused(bad: dict) -> None:
    with pytest.raises(ValueError):
        MultiScaleConfig(**bad)
