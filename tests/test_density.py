"""The window density covers the whole window (flow on the top k + the probabilistic-PCA
residual), the image statistic behind ``anomaly_score``, per-group calibration, and bundles
written before any of these existed."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from flowcore.bundle import load_bundle, save_bundle
from flowcore.fit import ScorerSpec, calibrate, fit_scorer
from flowcore.flows import MAFConfig, build_flow
from flowcore.scorer import (
    STATISTICS,
    Calibration,
    ImageScore,
    Scorer,
    image_statistics,
    summarize,
    windows_covering,
)
from flowcore.training import FitConfig
from flowcore.windows import Geometry, WindowConfig, fit_window_featurizer, resize, to_tensor

DATA = Path(__file__).parent / "data"


def textured(n: int, h: int, w: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = rng.integers(60, 200, (n, h // 4 + 1, w // 4 + 1, 3), dtype=np.uint8)
    img = np.repeat(np.repeat(base, 4, axis=1), 4, axis=2)[:, :h, :w].astype(int)
    return np.clip(img + rng.integers(-12, 12, img.shape), 0, 255).astype(np.uint8)


def perturbed_flow(features: int, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    flow = build_flow(features, MAFConfig(blocks=2, hidden=8)).double()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return flow.eval()


# ------------------------------------------------------------------ the residual density


def test_residual_term_matches_an_explicit_float64_computation() -> None:
    cfg = WindowConfig(window=7, stride=3, components=10, residual=True)
    imgs = textured(2, 40, 52, seed=1)
    x = to_tensor(imgs, dtype=torch.float64)
    rows = torch.cat(
        [
            x[:, :, i : i + 7, j : j + 7].reshape(2, -1)
            for i in range(0, 30, 2)
            for j in range(0, 40, 3)
        ]
    )
    feat = fit_window_featurizer(rows.float(), cfg)
    assert float(feat.residual_var) > 0
    # float32 path (what scoring runs) against float64 by hand, window by window
    feats, extra = feat.featurize(x.float())
    assert extra is not None and extra.shape == feats.shape[:1] + feats.shape[2:]
    f64 = feat.double()
    mean, basis, inv = f64.mean, f64.basis, f64.inv_scale
    s2 = float(f64.residual_var)
    d, k = cfg.dims, cfg.features
    gh, gw = extra.shape[1:]
    for n in range(2):
        for i in range(gh):
            for j in range(gw):
                win = x[n, :, i * 3 : i * 3 + 7, j * 3 : j * 3 + 7].reshape(-1) - mean
                a = basis.T @ win
                r = float(win @ win - a @ a)
                want = (
                    float(inv.log().sum())
                    - 0.5 * (d - k) * math.log(2 * math.pi * s2)
                    - r / (2 * s2)
                )
                got = float(extra[n, i, j])
                assert abs(got - want) < 1e-3 * max(1.0, abs(want)), (n, i, j, got, want)


def test_residual_var_is_the_mean_discarded_eigenvalue() -> None:
    cfg = WindowConfig(window=3, stride=1, components=4, residual=True, whiten=False)
    rows = torch.from_numpy(
        np.random.default_rng(0).normal(size=(4000, 27)) * np.linspace(0.05, 0.3, 27)
    )
    feat = fit_window_featurizer(rows.float(), cfg)
    eig = torch.linalg.eigvalsh(torch.cov(rows.T.double())).flip(0)
    assert float(feat.residual_var) == pytest.approx(float(eig[4:].mean()), rel=2e-2)


def test_window_density_integrates_to_one() -> None:
    """2×2 windows (d = 12), k = 2: a grid over the flow's two whitened coordinates, and
    importance sampling over the ten discarded ones, of the density the scorer computes from
    a 2×2 image through both convolutions."""
    cfg = WindowConfig(window=2, stride=1, components=2, residual=True)
    gen = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(12, 12, generator=gen, dtype=torch.float64))
    basis, rest = q[:, :2], q[:, 2:]
    mean = torch.rand(12, generator=gen, dtype=torch.float64)
    inv_scale = torch.tensor([3.0, 0.5], dtype=torch.float64)  # whitening's log-det ≠ 0
    s2 = 0.04
    feat = fit_window_featurizer(torch.rand(50, 12, generator=gen), cfg).double()
    feat.set_basis(mean, basis, inv_scale, s2)
    flow = perturbed_flow(2)
    step, half = 0.05, 12.0
    g = torch.arange(-half, half + step / 2, step, dtype=torch.float64)
    ff = torch.stack(torch.meshgrid(g, g, indexing="ij"), -1).reshape(-1, 2)
    sq = 1.3 * s2  # proposal for the residual: a little wider than the model's
    b = torch.randn(ff.shape[0], 10, generator=gen, dtype=torch.float64) * math.sqrt(sq)
    x = mean + (ff / inv_scale) @ basis.T + b @ rest.T  # (n, 12) windows
    imgs = x.view(-1, 3, 2, 2)
    with torch.no_grad():
        feats, extra = feat.featurize(imgs)
        assert extra is not None
        ll = flow.log_prob(feats.reshape(-1, 2)) + extra.reshape(-1)
    log_q = -0.5 * (b.square().sum(1) / sq + 10 * math.log(2 * math.pi * sq))
    # dx = da·db with a = f / inv_scale, so da = df / Π inv_scale
    mass = float(torch.exp(ll - log_q).sum()) * step * step / float(inv_scale.prod())
    assert abs(mass - 1.0) < 2e-2, mass


def test_residual_sees_a_defect_the_top_components_miss() -> None:
    """A dot much smaller than the window barely moves the projection onto a few smooth
    components, but its energy lands in the residual."""
    rng = np.random.default_rng(3)
    smooth = np.stack(
        [
            np.clip(
                120
                + 40 * np.sin(np.linspace(0, rng.uniform(2, 6), 48))[None, :, None]
                + rng.normal(0, 2, (48, 48, 3)),
                0,
                255,
            )
            for _ in range(8)
        ]
    ).astype(np.uint8)
    cfg = WindowConfig(window=16, stride=4, components=6, residual=True)
    x = to_tensor(smooth)
    rows = torch.cat(
        [
            x[:, :, i : i + 16, j : j + 16].reshape(8, -1)
            for i in range(0, 33, 4)
            for j in range(0, 33, 4)
        ]
    )
    feat = fit_window_featurizer(rows, cfg)
    bad = smooth[:1].copy()
    bad[0, 22:25, 22:25] = 255
    _, clean = feat.featurize(to_tensor(smooth[:1]))
    _, hit = feat.featurize(to_tensor(bad))
    assert clean is not None and hit is not None
    assert float((clean - hit).max()) > 50  # nats: the dot's windows become far less likely


def test_scorer_grid_is_flow_plus_residual_and_residual_off_is_the_flow() -> None:
    imgs = textured(6, 44, 44, seed=2)
    for residual in (False, True):
        spec = ScorerSpec(
            featurizer=WindowConfig(window=8, stride=4, components=6, residual=residual),
            flow=MAFConfig(blocks=2, hidden=16),
            fit=FitConfig(max_epochs=2, batch_size=64),
            windows_per_image=32,
            basis_rows=200,
        )
        scorer, _ = fit_scorer(list(imgs[:4]), list(imgs[4:]), spec)
        feats, grid = scorer.features_and_grid(imgs[:2])
        flow_only = scorer.grid_from_features(feats)
        xs = resize(to_tensor(imgs[:2]), 1.0)
        if residual:
            extra = scorer.featurizer.residual_log_prob(xs, feats)
            torch.testing.assert_close(grid, flow_only + extra)
        else:
            torch.testing.assert_close(grid, flow_only)


# ------------------------------------------------------------------ the image statistic


def test_image_statistics_against_numpy() -> None:
    rng = np.random.default_rng(0)
    grid = torch.from_numpy(rng.normal(size=(3, 9, 11)).astype(np.float32))
    geo = Geometry(window=10, stride=5, scale=1.0)
    st = image_statistics(grid, geo, ImageScore(k=7))
    assert set(st) == set(STATISTICS)
    flat = grid.numpy().reshape(3, -1)
    np.testing.assert_allclose(st["neg_mean_k_lowest"], -np.sort(flat, 1)[:, :7].mean(1), 1e-6)
    np.testing.assert_allclose(st["neg_min"], -flat.min(1))
    np.testing.assert_allclose(st["neg_p05"], -np.quantile(flat, 0.05, axis=1), 1e-5)
    p50, p01 = np.quantile(flat, 0.5, axis=1), np.quantile(flat, 0.01, axis=1)
    np.testing.assert_allclose(st["p50_minus_p01"], p50 - p01, 1e-5)
    for name in STATISTICS:
        s = summarize(grid, geo, ImageScore(statistic=name, k=7))
        torch.testing.assert_close(s["anomaly_score"], st[name])
    # without a stored choice (bundles before it): -p05
    torch.testing.assert_close(summarize(grid)["anomaly_score"], -summarize(grid)["p05"])


def test_k_from_the_geometry_covers_a_small_defect() -> None:
    # 460×640 at full resolution, 46-px windows at stride 8: a defect of 0.1 % of the image
    # is a 17-px square, which lies inside ⌊(46-17)/8⌋+1 = 4 windows per axis
    gh, gw = (460 - 46) // 8 + 1, (640 - 46) // 8 + 1
    assert windows_covering(0.001, gh, gw, Geometry(46, 8, 1.0)) == 16
    # a defect wider than the window lies inside none: one window stands for it
    assert windows_covering(0.2, gh, gw, Geometry(46, 8, 1.0)) == 1
    # more image, bigger defect, fewer windows that hold it whole
    small = windows_covering(0.001, 20, 20, Geometry(11, 2, 0.25))
    big = windows_covering(0.001, 200, 200, Geometry(11, 2, 0.25))
    assert small > big >= 1


def test_the_k_lowest_statistic_catches_a_defect_the_fifth_percentile_misses() -> None:
    rng = np.random.default_rng(1)
    normal = torch.from_numpy(rng.normal(0, 1, (40, 50, 70)).astype(np.float32))
    defect = normal.clone()
    defect[20:, 10:12, 20:22] -= 30  # 4 of 3500 windows: a defect of about 0.1 %
    labels = np.r_[np.zeros(20), np.ones(20)]
    grid = torch.cat([normal[:20], defect[20:]])
    geo = Geometry(window=46, stride=8, scale=1.0)
    st = image_statistics(grid, geo, ImageScore())
    from sklearn.metrics import roc_auc_score

    assert roc_auc_score(labels, st["neg_mean_k_lowest"].numpy()) == 1.0
    assert roc_auc_score(labels, st["neg_p05"].numpy()) < 0.8


# ------------------------------------------------------------------ calibration by a column


def _tiny_scorer(seed: int = 0) -> Scorer:
    cfg = WindowConfig(window=4, stride=4, components=3)
    feat = fit_window_featurizer(torch.rand(100, cfg.dims), cfg)
    torch.manual_seed(seed)
    return Scorer(feat, build_flow(3, MAFConfig(blocks=1, hidden=8)), threshold=1.0).eval()


def test_flag_uses_a_group_threshold_and_offset_and_falls_back_to_global() -> None:
    sc = _tiny_scorer()
    sc.calibration = Calibration(by="camera", thresholds={"1": 5.0}, offsets={"1": 2.0})
    score, flag, source = sc.flag(np.array([4.0, 4.0, 4.0, 8.0]), ["1", "2", None, "1"])
    np.testing.assert_allclose(score, [2.0, 4.0, 4.0, 6.0])
    assert flag.tolist() == [False, True, True, True]
    assert source == ["camera=1", "global", "global", "camera=1"]
    # no groups given: everything global, scores untouched
    score, flag, source = sc.flag(np.array([0.5, 2.0]))
    assert flag.tolist() == [False, True] and source == ["global", "global"]


def test_calibrate_by_a_column_gives_each_group_its_offset_and_threshold() -> None:
    sc = _tiny_scorer()
    # camera 2's images are brighter noise: a different baseline of anomaly scores
    rng = np.random.default_rng(0)
    cams = ["1"] * 6 + ["2"] * 6 + ["3"]
    imgs = [rng.integers(100, 140 if c == "1" else 255, (16, 16, 3), dtype=np.uint8) for c in cams]
    cal = calibrate(sc, iter(imgs), 0.9, groups=cams, by="camera")
    assert cal.calibration is not None
    c = cal.calibration
    assert set(c.thresholds) == {"1", "2"}  # camera 3 has one image: global fallback
    raw = np.array(
        [sc.summarize(sc.log_likelihood_grid(i[None]))["anomaly_score"][0].item() for i in imgs]
    )
    for g in ("1", "2"):
        mine = raw[[i for i, v in enumerate(cams) if v == g]]
        assert c.offsets[g] == pytest.approx(np.median(mine) - np.median(raw), abs=1e-4)
        assert c.thresholds[g] == pytest.approx(np.quantile(mine - c.offsets[g], 0.9), abs=1e-4)
    assert abs(c.offsets["2"] - c.offsets["1"]) > 1.0


def test_bundle_round_trip_keeps_statistic_calibration_and_residual(tmp_path: Path) -> None:
    imgs = textured(5, 40, 40, seed=4)
    spec = ScorerSpec(
        featurizer=WindowConfig(window=8, stride=4, components=5, residual=True),
        flow=MAFConfig(blocks=1, hidden=8),
        fit=FitConfig(max_epochs=1, batch_size=64),
        windows_per_image=16,
        basis_rows=100,
        image_statistic="neg_min",
    )
    sc, _ = fit_scorer(list(imgs[:3]), list(imgs[3:]), spec)
    sc.calibration = Calibration(by="camera", thresholds={"a": 1.5}, offsets={"a": -0.25})
    save_bundle(sc, tmp_path / "b")
    back = load_bundle(tmp_path / "b")
    assert back.image_score == ImageScore(statistic="neg_min")
    assert back.calibration == sc.calibration
    assert float(back.featurizer.residual_var) == float(sc.featurizer.residual_var)
    a, b = sc.score(imgs, ["a"] * 5), back.score(imgs, ["a"] * 5)
    np.testing.assert_allclose(a.grid, b.grid)
    np.testing.assert_allclose(a.summary["anomaly_score"], b.summary["anomaly_score"])
    assert b.threshold_source == ["camera=a"] * 5


# ------------------------------------------------------------------ bundles from before


def test_a_format_1_bundle_from_before_the_residual_scores_as_it_always_did() -> None:
    """``tests/data/bundle-format1-windows`` was written by flowscore at 55d5447, with the
    expected scores of two probe images computed by that version."""
    root = DATA / "bundle-format1-windows"
    meta = json.loads((root / "flowscore.json").read_text())
    assert "image_score" not in meta and "residual" not in meta["featurizer"]
    expected = json.loads((DATA / "bundle-format1-windows-expected.json").read_text())
    sc = load_bundle(root)
    assert sc.image_score.statistic == "neg_p05" and sc.calibration is None
    assert not sc.featurizer.cfg.has_residual
    probes = np.stack(
        [np.asarray(Image.open(DATA / f"bundle-format1-windows-probe{i}.png")) for i in (0, 1)]
    )
    sb = sc.score(probes)
    np.testing.assert_allclose(sb.grid, np.asarray(expected["grid"]), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(sb.summary["anomaly_score"], expected["anomaly_score"], atol=1e-4)
    np.testing.assert_allclose(sb.summary["anomaly_score"], -sb.summary["p05"])
    assert sc.threshold == pytest.approx(expected["threshold"])


# ------------------------------------------------------------------ the complexity correction


def test_generic_model_matches_an_explicit_computation_and_ranks_flat_windows_likely() -> None:
    cfg = WindowConfig(window=5, stride=2, components=4, complexity=True)
    imgs = textured(2, 21, 25, seed=5)
    x = to_tensor(imgs, dtype=torch.float64)
    rows = torch.cat(
        [
            x[:, :, i : i + 5, j : j + 5].reshape(2, -1)
            for i in range(0, 16, 3)
            for j in range(0, 20, 3)
        ]
    )
    feat = fit_window_featurizer(rows.float(), cfg).double()
    b = float(feat.complexity_scale)
    # b is the mean |error| inside the fitting windows
    wins = rows.view(-1, 3, 5, 5)
    errs = [
        abs(float(wins[n, c, i, j] - 0.5 * (wins[n, c, i, j - 1] + wins[n, c, i - 1, j])))
        for n in range(wins.shape[0])
        for c in range(3)
        for i in range(1, 5)
        for j in range(1, 5)
    ]
    assert b == pytest.approx(np.mean(errs), rel=1e-5)
    got = feat.generic_log_prob(x)
    xp = torch.nn.functional.pad(x, (1, 0, 1, 0), mode="replicate")
    e = x - 0.5 * (xp[:, :, 1:, :-1] + xp[:, :, :-1, 1:])
    for n in range(2):
        for i in range(got.shape[1]):
            for j in range(got.shape[2]):
                win = e[n, :, 2 * i : 2 * i + 5, 2 * j : 2 * j + 5]
                want = float(-win.abs().sum() / b - 75 * math.log(2 * b))
                assert float(got[n, i, j]) == pytest.approx(want, rel=1e-9, abs=1e-9)
    # a flat window is far more likely under the generic model than textured ones, so the
    # corrected score (log p - log p_generic) of a flat patch drops
    flat = np.full((1, 21, 25, 3), 90, np.uint8)
    assert float(feat.generic_log_prob(to_tensor(flat, dtype=torch.float64)).min()) > float(
        got.max()
    )
    _, extra = feat.featurize(to_tensor(flat, dtype=torch.float64))
    assert extra is not None
    torch.testing.assert_close(extra, -feat.generic_log_prob(to_tensor(flat, dtype=torch.float64)))


def test_a_two_sided_score_flags_images_more_likely_than_normal_ones() -> None:
    sc = _tiny_scorer()
    sc.image_score = ImageScore(statistic="neg_mean_k_lowest", k=4, two_sided=True)
    rng = np.random.default_rng(2)
    normal = [rng.integers(60, 200, (16, 16, 3), dtype=np.uint8) for _ in range(12)]
    cal = calibrate(sc, iter(normal), 0.95)
    assert cal.image_score is not None and cal.image_score.spread is not None
    raw = np.array(
        [-np.sort(sc.log_likelihood_grid(i[None]).reshape(-1).numpy())[:4].mean() for i in normal]
    )
    assert cal.image_score.centre == pytest.approx(float(np.median(raw)), rel=1e-5)
    assert sc.image_score.centre is None  # calibrate reports; install changes the scorer
    cal.install(sc)
    flat = np.full((1, 16, 16, 3), 128, np.uint8)  # far from normal on the likely side
    noisy = rng.integers(0, 256, (1, 16, 16, 3), dtype=np.uint8)
    one_sided = ImageScore(statistic="neg_mean_k_lowest", k=4)
    for odd in (flat, noisy):
        s_raw = float(
            summarize(sc.log_likelihood_grid(odd), sc.geometry, one_sided)["anomaly_score"][0]
        )
        got = sc.score(odd)
        want = abs(s_raw - cal.image_score.centre) / cal.image_score.spread
        assert float(got.summary["anomaly_score"][0]) == pytest.approx(want, rel=1e-4)


def test_the_residual_feature_is_the_same_in_the_sweep_and_in_training_rows() -> None:
    from flowcore.windows import extract_windows

    cfg = WindowConfig(window=6, stride=2, components=5, residual_feature=True)
    assert cfg.features == 6 and cfg.kept == 5
    x = to_tensor(textured(2, 30, 34, seed=6), dtype=torch.float64)
    rows = extract_windows(x, cfg)
    feat = fit_window_featurizer(rows.float(), cfg).double()
    sweep = feat(x)  # (2, 6, gh, gw)
    gh, gw = sweep.shape[-2:]
    want = feat.project(rows).view(2, gh, gw, 6).permute(0, 3, 1, 2)
    torch.testing.assert_close(sweep, want)
    # the last feature is the standardised log residual energy, by hand for one window
    xc = rows[7] - feat.mean
    a = feat.basis.T @ xc
    r = float(xc @ xc - a @ a)
    m, inv = feat.residual_feature_stats.tolist()
    floor = 3 * 36 / (12 * 255.0**2)
    assert float(want.permute(0, 2, 3, 1).reshape(-1, 6)[7, 5]) == pytest.approx(
        (math.log(r + floor) - m) * inv, rel=1e-6
    )
    # on the fitting windows it is standardised
    f = feat.project(rows)[:, 5]
    assert abs(float(f.mean())) < 1e-6 and float(f.std()) == pytest.approx(1.0, rel=1e-3)
