"""Gradient maps (flowcore/gradient.py): the backpropagated pixel gradient against finite
differences in float64, the smoothing and pooling against an explicit reference, the map's
shape and where it peaks, and the refusal for window models."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from flowcore.cnn import CNNConfig, CNNFeaturizer
from flowcore.fit import fit_scorer
from flowcore.flows import CouplingConfig, build_flow
from flowcore.gradient import (
    GradientMapError,
    check_gradient_support,
    default_sigma,
    gradient_map,
    heatmap_grid,
    pixel_gradient,
    pool_to_grid,
)
from flowcore.scorer import Scorer
from flowcore.spec import PRESETS, spec_to_dict
from flowcore.training import FitConfig
from flowcore.windows import Geometry
from tests.conftest import texture


def _tiny(scale: float = 0.5) -> Scorer:
    """resnet18 cut at layer1 (random weights, seeded) + a 2-block coupling flow."""
    torch.manual_seed(0)
    cfg = CNNConfig(backbone="resnet18", layers=("layer1",), scale=scale)
    feat = CNNFeaturizer(cfg, seed=0).eval()
    flow = build_flow(cfg.features, CouplingConfig(blocks=2, hidden=(16,)))
    return Scorer(feat, flow).eval()


def test_pixel_gradient_matches_finite_differences_in_float64() -> None:
    """∂(−Σ ll)/∂x by backpropagation (resize, backbone, standardisation, flow) against
    central differences of the image NLL at 8 pixels, float64."""
    scorer = _tiny(scale=0.5).double()
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(2, 3, 32, 40, generator=gen, dtype=torch.float64)
    grad, grid = pixel_gradient(scorer, x)
    assert grad.shape == x.shape and grad.dtype == torch.float64
    assert grid.shape[0] == 2

    def nll(xx: torch.Tensor) -> float:
        with torch.no_grad():
            return float(-scorer.grid_from_features(scorer.featurizer(xx)).sum())

    eps = 1e-6
    picks = torch.randint(0, x.numel(), (8,), generator=gen)
    for flat in picks.tolist():
        idx = np.unravel_index(flat, tuple(x.shape))
        up, down = x.clone(), x.clone()
        up[idx] += eps
        down[idx] -= eps
        fd = (nll(up) - nll(down)) / (2 * eps)
        assert abs(fd - float(grad[idx])) <= 1e-5 * max(1.0, abs(fd)), (idx, fd, float(grad[idx]))
    # and the gradient is not trivially zero
    assert float(grad.abs().max()) > 0


def _box_reference(pixel_map: np.ndarray, geometry: Geometry, gh: int, gw: int) -> np.ndarray:
    """The mean of a continuous box of stride/scale pixels around each cell centre, pixels
    weighted by their overlap with it (interior cells only are compared)."""
    size = round(geometry.stride / geometry.scale)

    def weights(centre: float, n: int) -> np.ndarray:
        lo, hi = centre - size / 2, centre + size / 2
        k = np.arange(n)
        return np.clip(np.minimum(k + 1, hi) - np.maximum(k, lo), 0, None) / size

    s, w, sc = geometry.stride, geometry.window, geometry.scale
    out = np.zeros((gh, gw))
    for i in range(gh):
        wy = weights((i * s + w / 2) / sc, pixel_map.shape[0])
        for j in range(gw):
            wx = weights((j * s + w / 2) / sc, pixel_map.shape[1])
            out[i, j] = wy @ pixel_map @ wx
    return out


@pytest.mark.parametrize(
    "geometry", [Geometry(1, 4, 1.0), Geometry(1, 8, 0.5), Geometry(3, 4, 1.0)]
)
def test_pooling_is_the_box_mean_around_each_cell_centre(geometry) -> None:
    rng = np.random.default_rng(0)
    m = rng.random((70, 90))
    # the cells a featurizer of this geometry has on a 70×90 image
    gh = int((70 * geometry.scale - geometry.window) // geometry.stride) + 1
    gw = int((90 * geometry.scale - geometry.window) // geometry.stride) + 1
    got = pool_to_grid(torch.from_numpy(m)[None], geometry, gh, gw)[0].numpy()
    ref = _box_reference(m, geometry, gh, gw)
    inner = (slice(1, gh - 1), slice(1, gw - 1))
    np.testing.assert_allclose(got[inner], ref[inner], rtol=1e-10, atol=1e-12)


def test_map_has_the_likelihood_grids_shape_and_is_non_negative() -> None:
    scorer = _tiny()
    imgs = np.stack(texture(3, 64, 96, 5))
    m = gradient_map(scorer, imgs, batch=2)  # two backward passes: 2 + 1 images
    grid = scorer.score(imgs).grid
    assert tuple(m.shape) == grid.shape
    assert m.dtype == torch.float32 and bool((m >= 0).all()) and float(m.max()) > 0
    # per image, independent of the batching
    one = gradient_map(scorer, imgs[2:], batch=1)
    torch.testing.assert_close(m[2:], one, rtol=1e-4, atol=1e-6)
    # the column's values: minus the map; the likelihood kind passes the grid through
    col = heatmap_grid(scorer, imgs, "gradient", grid)
    np.testing.assert_allclose(col, -m.numpy(), rtol=1e-4, atol=1e-6)
    assert heatmap_grid(scorer, imgs, "likelihood", grid) is grid
    with pytest.raises(ValueError, match="likelihood, gradient"):
        heatmap_grid(scorer, imgs, "saliency", grid)


def test_smoothing_spreads_but_keeps_the_total() -> None:
    scorer = _tiny(scale=1.0)
    imgs = np.stack(texture(1, 64, 96, 6))
    raw = gradient_map(scorer, imgs, sigma=0)
    smooth = gradient_map(scorer, imgs, sigma=6)
    assert default_sigma(scorer.geometry) == 2.0  # half of stride 4 at scale 1
    assert float(smooth.std()) < float(raw.std())  # a Gaussian evens it out
    np.testing.assert_allclose(float(smooth.mean()), float(raw.mean()), rtol=0.1)


SMALL_CNN = replace(
    PRESETS["cnn"],
    featurizer=CNNConfig(backbone="resnet18", layers=("layer1", "layer2"), scale=0.5),
    flow=CouplingConfig(blocks=2, hidden=(32,)),
    fit=FitConfig(max_epochs=3, batch_size=128, lr=1e-3),
    windows_per_image=60,
    basis_rows=600,
)


@pytest.fixture(scope="module")
def fitted() -> Scorer:
    """The cnn preset, shrunk: a small coupling flow fitted on smooth textures."""
    torch.manual_seed(0)
    scorer, _ = fit_scorer(texture(6, 96, 128, 1), texture(2, 96, 128, 2), SMALL_CNN)
    return scorer


@pytest.mark.parametrize(
    "seed, top, left", [(11, 20, 24), (12, 56, 88), (13, 64, 16), (16, 70, 50)]
)
def test_map_peaks_on_the_defect(fitted, seed, top, left) -> None:
    """A blue 12×12 square (a colour no training texture has) pasted into a normal texture:
    the map's largest cell is one whose centre lies on the square or next to it, and it is
    well above the typical cell elsewhere."""
    img = texture(1, 96, 128, seed)[0].copy()
    img[top : top + 12, left : left + 12] = (40, 90, 230)
    m = gradient_map(fitted, img[None])[0].numpy()
    geo = fitted.geometry
    cy = (np.arange(m.shape[0]) * geo.stride + geo.window / 2) / geo.scale
    cx = (np.arange(m.shape[1]) * geo.stride + geo.window / 2) / geo.scale
    step = geo.stride / geo.scale
    near_y = (cy >= top - step) & (cy <= top + 12 + step)
    near_x = (cx >= left - step) & (cx <= left + 12 + step)
    near = near_y[:, None] & near_x[None, :]
    i, j = np.unravel_index(int(m.argmax()), m.shape)
    assert near[i, j], (i, j, m.shape)
    assert m[near].max() > 5 * np.median(m[~near])


def test_window_models_are_refused_in_one_line(small_scorer) -> None:
    with pytest.raises(GradientMapError, match="grain-full") as e:
        check_gradient_support(small_scorer)
    assert "\n" not in str(e.value) and "cnn-mobilenet" in str(e.value)
    with pytest.raises(GradientMapError):
        gradient_map(small_scorer, np.stack(texture(1, 48, 64, 3)))


# ---------------------------------------------------------------- through the commands


@pytest.mark.slow
def test_evaluate_reports_the_gradient_maps_pixel_auroc(
    fitted, small_scorer, flowscore_home, tmp_path, capsys
) -> None:
    """``evaluate --heatmap gradient``: the gradient map's pixel AUROC beside the likelihood
    heatmap's, equal to the one computed here from the masks; a window model is refused."""
    import json

    from flowcore.bundle import save_bundle
    from flowcore.scorer import heatmap_to_image
    from jobs.cli import main
    from pipelines.archive import decode_image, list_archive, read_bytes
    from pipelines.evaluation import PixelAUROC
    from pipelines.synth import write_archive
    from pipelines.truth import read_labels, read_mask

    archive = tmp_path / "archive"
    write_archive(archive, kind="harvest", images=6, seed=4, height=64, width=96, anomaly_rate=0.5)
    # the spec, as a trained bundle records it (evaluate draws the baselines' rows with it)
    bundle = save_bundle(fitted, tmp_path / "cnn-bundle", {"spec": spec_to_dict(SMALL_CNN)})
    out = tmp_path / "eval.json"
    argv = ["evaluate", "--archive", str(archive), "--train-archive", str(archive)]
    argv += ["--no-mlflow", "--quiet", "--baseline-rows", "200", "--out", str(tmp_path / "ev")]
    assert main([*argv, "--model", str(bundle), "--heatmap", "gradient", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    labels = read_labels(str(archive))
    want = PixelAUROC()
    for e in sorted(list_archive(str(archive)), key=lambda e: e.path):
        img = decode_image(read_bytes(e.image_uri)).rgb
        mask = read_mask(str(archive), e.path) if labels[e.path] else None
        if labels[e.path] and mask is None:
            continue
        gmap = gradient_map(fitted, img[None])[0]
        want.add(heatmap_to_image(gmap, fitted.geometry, *img.shape[:2]).numpy(), mask)
    # evaluate takes the gradients of a batch, this loop of one image: float32 sums in another
    # order can swap near-tied pixels (1.3e-6 seen once); a wrong map is off by 1e-2 and more
    assert report["pixel_auroc_gradient"] == pytest.approx(want.value(), abs=1e-4)
    assert report["pixel_auroc"]["flow"] is not None
    assert "gradient map" in capsys.readouterr().out

    window = save_bundle(small_scorer, tmp_path / "window-bundle")
    assert main([*argv, "--model", str(window), "--heatmap", "gradient"]) == 2
    assert "cnn-mobilenet" in capsys.readouterr().err


def test_score_refuses_the_gradient_map_for_a_window_model(
    small_scorer, flowscore_home, tmp_path, capsys
) -> None:
    """Before Ray or the catalog: exit 2, one line naming the presets it is for."""
    from flowcore.bundle import save_bundle
    from jobs.cli import main
    from pipelines.synth import write_archive

    bundle = save_bundle(small_scorer, tmp_path / "bundle")
    archive = tmp_path / "archive"
    write_archive(archive, kind="harvest", images=2, seed=2, height=64, width=96)
    argv = ["score", "--archive", str(archive), "--model", str(bundle), "--quiet"]
    assert main([*argv, "--heatmap", "gradient"]) == 2
    err = capsys.readouterr().err.strip()
    assert "cnn-mobilenet" in err and "pixel windows" in err and len(err.splitlines()) == 1
    assert not (flowscore_home / "catalog.db").exists()


@pytest.mark.ray
@pytest.mark.timeout(600)
def test_score_writes_gradient_maps_through_ray(ray_session, flowscore_home, tmp_path) -> None:
    """``score --heatmap gradient`` on the real Ray path: every row's heatmap is minus the
    in-process gradient map, with the likelihood grid's shape, and says ``gradient``; the
    summaries are the likelihood's."""
    from flowcore.bundle import load_bundle, save_bundle
    from jobs.cli import main
    from pipelines import tables
    from pipelines.archive import decode_image, read_bytes
    from pipelines.synth import write_archive

    bundle = save_bundle(_tiny(), tmp_path / "cnn-bundle")
    scorer = load_bundle(bundle)
    archive = tmp_path / "archive"
    write_archive(archive, kind="harvest", images=4, seed=3, height=64, width=96)
    argv = ["score", "--archive", str(archive), "--model", str(bundle), "--quiet"]
    assert main([*argv, "--heatmap", "gradient"]) == 0
    cat = tables.load_catalog_()
    rows = cat.load_table("flowscore.image_scores").scan().to_arrow().to_pylist()
    assert len(rows) == 4
    for r in rows:
        assert r["heatmap_kind"] == "gradient"
        img = decode_image(read_bytes(r["image_uri"])).rgb
        want = -gradient_map(scorer, img[None])[0].numpy()
        got = np.asarray(r["heatmap"], np.float32).reshape(r["grid_h"], r["grid_w"])
        np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4)
        sb = scorer.score(img[None])
        assert r["p50"] == pytest.approx(float(sb.summary["p50"][0]), rel=1e-4, abs=1e-3)
    # the default run stores the likelihood grid again, and says so
    assert main(argv) == 0
    rows = cat.load_table("flowscore.image_scores").scan().to_arrow().to_pylist()
    assert {r["heatmap_kind"] for r in rows} == {"likelihood"}


@pytest.mark.slow
def test_bench_times_the_gradient_map_and_refuses_window_presets(tmp_path, capsys) -> None:
    """``bench --heatmap gradient``: the map's images/s, and the scorer's with it (slower
    than without: it is one more forward and a backward pass); a window preset: exit 2."""
    import json

    from jobs.cli import main

    path = tmp_path / "bench.json"
    args = ["bench", "--images", "2", "--batch", "2", "--height", "64", "--width", "96"]
    args += ["--pipeline-images", "0", "--no-bf16", "--quiet", "--heatmap", "gradient"]
    assert main([*args, "--preset", "cnn", "--json", str(path)]) == 0
    r = json.loads(path.read_text())
    assert r["heatmap"] == "gradient" and r["gradient_map_images_per_s"] > 0
    assert r["scorer_gradient_images_per_s"] < r["scorer_images_per_s"]
    assert "with gradient maps" in capsys.readouterr().out
    assert main([*args, "--preset", "grain-full"]) == 2
    assert "cnn-mobilenet" in capsys.readouterr().err


def test_job_spec_takes_the_heatmap_kind(small_scorer, flowscore_home, tmp_path) -> None:
    """``[score] heatmap`` in a job file: likelihood by default, gradient when asked, anything
    else refused naming the key; a window model with gradient is refused at the job's start,
    naming the file, before anything is scored."""
    from flowcore.bundle import save_bundle
    from jobs.nightly import JobUsageError, load_job
    from pipelines.synth import write_archive
    from pipelines.usecases.nightly import run_job

    p = tmp_path / "j.toml"
    archive = tmp_path / "archive"
    write_archive(archive, kind="harvest", images=2, seed=2, height=64, width=96)
    bundle = save_bundle(small_scorer, tmp_path / "bundle")
    base = f'[job]\nname = "j"\narchive = "{archive}"\nmodel = "{bundle}"\n[score]\n'
    p.write_text(base)
    assert load_job(p).heatmap == "likelihood"
    p.write_text(base + 'heatmap = "saliency"\n')
    with pytest.raises(JobUsageError, match="score.heatmap"):
        load_job(p)
    p.write_text(base + 'heatmap = "gradient"\n')
    spec = load_job(p)
    assert spec.heatmap == "gradient"
    with pytest.raises(JobUsageError, match=r"j\.toml.*cnn-mobilenet"):
        run_job(spec, where=str(p), log=lambda s: None, out=lambda s: None)
    assert not (flowscore_home / "catalog.db").exists()
