"""Scorer: grid of window log-likelihoods and the per-image summary of DESIGN.md."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import texture

from flowcore.fit import ScorerSpec, fit_scorer
from flowcore.flows import MAFConfig
from flowcore.scorer import SUMMARY_COLUMNS, Geometry, heatmap_to_image, summarize
from flowcore.training import FitConfig
from flowcore.windows import WindowConfig, extract_windows, grid_shape, to_tensor


def test_summary_matches_numpy() -> None:
    rng = np.random.default_rng(0)
    grid = rng.normal(-50, 10, (3, 7, 9)).astype(np.float32)
    s = {k: v.numpy() for k, v in summarize(torch.from_numpy(grid)).items()}
    assert tuple(s) == SUMMARY_COLUMNS
    flat = grid.reshape(3, -1).astype(np.float64)
    for p in (1, 5, 10, 25, 50, 75, 90, 95, 99):
        np.testing.assert_allclose(s[f"p{p:02d}"], np.percentile(flat, p, axis=1), rtol=1e-5)
    np.testing.assert_allclose(s["ll_mean"], flat.mean(1), rtol=1e-5)
    np.testing.assert_allclose(s["ll_std"], flat.std(1), rtol=1e-4)
    np.testing.assert_allclose(s["ll_min"], flat.min(1), rtol=1e-6)
    np.testing.assert_allclose(s["ll_max"], flat.max(1), rtol=1e-6)
    np.testing.assert_allclose(
        s["quality"], (np.percentile(flat, 25, 1) + np.percentile(flat, 50, 1)) / 2, rtol=1e-5
    )
    np.testing.assert_allclose(s["anomaly_score"], -np.percentile(flat, 5, 1), rtol=1e-5)


def test_grid_is_flow_density_of_each_window(small_scorer) -> None:
    imgs = np.stack(texture(2, 40, 52, 7))
    grid = small_scorer.log_likelihood_grid(imgs)
    cfg = small_scorer.featurizer.cfg
    gh, gw = grid_shape(40, 52, cfg)
    assert grid.shape == (2, gh, gw) and grid.dtype == torch.float32
    # reference in float64: explicit windows, projection, flow density
    ref_model = small_scorer.double()
    try:
        rows = extract_windows(to_tensor(imgs, dtype=torch.float64), cfg)
        f = ref_model.featurizer
        feats = ((rows - f.mean) @ f.basis) * f.inv_scale
        with torch.no_grad():
            ref = ref_model.flow.log_prob(feats).view(2, gh, gw)
    finally:
        small_scorer.float()
    torch.testing.assert_close(grid.double(), ref, rtol=1e-4, atol=1e-3)


def test_batching_does_not_change_scores(small_scorer) -> None:
    imgs = np.stack(texture(5, 48, 64, 9))
    together = small_scorer.score(imgs)
    small_scorer.chunk_rows = 37  # odd chunking of the flow pass
    try:
        alone = [small_scorer.score(imgs[i : i + 1]) for i in range(5)]
    finally:
        small_scorer.chunk_rows = 4096
    np.testing.assert_allclose(
        together.grid, np.concatenate([a.grid for a in alone]), rtol=1e-5, atol=1e-4
    )
    for k in SUMMARY_COLUMNS:
        np.testing.assert_allclose(
            together.summary[k], np.concatenate([a.summary[k] for a in alone]), rtol=1e-5, atol=1e-4
        )


def test_threshold_flags_anomalous_images(small_scorer) -> None:
    normal = np.stack(texture(6, 48, 64, 11))
    odd = normal.copy()
    # a dark, high-contrast speckled blotch over ~16 % of the image
    rng = np.random.default_rng(0)
    odd[:, 10:30, 20:44] = rng.choice([10, 240], size=(6, 20, 24, 1)).astype(np.uint8)
    sb_n, sb_o = small_scorer.score(normal), small_scorer.score(odd)
    assert np.isfinite(small_scorer.threshold)
    assert sb_o.is_anomaly.all()
    assert sb_n.is_anomaly.mean() <= 0.5
    assert (sb_o.summary["anomaly_score"] > sb_n.summary["anomaly_score"]).all()
    # the heatmap is lowest where the blotch is
    g = sb_o.grid[0]
    up = heatmap_to_image(g, small_scorer.geometry, 48, 64).numpy()
    inside, outside = up[12:28, 22:42].mean(), up[40:, :].mean()
    assert inside < outside - 5


def test_heatmap_to_image_places_cells_at_window_centres() -> None:
    geo = Geometry(window=8, stride=4, scale=1.0)
    g = np.zeros((5, 6), np.float32)
    g[2, 3] = 10.0
    up = heatmap_to_image(g, geo, 24, 28).numpy()
    assert up.shape == (24, 28)
    cy, cx = np.unravel_index(up.argmax(), up.shape)
    # cell (2, 3) covers rows 8..15, cols 12..19: centre at pixel (11.5, 15.5)
    assert abs(cy - 11.5) <= 0.5 and abs(cx - 15.5) <= 0.5
    np.testing.assert_allclose(
        heatmap_to_image(np.full((5, 6), 3.0, np.float32), geo, 24, 28).numpy(), 3.0
    )


def test_fit_uses_held_out_images_for_validation_and_threshold() -> None:
    spec = ScorerSpec(
        featurizer=WindowConfig(window=6, stride=3, components=8),
        flow=MAFConfig(blocks=1, hidden=16),
        fit=FitConfig(max_epochs=3),
        windows_per_image=50,
        basis_rows=500,
    )
    train, val = texture(4, 30, 30, 1), texture(3, 30, 30, 2)
    scorer, rep = fit_scorer(train, val, spec)
    assert (rep.train_windows, rep.val_windows) == (200, 150)
    sb = scorer.score(np.stack(val))
    assert rep.threshold == pytest.approx(float(np.quantile(sb.summary["anomaly_score"], 0.99)))
    lo, hi = rep.heatmap_clip
    assert lo < hi and lo == pytest.approx(float(np.quantile(sb.grid, 0.001)), rel=1e-5)
    with pytest.raises(ValueError, match="held-out"):
        fit_scorer(train, [], spec)


@pytest.mark.gpu
def test_scorer_on_cuda_matches_cpu(small_scorer) -> None:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    imgs = np.stack(texture(2, 48, 64, 3))
    cpu = small_scorer.score(imgs)
    small_scorer.to("cuda")
    try:
        gpu = small_scorer.score(imgs)
    finally:
        small_scorer.to("cpu")
    np.testing.assert_allclose(cpu.grid, gpu.grid, rtol=1e-3, atol=1e-2)


def _by_hand(scorer, x: np.ndarray, names: tuple[str, ...]) -> torch.Tensor:
    """Mean grid over test-time transforms, each undone on the grid, computed here."""
    t = torch.from_numpy(x)
    ops = {
        "identity": (lambda a: a, lambda g: g),
        "hflip": (lambda a: a.flip(2), lambda g: g.flip(2)),
        "vflip": (lambda a: a.flip(1), lambda g: g.flip(1)),
        "rot180": (lambda a: a.flip(1, 2), lambda g: g.flip(1, 2)),
        "brighter": (
            lambda a: (a.float() * 1.04).round().clamp(0, 255).to(torch.uint8),
            lambda g: g,
        ),
    }
    scorer.transforms = 1
    grids = [scorer.log_likelihood_grid(ops[n][0](t).numpy()) for n in names]
    grids = [ops[n][1](g) for n, g in zip(names, grids, strict=True)]
    return torch.stack(grids).mean(0)


def test_test_time_transforms_average_the_undone_grids(small_scorer) -> None:
    x = np.stack(texture(3, 48, 64, 9))
    try:
        small_scorer.transforms = 5
        got = small_scorer.log_likelihood_grid(x)
        want = _by_hand(small_scorer, x, ("identity", "hflip", "vflip", "rot180", "brighter"))
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
        # the 90° turns of a non-square image come back in its own layout
        small_scorer.transforms = 8
        grid8 = small_scorer.log_likelihood_grid(x)
        small_scorer.transforms = 1
        plain = small_scorer.log_likelihood_grid(x)
        assert grid8.shape == plain.shape and torch.isfinite(grid8).all()
        assert not torch.allclose(grid8, plain)
        # the summary and flags follow the averaged grid
        small_scorer.transforms = 5
        sb = small_scorer.score(x)
        np.testing.assert_allclose(sb.grid, got.numpy(), rtol=1e-5, atol=1e-4)
    finally:
        small_scorer.transforms = 1


def test_threshold_is_calibrated_with_the_models_test_time_transforms() -> None:
    spec = ScorerSpec(
        featurizer=WindowConfig(window=6, stride=3, components=8),
        flow=MAFConfig(blocks=1, hidden=16),
        fit=FitConfig(max_epochs=2),
        windows_per_image=50,
        basis_rows=500,
        test_transforms=3,
    )
    train, val = texture(4, 30, 30, 1), texture(3, 30, 30, 2)
    scorer, rep = fit_scorer(train, val, spec)
    assert scorer.transforms == 3
    scores = scorer.score(np.stack(val)).summary["anomaly_score"]
    assert rep.threshold == pytest.approx(float(np.quantile(scores, 0.99)), rel=1e-5)
    scorer.transforms = 1
    plain = scorer.score(np.stack(val)).summary["anomaly_score"]
    assert not np.allclose(plain, scores)
    with pytest.raises(ValueError, match="test_transforms"):
        ScorerSpec(featurizer=WindowConfig(), test_transforms=9)
