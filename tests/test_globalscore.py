"""The global score (flowcore.globalscore): descriptors and distances against explicit float64
computations, out-of-fold fitting, the combined image score, bundles and evaluation."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from flowcore.bundle import BundleError, load_bundle, save_bundle
from flowcore.fit import ScorerSpec, fit_global_score, fit_scorer
from flowcore.flows import MAFConfig
from flowcore.globalscore import (
    DESCRIPTOR_FLOOR,
    GlobalScore,
    descriptors,
    fit_descriptor_model,
    out_of_fold_distances,
)
from flowcore.spec import ConfigError, spec_from_dict, spec_to_dict
from flowcore.training import FitConfig
from flowcore.windows import WindowConfig
from pipelines.evaluation import Evaluator


def test_descriptors_are_the_log_variance_of_each_channel_over_the_grid() -> None:
    gen = torch.Generator().manual_seed(0)
    feats = torch.randn(3, 5, 4, 6, generator=gen, dtype=torch.float64) * torch.arange(1, 6).view(
        1, 5, 1, 1
    )
    got = descriptors(feats).numpy()
    f = feats.numpy()
    for n in range(3):
        for c in range(5):
            want = np.log(np.var(f[n, c].reshape(-1)) + DESCRIPTOR_FLOOR)
            assert got[n, c] == pytest.approx(want, abs=1e-5)  # float32 arithmetic
    # a channel that never varies gets the floor, not -inf
    assert descriptors(torch.zeros(1, 2, 3, 3))[0, 0] == pytest.approx(np.log(DESCRIPTOR_FLOOR))


def test_the_distance_is_the_mahalanobis_distance_under_the_sample_covariance() -> None:
    rng = np.random.default_rng(1)
    a = rng.normal(size=(6, 6))
    x = rng.normal(size=(40, 6)) @ a + 3.0  # correlated, full rank; c = min(32, 20, 6) = 6
    mean, proj = fit_descriptor_model(x)
    assert proj.shape == (6, 6)
    cov = np.cov(x.T)  # ddof = 1
    inv = np.linalg.inv(cov)
    probe = rng.normal(size=(7, 6)) * 2 + 3
    for d in probe:
        want = float(np.sqrt((d - x.mean(0)) @ inv @ (d - x.mean(0))))
        got = float(np.linalg.norm(proj @ (d - mean)))
        assert got == pytest.approx(want, rel=1e-9)
    # fewer images than dimensions: at most half the images' worth of components
    _, proj_small = fit_descriptor_model(x[:8])
    assert proj_small.shape == (4, 6)


def test_out_of_fold_distances_come_from_models_without_the_image() -> None:
    rng = np.random.default_rng(2)
    x = rng.normal(size=(20, 4))
    oof = out_of_fold_distances(x, folds=5)
    # fold 0 is the first 4 images (contiguous folds): refit without them by hand
    mean, proj = fit_descriptor_model(x[4:])
    want = np.linalg.norm((x[:4] - mean) @ proj.T, axis=1)
    np.testing.assert_allclose(oof[:4], want, rtol=1e-12)
    # the in-sample distances are smaller: the model has seen those images
    m_all, p_all = fit_descriptor_model(x)
    assert np.linalg.norm((x - m_all) @ p_all.T, axis=1).mean() < oof.mean()


def test_combine_takes_the_larger_standardised_view_and_keeps_nan() -> None:
    gs = GlobalScore(2, 1, tail_centre=1.0, tail_spread=2.0, centre=3.0, spread=0.5)
    got = gs.combine(np.array([5.0, 1.0, np.nan]), np.array([3.0, 4.0, 3.0]))
    np.testing.assert_allclose(got[:2], [2.0, 2.0])  # (5-1)/2 beats 0; (4-3)/0.5 beats 0
    assert np.isnan(got[2])
    with pytest.raises(ValueError, match="components"):
        GlobalScore(2, 3)
    with pytest.raises(ValueError, match="spread"):
        GlobalScore(2, 1, spread=0.0)


def _views(n: int, rng: np.random.Generator, contrast: tuple[float, float]) -> list[np.ndarray]:
    """Grey blocky textures, re-lit with a contrast drawn from ``contrast``."""
    out = []
    for _ in range(n):
        base = rng.integers(40, 216, (11, 11)).astype(float)
        img = np.kron(base, np.ones((4, 4)))[:40, :40]
        img += rng.normal(0, 6, img.shape)
        c = rng.uniform(*contrast)
        img = 128 + c * (img - 128)
        grey = np.clip(img, 0, 255).astype(np.uint8)
        out.append(np.repeat(grey[:, :, None], 3, axis=2))
    return out


def _spec(**kw: object) -> ScorerSpec:
    return ScorerSpec(
        featurizer=WindowConfig(window=8, stride=4, components=6, residual=True),
        flow=MAFConfig(blocks=1, hidden=16),
        fit=FitConfig(max_epochs=3, batch_size=128),
        windows_per_image=32,
        basis_rows=400,
        dequantize=True,
        **kw,  # type: ignore[arg-type]
    )


def test_a_washed_out_image_that_the_tail_calls_normal_is_flagged_by_the_global_score(
    tmp_path: Path,
) -> None:
    rng = np.random.default_rng(3)
    train, val = _views(16, rng, (0.9, 1.1)), _views(6, rng, (0.9, 1.1))
    normal, washed = _views(8, rng, (0.9, 1.1)), _views(6, rng, (0.45, 0.5))
    sc, _ = fit_scorer(train, val, _spec(image_global=True))
    assert sc.global_score is not None and sc.global_score.components == 6  # every channel
    got_n = sc.score(np.stack(normal)).summary["anomaly_score"]
    got_w = sc.score(np.stack(washed)).summary["anomaly_score"]
    assert got_w.min() > got_n.max()
    assert sc.score(np.stack(washed)).is_anomaly.all()

    # the tail statistic alone ranks the washed-out images as the *more* normal ones
    def tail(ims: list[np.ndarray]) -> torch.Tensor:
        return sc.summarize(sc.log_likelihood_grid(np.stack(ims)))["anomaly_score"]

    assert float(tail(washed).mean()) < float(tail(normal).mean())
    # the score is the larger of the two standardised views, by hand
    gs = sc.global_score
    t = tail(washed).numpy().astype(np.float64)
    g = gs.distance(sc.features(np.stack(washed))).numpy()
    want = np.maximum((t - gs.tail_centre) / gs.tail_spread, (g - gs.centre) / gs.spread)
    np.testing.assert_allclose(got_w, want, rtol=1e-4)
    # round trip through a bundle: same scores; the JSON holds the settings
    save_bundle(sc, tmp_path / "b")
    back = load_bundle(tmp_path / "b")
    assert back.global_score is not None
    assert back.global_score.as_dict() == gs.as_dict()
    np.testing.assert_allclose(
        back.score(np.stack(washed)).summary["anomaly_score"], got_w, rtol=1e-6
    )
    # the evaluator joins the same distance into the flow's image score
    ev = Evaluator({}, sc.geometry, image_score=sc.image_score, global_score=gs)
    ims = np.stack(normal + washed)
    feats, grid = sc.features_and_grid(ims)
    ev.add(
        grid.detach().numpy(),
        feats.detach().numpy(),
        [0] * 8 + [1] * 6,
        [None] * 14,
        40,
        40,
        global_distance=gs.distance(feats).numpy(),
    )
    res = ev.result()
    assert res.methods["flow"].image_auroc == pytest.approx(1.0)
    assert res.by_statistic["global_distance"] == pytest.approx(1.0)
    assert res.by_statistic["neg_mean_k_lowest"] < 0.5


def test_a_bundle_with_a_broken_global_score_is_refused(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    sc, _ = fit_scorer(_views(8, rng, (0.9, 1.1)), _views(3, rng, (0.9, 1.1)), _spec())
    assert sc.global_score is None  # off unless asked for
    sc.global_score = fit_global_score(sc, _views(8, rng, (0.9, 1.1)), _views(3, rng, (0.9, 1.1)))
    save_bundle(sc, tmp_path / "b")
    meta_path = tmp_path / "b" / "flowscore.json"
    meta = json.loads(meta_path.read_text())
    for bad, match in (
        ({**meta["global_score"], "features": 99}, "does not match"),
        ({**meta["global_score"], "spread": -1.0}, "spread"),
        ({"features": 7}, "must be a table"),
    ):
        meta_path.write_text(json.dumps({**meta, "global_score": bad}))
        with pytest.raises(BundleError, match=match):
            load_bundle(tmp_path / "b")
    # without the settings, the weights file has tensors the model does not expect
    meta_path.write_text(json.dumps({k: v for k, v in meta.items() if k != "global_score"}))
    with pytest.raises(BundleError, match="unexpected tensor"):
        load_bundle(tmp_path / "b")


def test_the_spec_takes_image_global_but_not_with_two_sided() -> None:
    spec = _spec(image_global=True)
    assert spec_from_dict(spec_to_dict(spec)) == spec
    with pytest.raises(ConfigError, match="image_global and image_two_sided"):
        spec_from_dict({**spec_to_dict(spec), "image_two_sided": True})
    with pytest.raises(ValueError, match="image_global and image_two_sided"):
        replace(spec, image_two_sided=True)
