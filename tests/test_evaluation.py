"""Evaluation: baselines on window features, streaming pixel AUROC, the evaluator, ROC plots."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import roc_auc_score

from flowcore.scorer import STATISTICS, Geometry, heatmap_to_image
from pipelines.evaluation import (
    BASELINES,
    METHODS,
    EvaluationResult,
    Evaluator,
    MethodResult,
    PixelAUROC,
    fit_baselines,
    format_table,
    image_auroc,
    score_grid,
)
from pipelines.plots import save_roc_curves

DIM = 8


@pytest.fixture(scope="module")
def baselines():
    rng = np.random.default_rng(0)
    return fit_baselines(rng.normal(size=(3000, DIM)), seed=0)


def _inliers_and_outliers(seed: int, n_in: int = 500, n_out: int = 50):
    """Inliers ~ N(0, I); outliers the same shifted by 6σ along a random direction each."""
    rng = np.random.default_rng(seed)
    inl = rng.normal(size=(n_in, DIM))
    direction = rng.normal(size=(n_out, DIM))
    direction /= np.linalg.norm(direction, axis=1, keepdims=True)
    out = rng.normal(size=(n_out, DIM)) + 6.0 * direction
    rows = np.vstack([inl, out])
    labels = np.r_[np.zeros(n_in, int), np.ones(n_out, int)]
    return rows, labels


def test_methods_constants():
    assert METHODS == ("flow", "isolation_forest", "one_class_svm", "gaussian", "pca_nn")
    assert BASELINES == METHODS[1:]


def test_baselines_separate_shifted_outliers(baselines):
    rows, labels = _inliers_and_outliers(1)
    assert set(baselines) == set(BASELINES)
    for name, model in baselines.items():
        s = model.score_rows(rows)
        assert s.shape == (len(rows),), name
        assert np.isfinite(s).all(), name
        auc = roc_auc_score(labels, -s)  # higher normality = less anomalous
        assert auc > 0.95, (name, auc)
        # outliers score lower (less normal) than inliers on average
        assert s[labels == 1].mean() < s[labels == 0].mean(), name


def test_gaussian_is_a_log_density(baselines):
    # N(0, I) in 8-D: at the origin the log-density is close to -(8/2) log(2π)
    s = baselines["gaussian"].score_rows(np.zeros((1, DIM)))[0]
    assert abs(s - (-(DIM / 2) * np.log(2 * np.pi))) < 0.3


def test_baselines_are_deterministic():
    rng = np.random.default_rng(3)
    train = rng.normal(size=(2500, DIM))
    test = rng.normal(size=(64, DIM)) * 2
    a = fit_baselines(train, seed=7, max_rows=2200)
    b = fit_baselines(train, seed=7, max_rows=2200)
    for name in BASELINES:
        np.testing.assert_array_equal(a[name].score_rows(test), b[name].score_rows(test))


@pytest.mark.parametrize(
    "rows, match",
    [
        (np.zeros(100), "2-D"),
        (np.zeros((5, DIM)), "at least"),
        (np.r_[np.zeros((99, DIM)), np.full((1, DIM), np.nan)], "NaN"),
        (np.r_[np.zeros((99, DIM)), np.full((1, DIM), np.inf)], "infinite"),
    ],
)
def test_fit_baselines_validates_input(rows, match):
    with pytest.raises(ValueError, match=match):
        fit_baselines(rows)


def test_score_rows_checks_width(baselines):
    with pytest.raises(ValueError, match="shape"):
        baselines["gaussian"].score_rows(np.zeros((4, DIM + 1)))


@pytest.mark.parametrize("chunk_rows", [None, 7])
def test_score_grid_matches_score_rows(baselines, chunk_rows):
    rng = np.random.default_rng(4)
    n, gh, gw = 3, 5, 6
    feats = rng.normal(size=(n, DIM, gh, gw)).astype(np.float32)
    feats[1, :, 2, 3] += 8.0  # one odd window
    for name, model in baselines.items():
        grid = score_grid(model, feats, chunk_rows=chunk_rows)
        assert grid.shape == (n, gh, gw) and grid.dtype == np.float32, name
        rows = feats.transpose(0, 2, 3, 1).reshape(-1, DIM)
        expect = model.score_rows(rows).reshape(n, gh, gw)
        np.testing.assert_allclose(grid, expect, rtol=1e-5, atol=1e-5, err_msg=name)
        assert grid[1, 2, 3] == grid.min(), name


def test_image_auroc():
    scores = np.array([0.1, 0.4, 0.35, 0.8])
    labels = np.array([0, 0, 1, 1])
    assert image_auroc(scores, labels) == pytest.approx(roc_auc_score(labels, scores))
    assert image_auroc(scores, np.zeros(4, int)) is None
    with pytest.raises(ValueError):
        image_auroc(scores, np.array([0, 2, 1, 1]))


def _random_maps(seed: int, count: int = 12, h: int = 40, w: int = 50):
    """Random anomaly maps (scale and offset of log-likelihoods, with heavy tails), with
    random masks on half of them (None on the rest), anomalous pixels scoring a bit higher."""
    rng = np.random.default_rng(seed)
    maps, masks = [], []
    for i in range(count):
        m = rng.normal(300.0, 15.0, (h, w))
        m[rng.random((h, w)) < 0.01] *= 50  # far tail
        if i % 2:
            mask = rng.random((h, w)) < rng.uniform(0.05, 0.4)
            m[mask] += rng.normal(12.0, 20.0, mask.sum())
        else:
            mask = None
        maps.append(m)
        masks.append(mask)
    return maps, masks


def _exact_inputs(maps, masks):
    """All pixels' labels and scores, for sklearn's exact roc_auc_score."""
    labels = [
        (np.zeros(m.shape, bool) if k is None else k).ravel()
        for m, k in zip(maps, masks, strict=True)
    ]
    return np.concatenate(labels), np.concatenate([m.ravel() for m in maps])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pixel_auroc_matches_sklearn(seed):
    maps, masks = _random_maps(seed)
    acc = PixelAUROC()
    for m, k in zip(maps, masks, strict=True):
        acc.add(m, k)
    y, s = _exact_inputs(maps, masks)
    exact = roc_auc_score(y, s)
    got = acc.value()
    assert got == pytest.approx(exact, abs=1e-3)
    assert acc.error_bound() < 1e-3
    assert abs(got - exact) <= acc.error_bound() + 1e-12
    assert acc.positives == int(y.sum()) and acc.negatives == int((~y).sum())
    fpr, tpr = acc.curve()
    assert fpr[0] == 0 and tpr[0] == 0 and fpr[-1] == pytest.approx(1) and tpr[-1] == 1
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)
    assert np.trapezoid(tpr, fpr) == pytest.approx(got, abs=1e-9)


def test_pixel_auroc_coarse_bins_still_bounded():
    maps, masks = _random_maps(5)
    acc = PixelAUROC(bins=64)
    for m, k in zip(maps, masks, strict=True):
        acc.add(m, k)
    exact = roc_auc_score(*_exact_inputs(maps, masks))
    assert abs(acc.value() - exact) <= acc.error_bound() + 1e-12


def test_pixel_auroc_none_without_both_classes():
    acc = PixelAUROC()
    assert acc.value() is None
    rng = np.random.default_rng(0)
    acc.add(rng.normal(size=(8, 8)), None)
    acc.add(rng.normal(size=(8, 8)), np.zeros((8, 8), bool))
    assert acc.value() is None and acc.error_bound() is None
    assert acc.curve()[0].size == 0
    only_pos = PixelAUROC()
    only_pos.add(rng.normal(size=(4, 4)), np.ones((4, 4), bool))
    assert only_pos.value() is None


def test_pixel_auroc_handles_infinities_and_rejects_bad_input():
    acc = PixelAUROC()
    m = np.zeros((4, 4))
    m[0, 0] = np.inf
    m[3, 3] = -np.inf
    mask = np.zeros((4, 4), bool)
    mask[0, 0] = True
    acc.add(m, mask)
    assert acc.value() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="NaN"):
        acc.add(np.full((4, 4), np.nan), None)
    with pytest.raises(ValueError, match="shape"):
        acc.add(np.zeros((4, 4)), np.zeros((4, 5), bool))


GEOM = Geometry(window=8, stride=4, scale=1.0)
H = W = 40  # grid 9 × 9 with window 8, stride 4


def _synthetic_batch(seed: int, n: int = 6):
    """Grids that are low exactly where a square anomaly is, with the matching pixel masks."""
    rng = np.random.default_rng(seed)
    gh = gw = (H - GEOM.window) // GEOM.stride + 1
    grids = rng.normal(0.0, 0.05, (n, gh, gw)).astype(np.float32)
    labels, masks = [], []
    for i in range(n):
        if i % 2 == 0:
            labels.append(0)
            masks.append(None)
            continue
        i0, j0 = rng.integers(1, gh - 4, size=2)
        grids[i, i0 : i0 + 3, j0 : j0 + 3] -= 10.0
        # mask = the pixels where the upsampled grid dips: "low exactly where the mask is"
        mask = heatmap_to_image(grids[i], GEOM, H, W).numpy() < -5.0
        labels.append(1)
        masks.append(mask)
    return grids, labels, masks


def test_evaluator_end_to_end(baselines):
    ev = Evaluator(baselines, GEOM)
    rng = np.random.default_rng(9)
    total_labels = []
    for seed in (1, 2):
        grids, labels, masks = _synthetic_batch(seed)
        n, gh, gw = grids.shape
        # features: normal windows ~ N(0, I); windows with a dip shifted far away
        feats = rng.normal(size=(n, DIM, gh, gw)).astype(np.float32)
        feats += (grids < -5.0)[:, None] * 8.0
        ev.add(grids, feats, labels, masks, H, [W] * n)
        total_labels += labels
    res = ev.result()
    assert res.images == len(total_labels) and res.anomalous == sum(total_labels)
    flow = res.methods["flow"]
    assert flow.pixel_auroc == pytest.approx(1.0, abs=1e-3)
    assert flow.image_auroc == pytest.approx(1.0)
    for name in BASELINES:
        assert res.methods[name].image_auroc > 0.9, name
        assert res.methods[name].pixel_auroc > 0.9, name
    doc = res.as_json("models:/demo@champion")
    assert set(doc) == {
        "model_uri",
        "images",
        "anomalous",
        "image_auroc",
        "pixel_auroc",
        "image_statistic",
        "image_auroc_by_statistic",
    }
    assert doc["image_statistic"] == "neg_p05"  # the Evaluator's default: bundles before it
    by = doc["image_auroc_by_statistic"]
    assert set(by) == set(STATISTICS)
    # a 3×3 dip of -10 in a 0.05-noise grid: the tail statistics all see it
    for name in ("neg_min", "neg_mean_k_lowest", "neg_p01"):
        assert by[name] == pytest.approx(1.0), name
    assert by["neg_p05"] == pytest.approx(flow.image_auroc)
    assert list(doc["image_auroc"]) == list(METHODS)
    assert list(doc["pixel_auroc"]) == list(METHODS)
    assert doc["model_uri"] == "models:/demo@champion"
    assert doc["images"] == res.images and doc["anomalous"] == res.anomalous
    json.dumps(doc)  # plain JSON types only
    assert res.as_json("m", 100, 7)["images"] == 100
    table = format_table(res)
    for name in METHODS:
        assert name in table
    assert f"{flow.pixel_auroc:.3f}" in table
    curves = res.curves("pixel")
    assert set(curves) == set(METHODS)


def test_evaluator_without_masks_gives_null_pixel_auroc():
    ev = Evaluator({}, GEOM)  # flow only
    grids, labels, _ = _synthetic_batch(3)
    ev.add(grids, None, labels, [None] * len(labels), H, W)  # anomalous, location unknown
    res = ev.result()
    doc = res.as_json("bundle/")
    assert all(v is None for v in doc["pixel_auroc"].values())
    assert doc["image_auroc"]["flow"] == pytest.approx(1.0)
    assert all(doc["image_auroc"][m] is None for m in BASELINES)
    assert "—" in format_table(res)


def test_evaluator_survives_non_finite_grids():
    """A -inf and a NaN window change the AUROCs by no more than two windows can."""
    grids, labels, masks = _synthetic_batch(4)
    clean = Evaluator({}, GEOM)
    clean.add(grids.copy(), None, labels, masks, H, W)
    grids[0, 0, 0] = -np.inf
    grids[2, 1, 1] = np.nan
    ev = Evaluator({}, GEOM)
    ev.add(grids, None, labels, masks, H, W)
    res, ref = ev.result().methods["flow"], clean.result().methods["flow"]
    assert ref.pixel_auroc is not None and ref.pixel_auroc > 0.9
    assert res.pixel_auroc is not None and math.isfinite(res.pixel_auroc)
    assert abs(res.pixel_auroc - ref.pixel_auroc) < 0.05
    assert res.image_auroc is not None and math.isfinite(res.image_auroc)


def test_evaluator_validates_shapes(baselines):
    ev = Evaluator(baselines, GEOM)
    grids, labels, masks = _synthetic_batch(5)
    with pytest.raises(ValueError, match="labels"):
        ev.add(grids, np.zeros((6, DIM, 9, 9)), labels[:-1], masks, H, W)
    with pytest.raises(ValueError, match="features"):
        ev.add(grids, np.zeros((6, DIM, 8, 9)), labels, masks, H, W)
    with pytest.raises(ValueError, match="unknown baselines"):
        Evaluator({"knn": baselines["pca_nn"]}, GEOM)


def test_save_roc_curves_writes_png(tmp_path):
    res = EvaluationResult(
        methods={
            "flow": MethodResult(
                "flow", 0.9, None, image_roc=(np.array([0, 0.2, 1.0]), np.array([0, 0.8, 1.0]))
            ),
        },
        images=10,
        anomalous=3,
    )
    curves = res.curves("image")
    curves["gaussian"] = (np.zeros(0), np.zeros(0), None)
    out = save_roc_curves(tmp_path / "sub" / "roc.png", curves, "image ROC")
    assert out.exists()
    with Image.open(out) as im:
        im.verify()
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size[0] > 100 and im.size[1] > 100


def test_a_two_sided_model_is_evaluated_two_sided_and_baselines_one_sided():
    from flowcore.scorer import ImageScore

    rng = np.random.default_rng(4)
    gh = gw = (H - GEOM.window) // GEOM.stride + 1
    grids = rng.normal(0.0, 1.0, (20, gh, gw)).astype(np.float32)
    grids[10:] *= 0.2  # anomalous images: every window *more* likely (less contrast)
    labels = [0] * 10 + [1] * 10
    one = ImageScore(statistic="neg_min")
    raw = -grids.reshape(20, -1).min(1)
    two = ImageScore(
        statistic="neg_min", two_sided=True, centre=float(np.median(raw[:10])), spread=0.5
    )
    results = {}
    for name, image_score in (("one", one), ("two", two)):
        ev = Evaluator({}, GEOM, image_score=image_score, pixels=False)
        ev.add(grids, None, labels, [None] * 20, H, W)
        results[name] = ev.result()
    assert results["one"].methods["flow"].image_auroc < 0.1  # fooled: they look *more* normal
    assert results["two"].methods["flow"].image_auroc > 0.9
    # the per-statistic figures are the raw (one-sided) statistics either way
    assert results["two"].by_statistic == results["one"].by_statistic
