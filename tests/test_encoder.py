"""Encoder featurizer (autoencoder + flow): grid and geometry, training, the bundle, the fit,
and the Fashion-MNIST converter (on the real dataset where it is installed)."""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import shutil
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import texture
from PIL import Image

from flowcore.bundle import BundleError, load_bundle, save_bundle
from flowcore.encoder import (
    EncoderConfig,
    EncoderFeaturizer,
    encoder_grid_shape,
    fit_encoder,
    sample_crops,
)
from flowcore.fit import (
    PRESETS,
    ConfigError,
    fit_scorer,
    spec_from_dict,
    spec_to_dict,
)
from flowcore.flops import flops_per_image
from flowcore.training import FitConfig
from flowcore.windows import to_tensor

ROOT = Path(__file__).resolve().parents[1]
FMNIST = Path("/usr/share/datasets/fashion-mnist")


def _fashion_mnist():  # the script is not a package module
    spec = importlib.util.spec_from_file_location(
        "fashion_mnist", ROOT / "scripts/fashion_mnist.py"
    )
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["fashion_mnist"] = mod
    spec.loader.exec_module(mod)
    return mod


def shapes(n: int, side: int, seed: int) -> list[np.ndarray]:
    """Grey RGB images of one bright rectangle of random size and place on black: simple
    normal data an autoencoder can learn."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        img = np.zeros((side, side, 3), np.uint8)
        h, w = rng.integers(side // 4, side // 2, 2)
        y, x = rng.integers(1, side - h - 1), rng.integers(1, side - w - 1)
        img[y : y + h, x : x + w] = rng.integers(150, 255)
        out.append(img)
    return out


def small_cfg(**kw: object) -> EncoderConfig:
    base = dict(window=16, channels=(8, 16), latent=6, ae_epochs=3, ae_batch=32)
    base.update(kw)
    return EncoderConfig(**base)  # type: ignore[arg-type]


# ------------------------------------------------------------------ grid and geometry


def test_window_sized_image_is_one_cell_and_larger_image_a_grid() -> None:
    cfg = small_cfg()
    feat = EncoderFeaturizer(cfg, seed=1).eval()
    assert feat.geometry.window == 16 and feat.geometry.stride == 4
    with torch.no_grad():
        one = feat(to_tensor(shapes(2, 16, 0)))
        big = feat(torch.rand(1, 3, 16 + 4 * 5, 16 + 4 * 2))
    assert one.shape == (2, 6, 1, 1)
    assert big.shape == (1, 6, 6, 3) and encoder_grid_shape(36, 24, cfg) == (6, 3)
    with pytest.raises(ValueError, match="smaller than the 16px window"):
        encoder_grid_shape(15, 40, cfg)


def test_cells_see_their_window_and_not_far_pixels() -> None:
    """A pixel changes the codes of the cells whose window (and the stride of context the
    padded convolutions add) holds it, and no others: the geometry maps cells to pixels."""
    cfg = small_cfg()
    feat = EncoderFeaturizer(cfg, seed=2).eval()
    with torch.no_grad():
        for p in feat.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x = torch.rand(1, 3, 48, 48)
    y = x.clone()
    y[0, :, 40, 40] = 1.0 - y[0, :, 40, 40]  # one pixel near the bottom-right corner
    with torch.no_grad():
        changed = (feat(x) - feat(y)).abs().amax(dim=1)[0] > 0  # (gh, gw)
    g = feat.geometry
    for i in range(changed.shape[0]):
        for j in range(changed.shape[1]):
            lo_y, lo_x = i * g.stride, j * g.stride
            inside = lo_y <= 40 < lo_y + g.window and lo_x <= 40 < lo_x + g.window
            near = lo_y - g.stride <= 40 < lo_y + g.window + g.stride and (
                lo_x - g.stride <= 40 < lo_x + g.window + g.stride
            )
            if inside:
                assert changed[i, j], (i, j)
            if not near:
                assert not changed[i, j], (i, j)
    assert changed[-1, -1] and not changed[0, 0]


def test_crops_of_window_sized_images_are_not_repeated() -> None:
    cfg = small_cfg()
    gen = torch.Generator().manual_seed(0)
    assert sample_crops(shapes(3, 16, 1), cfg, 10, gen).shape == (3, 16 * 16)
    rows = sample_crops(texture(2, 40, 30, 1), replace(cfg, grey=False), 5, gen)
    assert rows.shape == (10, 3 * 16 * 16) and 0 <= float(rows.min()) <= float(rows.max()) <= 1


def test_config_is_validated() -> None:
    with pytest.raises(ValueError, match="multiple of 2\\^2"):
        EncoderConfig(window=30, channels=(8, 8))
    with pytest.raises(ValueError, match="recon must be one of"):
        EncoderConfig(recon="sometimes")
    with pytest.raises(ValueError, match="parameters, more than"):
        EncoderConfig(window=512, channels=(1024,) * 6, latent=1024)
    with pytest.raises(ValueError, match="channels"):
        EncoderConfig(channels=(8, True))  # type: ignore[arg-type]


# ------------------------------------------------------------------ training


def test_autoencoder_error_falls_with_training() -> None:
    torch.manual_seed(0)
    cfg = small_cfg(ae_epochs=25, ae_patience=25)
    rows = sample_crops(shapes(300, 16, 3), cfg, 1, torch.Generator().manual_seed(0))
    untrained = EncoderFeaturizer(cfg, seed=0)
    x = rows.view(-1, 1, 16, 16)
    with torch.no_grad():
        before = float((untrained.reconstruct(x) - x).square().mean())
    feat, history = fit_encoder(rows, cfg, seed=0)
    best = history.val[history.best_epoch]
    assert len(history.val) >= 2 and best <= min(history.val) * (1 + 1e-3)
    with torch.no_grad():
        after = float((feat.reconstruct(x) - x).square().mean())
    assert after < 0.5 * before, (before, after)
    assert best < 0.3 * history.val[0]
    # σ² of the reconstruction term is the best held-out error per value
    assert float(feat.recon_var) == pytest.approx(best, rel=1e-5)
    # the codes of the training rows are standardised
    with torch.no_grad():
        z = torch.cat([feat(to_tensor(shapes(100, 16, 3)))]).flatten(1)
    assert z.mean(0).abs().max() < 0.5 and (z.std(0) - 1).abs().max() < 0.5


# ------------------------------------------------------------------ fit, score, bundle


def _spec(**featurizer: object):
    base = PRESETS["ae-flow"]
    return replace(
        base,
        featurizer=replace(small_cfg(ae_epochs=4), **featurizer),  # type: ignore[arg-type]
        fit=FitConfig(batch_size=64, max_epochs=3, patience=1),
        basis_rows=200,
    )


@pytest.fixture(scope="module")
def fitted():
    torch.manual_seed(0)
    spec = _spec()
    scorer, report = fit_scorer(shapes(80, 16, 4), shapes(16, 16, 5), spec)
    return spec, scorer, report


def test_fit_scorer_end_to_end_on_small_images(fitted) -> None:
    spec, scorer, report = fitted
    assert report.train_windows == 80  # one code per window-sized image
    normal = scorer.score(np.stack(shapes(10, 16, 6)))
    assert normal.grid.shape == (10, 1, 1) and np.isfinite(normal.grid).all()
    assert math.isfinite(scorer.threshold)
    gain = scorer.training_stats["recon_gain"]
    assert isinstance(gain, float) and gain > 0
    assert float(scorer.featurizer.recon_gain) == pytest.approx(gain)
    # noise is nothing like a rectangle: scored more anomalous than every normal image
    noise = np.random.default_rng(0).integers(0, 256, (5, 16, 16, 3), dtype=np.uint8)
    bad = scorer.score(noise).summary["anomaly_score"]
    assert bad.min() > normal.summary["anomaly_score"].max()


def test_balanced_recon_term_has_the_flows_spread_on_held_out_images(fitted) -> None:
    _, scorer, _ = fitted
    feat = scorer.featurizer
    with torch.no_grad():
        feats, extra = feat.featurize(to_tensor(shapes(16, 16, 5)))  # the held-out images
        flow_ll = scorer.grid_from_features(feats)
    assert extra is not None
    assert float(extra.std()) == pytest.approx(float(flow_ll.std()), rel=1e-3)


def test_recon_off_adds_no_term_and_density_adds_the_gaussian() -> None:
    torch.manual_seed(0)
    off, _ = fit_scorer(shapes(40, 16, 7), shapes(8, 16, 8), _spec(recon="off"))
    imgs = np.stack(shapes(4, 16, 9))
    feats, extra = off.featurizer.featurize(to_tensor(imgs))
    assert extra is None and "recon_gain" not in off.training_stats
    dens, _ = fit_scorer(shapes(40, 16, 7), shapes(8, 16, 8), _spec(recon="density"))
    assert float(dens.featurizer.recon_gain) == 1.0
    with torch.no_grad():
        x = to_tensor(imgs)
        prepared = dens.featurizer.prepare(x)
        rec = dens.featurizer.reconstruct(prepared)
        var = float(dens.featurizer.recon_var)
        r = (rec - prepared).square().flatten(1).sum(1).double()
        want = -r / (2 * var) - 0.5 * 256 * math.log(2 * math.pi * var)
        got = dens.featurizer.featurize(x)[1]
    assert got is not None
    torch.testing.assert_close(got.flatten().double(), want, rtol=1e-4, atol=1e-3)


def test_fit_on_larger_images_gives_a_grid() -> None:
    torch.manual_seed(0)
    spec = replace(_spec(grey=False), windows_per_image=8)
    scorer, report = fit_scorer(texture(12, 40, 48, 1), texture(3, 40, 48, 2), spec)
    assert report.train_windows == 12 * 8
    out = scorer.score(np.stack(texture(2, 40, 48, 3)))
    assert out.grid.shape == (2, *encoder_grid_shape(40, 48, spec.featurizer))
    assert np.isfinite(out.grid).all()
    fl = flops_per_image(scorer, 40, 48)
    assert fl["windows"] == out.grid.shape[1] * out.grid.shape[2] and fl["projection"] > 0


def test_bundle_round_trip_is_bit_identical(fitted, tmp_path) -> None:
    _, scorer, _ = fitted
    imgs = np.stack(
        [
            *shapes(4, 16, 10),
            *np.random.default_rng(1).integers(0, 255, (2, 16, 16, 3), dtype=np.uint8),
        ]
    )
    before = scorer.score(imgs)
    save_bundle(scorer, tmp_path / "b")
    loaded = load_bundle(tmp_path / "b")
    assert loaded.featurizer.cfg == scorer.featurizer.cfg
    after = loaded.score(imgs)
    assert np.array_equal(before.grid, after.grid)
    assert np.array_equal(before.summary["anomaly_score"], after.summary["anomaly_score"])
    assert loaded.threshold == scorer.threshold
    meta = json.loads((tmp_path / "b" / "flowscore.json").read_text())
    assert meta["featurizer"]["type"] == "encoder" and meta["featurizer"]["channels"] == [8, 16]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"channels": [8, True]}, "channels"),
        ({"channels": "8,16"}, "channels must be a list"),
        ({"window": 18}, "multiple of 2\\^2"),
        ({"latent": 6.5}, "latent must be of type int"),
        ({"grey": 1}, "grey must be of type bool"),
        ({"recon": "maybe"}, "recon must be one of"),
        ({"depth": 3}, "unknown key 'depth'"),
        ({"latent": 7}, "flow.features=6 does not match"),
    ],
)
def test_malformed_encoder_config_is_refused(fitted, tmp_path, change, message) -> None:
    _, scorer, _ = fitted
    b = save_bundle(scorer, tmp_path / "b")
    meta = json.loads((b / "flowscore.json").read_text())
    meta["featurizer"].update(change)
    (b / "flowscore.json").write_text(json.dumps(meta))
    with pytest.raises(BundleError, match=message):
        load_bundle(b)


def test_encoder_weights_of_another_shape_are_refused(fitted, tmp_path) -> None:
    """A JSON whose encoder differs from the stored tensors (wider channels) is refused by the
    tensor check before any weight is used."""
    _, scorer, _ = fitted
    b = save_bundle(scorer, tmp_path / "b")
    meta = json.loads((b / "flowscore.json").read_text())
    meta["featurizer"]["channels"] = [8, 32]
    (b / "flowscore.json").write_text(json.dumps(meta))
    with pytest.raises(BundleError, match="tensor 'featurizer.encoder.2.weight' has shape"):
        load_bundle(b)


def test_spec_round_trips_as_data() -> None:
    spec = PRESETS["ae-flow"]
    assert spec_from_dict(json.loads(json.dumps(spec_to_dict(spec)))) == spec
    with pytest.raises(ConfigError, match="featurizer.*ae_epochs must be of type int"):
        spec_from_dict({"featurizer": {"type": "encoder", "ae_epochs": "ten"}}, "job.toml")


# ------------------------------------------------------------------ Fashion-MNIST converter


def test_missing_dataset_names_the_package(tmp_path) -> None:
    fm = _fashion_mnist()
    with pytest.raises(fm.DatasetError, match="apt-get install dataset-fashion-mnist"):
        fm.check_files(tmp_path)


needs_dataset = pytest.mark.skipif(
    not FMNIST.is_dir(),
    reason=f"{FMNIST} absent: apt-get install dataset-fashion-mnist for the converter test",
)


@needs_dataset
def test_modified_dataset_file_is_refused(tmp_path) -> None:
    fm = _fashion_mnist()
    for f in FMNIST.glob("*.gz"):
        shutil.copy(f, tmp_path / f.name)
    with (tmp_path / "t10k-labels-idx1-ubyte.gz").open("ab") as f:
        f.write(b"\0")
    with pytest.raises(fm.DatasetError, match="t10k-labels.*SHA-256"):
        fm.check_files(tmp_path)


@needs_dataset
def test_archive_labels_match_classes(tmp_path) -> None:
    fm = _fashion_mnist()
    out = tmp_path / "fmnist"
    assert fm.main(["archive", str(out), "--normal", "3", "--train", "30", "--test", "60"]) == 0
    with (out / "_truth" / "labels.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 90
    te_x, te_y = fm.load("t10k")
    tr_x, tr_y = fm.load("train")
    seen_classes = set()
    for r in rows:
        split, cls, name = r["path"].split("/")
        k = int(cls.removeprefix("class="))
        seen_classes.add(k)
        assert r["label"] == str(int(k != 3))
        if split == "split=train":
            assert k == 3
        xs, ys = (tr_x, tr_y) if split == "split=train" else (te_x, te_y)
        i = int(name.removesuffix(".png"))
        assert ys[i] == k
        assert np.array_equal(np.asarray(Image.open(out / r["path"])), xs[i])
    assert len(seen_classes) > 5  # test images of many classes
    assert sum(r["label"] == "0" for r in rows) >= 30


@needs_dataset
@pytest.mark.ray
@pytest.mark.slow
def test_ae_flow_trains_evaluates_and_scores_end_to_end(ray_session, tmp_path, monkeypatch):
    """Issue 15's "end to end on the embedded defaults": a one-class Fashion-MNIST archive,
    `flowscore train --preset ae-flow` on Ray Train, `evaluate` against its labels, and
    `score` into the tables, every image scored once."""
    from jobs.cli import main
    from pipelines import tables

    fm = _fashion_mnist()
    out = tmp_path / "fmnist"
    assert fm.main(["archive", str(out), "--normal", "1", "--train", "80", "--test", "40"]) == 0
    monkeypatch.setenv("FLOWSCORE_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = tmp_path / "tiny.toml"
    cfg.write_text("[featurizer]\nae_epochs = 3\n[fit]\nmax_epochs = 3\n")
    train = ["train", "--archive", str(out), "--name", "fm1", "--preset", "ae-flow"]
    assert main([*train, "--only", "split=train", "--config", str(cfg), "--quiet"]) == 0
    report = tmp_path / "eval.json"
    args = ["--archive", str(out), "--model", "models:/fm1@champion", "--only", "split=test"]
    assert main(["evaluate", *args, "--json", str(report), "--no-mlflow", "--quiet"]) == 0
    r = json.loads(report.read_text())
    assert r["images"] == 40 and 0 < r["anomalous"] < 40
    assert 0.5 < r["image_auroc"]["flow"] <= 1.0  # trousers against the rest, 3 epochs
    assert main(["score", *args, "--quiet"]) == 0
    scores = tables.load_catalog_().load_table("flowscore.image_scores").scan().to_arrow()
    assert scores.num_rows == 40
    assert set(scores.column("grid_h").to_pylist()) == {1}  # one code per 28×28 image
