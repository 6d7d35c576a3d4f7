"""Synthetic anomalies and the conditional loss of the self-supervised flow."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import texture
from sklearn.metrics import roc_auc_score

from flowcore.fit import (
    DEFECTS_PER_IMAGE,
    PRESETS,
    ScorerSpec,
    anomaly_rows,
    choose_image_score,
    fit_scorer,
    init_featurizer,
)
from flowcore.flows import MAFConfig, build_flow
from flowcore.scorer import ImageScore
from flowcore.synthetic import KINDS, DefectConfig, add_defect, auroc, defect_cells
from flowcore.training import FitConfig, fit_flow, nll_sums, objective_sums, robust_floor
from flowcore.windows import Geometry, WindowConfig


def _texture(seed: int, h: int = 96, w: int = 128) -> np.ndarray:
    rng = np.random.default_rng(seed)
    g = rng.normal(120, 25, (h, w, 1)).clip(0, 255)
    return np.repeat(g, 3, axis=2).astype(np.uint8)


@pytest.mark.parametrize("kind", KINDS)
def test_a_defect_changes_only_the_pixels_under_its_alpha(kind):
    img = _texture(1)
    rng = np.random.default_rng(7)
    bad, alpha = add_defect(img, rng, DefectConfig(kinds=(kind,)), donor=_texture(2))
    assert bad.shape == img.shape and bad.dtype == np.uint8
    assert alpha.shape == img.shape[:2] and (alpha > 0.5).any()
    changed = (bad.astype(int) != img.astype(int)).any(axis=2)
    assert changed.any()
    assert not changed[alpha == 0].any()
    # the defect is noticeable where it is solid
    solid = alpha > 0.99
    diff = np.abs(bad.astype(float) - img.astype(float)).mean(axis=2)
    assert diff[solid].mean() > 5


def test_defect_sizes_follow_the_area_range():
    img = _texture(3, 200, 200)
    rng = np.random.default_rng(0)
    cfg = DefectConfig(kinds=("spot",), area=(0.001, 0.002))
    areas = [float(add_defect(img, rng, cfg)[1].sum()) / img[..., 0].size for _ in range(20)]
    assert 0.0006 < min(areas) and max(areas) < 0.003


@pytest.mark.parametrize("window, stride", [(12, 4), (1, 4)])
def test_defect_cells_are_those_whose_window_core_holds_the_defect(window, stride):
    """Brute force over every cell: a cell is chosen iff the central max(stride, window // 2)
    square of its window holds half the defect or more (window 1 < stride: a CNN cell,
    centred on its pixel)."""
    h, w = 60, 80
    alpha = np.zeros((h, w), np.float32)
    alpha[30:34, 41:44] = 1.0
    geo = Geometry(window=window, stride=stride, scale=1.0)
    if window >= stride:
        gh, gw = (h - window) // stride + 1, (w - window) // stride + 1
    else:
        gh, gw = h // stride, w // stride
    got = set(defect_cells(alpha, geo, (gh, gw)).tolist())
    core = max(stride, window // 2)
    off = (window - core) // 2
    want = set()
    for i in range(gh):
        for j in range(gw):
            y0, x0 = i * stride + off, j * stride + off
            box = alpha[max(0, y0) : y0 + core, max(0, x0) : x0 + core]
            if box.sum() >= 0.5 * alpha.sum():
                want.add(i * gw + j)
    assert got == want and len(got) >= 1
    # no defect, no cell
    none = np.zeros((h, w), np.float32)
    assert defect_cells(none, geo, (gh, gw)).numel() == 0


def test_auroc_matches_sklearn_with_ties():
    rng = np.random.default_rng(0)
    n = rng.integers(0, 5, 40).astype(float)
    a = rng.integers(1, 7, 25).astype(float)
    want = roc_auc_score(np.r_[np.zeros(40), np.ones(25)], np.r_[n, a])
    assert auroc(n, a) == pytest.approx(want, abs=1e-12)
    assert np.isnan(auroc([], [1.0]))


def test_objective_terms_by_hand():
    ll = torch.tensor([-1.0, -2.0, -3.0, -4.0, -5.0, -0.5, -10.0], dtype=torch.float64)
    y = torch.tensor([0, 0, 0, 0, 0, 1, 1.0])
    nll, n, hinge, m = objective_sums(ll, y, margin=2.0)
    # normal rows -1..-5: median -3, median absolute deviation 1
    floor = -3.0 - 2.0 * 1.4826
    assert float(robust_floor(ll[:5], 2.0)) == pytest.approx(floor)
    assert float(nll) == pytest.approx(15.0) and n == 5 and m == 2
    # only the anomaly above the floor is pushed
    assert float(hinge) == pytest.approx(-0.5 - floor)
    plain = objective_sums(ll, None, margin=2.0)
    assert float(plain[0]) == pytest.approx(25.5) and plain[1] == 7 and plain[3] == 0


def test_the_hinge_pushes_synthetic_anomalies_below_the_normal_floor():
    """Anomalies made at the edge of the normal support (a tight cluster at radius 2.2 of a
    standard normal) score above the robust floor (median - 3 spreads) of normal rows under
    plain maximum likelihood; with the conditional loss they end below it, and the normal
    rows keep their likelihood."""
    g = torch.Generator().manual_seed(0)
    centre = torch.tensor([2.2, 0.0])
    normal = torch.randn(3000, 2, generator=g)
    bad = 0.1 * torch.randn(300, 2, generator=g) + centre
    x = torch.cat([normal, bad])
    y = torch.cat([torch.zeros(3000), torch.ones(300)])
    val_n = torch.randn(500, 2, generator=g)
    val_b = 0.1 * torch.randn(50, 2, generator=g) + centre
    vx, vy = torch.cat([val_n, val_b]), torch.cat([torch.zeros(500), torch.ones(50)])
    cfg = FitConfig(batch_size=256, lr=1e-3, max_epochs=40, patience=40)

    def fitted(labelled: bool) -> tuple[float, float, float]:
        torch.manual_seed(0)
        flow = build_flow(2, MAFConfig(blocks=4, hidden=64))
        if labelled:
            fit_flow(flow, x, vx, cfg, train_y=y, val_y=vy)
        else:
            fit_flow(flow, normal, val_n, cfg)
        with torch.no_grad():
            ln, lb = flow.log_prob(val_n), flow.log_prob(val_b)
        return float(robust_floor(ln, 3.0)), float(lb.median()), float(ln.mean())

    floor, med_bad, plain_mean = fitted(labelled=False)
    assert med_bad > floor
    floor, med_bad, mean = fitted(labelled=True)
    assert med_bad < floor - 0.3
    assert mean > plain_mean - 0.1
    # the held-out sums count the two kinds of rows apart
    flow = build_flow(2, MAFConfig(blocks=1, hidden=8)).eval()
    _, n, _, m = nll_sums(flow, [(vx, vy)], margin=3.0)
    assert (n, m) == (500, 50)


def test_anomaly_rows_are_the_featurizer_rows_of_the_cells_that_see_the_defect():
    spec = replace(
        PRESETS["grain-full"],
        featurizer=WindowConfig(window=12, stride=4, scale=1.0, components=None, whiten=False),
        fit=FitConfig(synthetic_anomalies=True, synthetic_rows=8),
    )
    feat = init_featurizer(spec)
    feat.set_basis(torch.zeros(432), torch.eye(432), torch.ones(432))  # rows = raw windows
    imgs = [_texture(5), _texture(6)]
    rows = anomaly_rows(feat, spec, imgs, torch.Generator().manual_seed(1), donors=imgs)
    assert rows.shape[1] == 432
    assert 0 < rows.shape[0] <= len(imgs) * DEFECTS_PER_IMAGE * 2
    # identity basis: each row is a window; defect windows differ from the clean texture's
    # statistics (spots and scratches shift grey levels by 35..90; patches are re-lit)
    clean = torch.from_numpy(imgs[0][..., 0].astype(np.float32) / 255)
    win = clean.unfold(0, 12, 4).unfold(1, 12, 4).reshape(-1, 144)
    dev_clean = (win - win.mean(1, keepdim=True)).abs().amax(1)
    grey = rows.view(-1, 3, 144)[:, 0]
    dev_bad = (grey - grey.median(1, keepdim=True).values).abs().amax(1)
    assert float(dev_bad.median()) > float(dev_clean.median())


def test_auto_statistic_is_chosen_on_held_out_images_and_synthetic_anomalies():
    """``image_statistic = "auto"``: the fitted scorer keeps the candidate with the best
    AUROC of synthetic-anomaly copies against the held-out originals (recomputed here from
    the scorer's own grids), and records the table; with synthetic anomalies in the fit
    too, training reports the held-out objective."""
    spec = ScorerSpec(
        featurizer=WindowConfig(window=8, stride=4, components=16),
        flow=MAFConfig(blocks=2, hidden=32),
        fit=FitConfig(max_epochs=4, batch_size=256, lr=3e-3, synthetic_anomalies=True),
        windows_per_image=200,
        basis_rows=2000,
        image_statistic="auto",
    )
    train, val = texture(10, 48, 64, 1), texture(6, 48, 64, 2)
    scorer, rep = fit_scorer(train, val, spec)
    choice = scorer.training_stats["image_statistic_choice"]
    table = choice["auroc_by_candidate"]
    assert choice["chosen"] in table and choice["normal_images"] == 6
    assert choice["anomalous_images"] == 6 * 6  # choice_copies(6): 32 or more in all
    assert all(0.0 <= v <= 1.0 for v in table.values())
    assert table[choice["chosen"]] >= max(table.values()) - 0.005
    first = next(iter(table))
    assert first == f"neg_mean_k_lowest@{ImageScore().k_for(11, 15, scorer.geometry)}"
    if choice["chosen"].startswith("neg_mean_k_lowest@"):
        assert scorer.image_score.statistic == "neg_mean_k_lowest"
        assert scorer.image_score.k == int(choice["chosen"].split("@")[1])
    else:
        assert scorer.image_score.statistic == choice["chosen"]
    # the same held-out images and seed give the same choice, recomputed by hand
    scorer.image_score = spec.image_score  # the candidates are built around the spec's k
    again = choose_image_score(scorer, val, seed=spec.seed, copies=6)
    assert again.aurocs == pytest.approx(table, abs=1e-4)
    assert np.isfinite(rep.best_val_nll)
