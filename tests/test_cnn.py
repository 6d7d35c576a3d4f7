"""CNN feature-grid featurizer: grid shapes and geometry against the real network, fitted
standardisation, seeded backbones, user weight files, the cnn preset end to end and its bundle.
Everything is built with ``weights=None``: nothing is downloaded."""

from __future__ import annotations

import json
import math
import pickle
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import texture
from safetensors.torch import load_file, save_file
from torchvision.models import resnet18

from flowcore.bundle import BundleError, load_bundle, save_bundle
from flowcore.cnn import (
    BackboneWeightsError,
    CNNConfig,
    CNNFeaturizer,
    cnn_grid_shape,
    load_backbone_weights,
    read_backbone_weights,
    sample_cells,
)
from flowcore.fit import (
    PRESETS,
    ConfigError,
    apply_overrides,
    basis_sample,
    feature_rows,
    featurizer_config_from_dict,
    featurizer_config_to_dict,
    fit_featurizer,
    fit_scorer,
    init_featurizer,
)
from flowcore.flops import backbone_flops, flops_per_image
from flowcore.flows import CouplingConfig
from flowcore.scorer import Scorer, heatmap_to_image
from flowcore.training import FitConfig
from flowcore.windows import to_tensor


@pytest.fixture(scope="module")
def feat() -> CNNFeaturizer:
    """resnet18 layer2 + layer3 at 50 %, random weights seeded 0."""
    return CNNFeaturizer(CNNConfig(), seed=0)


@pytest.fixture(scope="module")
def cnn_scorer() -> Scorer:
    """The cnn preset, shrunk: a tiny coupling flow trained 2 epochs on a few textures."""
    spec = replace(
        PRESETS["cnn"],
        flow=CouplingConfig(blocks=2, hidden=(32,)),
        fit=FitConfig(max_epochs=2, batch_size=128, lr=1e-3),
        windows_per_image=40,
        basis_rows=400,
    )
    scorer, report = fit_scorer(texture(6, 64, 96, 1), texture(3, 64, 96, 2), spec)
    assert report.train_windows == 6 * 40 and len(report.epochs) == 2
    return scorer


def _state_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------ config and shapes


@pytest.mark.parametrize(
    ("backbone", "layers", "channels", "h", "w"),
    [
        ("resnet18", ("layer2", "layer3"), 128 + 256, 64, 96),
        ("resnet18", ("layer2", "layer3"), 128 + 256, 77, 131),
        ("resnet18", ("layer3", "layer1"), 256 + 64, 77, 131),
        ("wide_resnet50_2", ("layer2", "layer3"), 512 + 1024, 77, 131),
        ("alexnet", ("features.2", "features.5"), 64 + 192, 64, 96),
        ("alexnet", ("features.12", "features.0"), 256 + 64, 128, 201),
    ],
)
def test_output_is_features_by_grid(backbone, layers, channels, h, w) -> None:
    cfg = CNNConfig(backbone=backbone, layers=layers, scale=0.5)
    f = CNNFeaturizer(cfg, init=False)  # shapes only: no need to initialise
    with torch.no_grad():
        out = f(torch.rand(2, 3, h, w))
    gh, gw = cnn_grid_shape(h, w, cfg)
    assert cfg.features == channels
    assert out.shape == (2, channels, gh, gw)
    assert cfg.stride == (4 if {"layer1", "features.0"} & set(layers) else 8)
    if backbone != "alexnet":  # resnets: every stride-2 stage rounds up
        s = cfg.stride
        assert (gh, gw) == (math.ceil(round(h * 0.5) / s), math.ceil(round(w * 0.5) / s))


def test_too_small_image_is_a_clear_error() -> None:
    f = CNNFeaturizer(
        CNNConfig(backbone="alexnet", layers=("features.0", "features.12")), init=False
    )
    with pytest.raises(ValueError, match=r"77×131 \(×0\.5\) is too small for alexnet features\.12"):
        f(torch.rand(1, 3, 77, 131))


def test_unknown_layers_and_bad_configs_raise() -> None:
    with pytest.raises(ValueError, match=r"'layer5' is not a layer of resnet18"):
        CNNConfig(layers=("layer2", "layer5"))
    with pytest.raises(ValueError, match=r"'layer2' is not a layer of alexnet.*features\.0"):
        CNNConfig(backbone="alexnet", layers=("layer2",))
    with pytest.raises(ValueError, match="backbone must be one of"):
        CNNConfig(backbone="vgg16")
    with pytest.raises(ValueError, match="duplicates"):
        CNNConfig(layers=("layer2", "layer2"))
    with pytest.raises(ValueError, match="at least one"):
        CNNConfig(layers=())
    with pytest.raises(ValueError, match="list of layer names"):
        CNNConfig(layers="layer2")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="scale"):
        CNNConfig(scale=0)


def test_config_round_trips_as_data_and_errors_name_the_file() -> None:
    cfg = CNNConfig(backbone="alexnet", layers=("features.5", "features.2"), scale=0.25)
    d = featurizer_config_to_dict(cfg)
    assert d == {
        "type": "cnn",
        "backbone": "alexnet",
        "layers": ["features.5", "features.2"],
        "scale": 0.25,
    }
    assert featurizer_config_from_dict(json.loads(json.dumps(d))) == cfg
    spec = apply_overrides(PRESETS["cnn"], {"featurizer": {"layers": ["layer1"]}}, "job.toml")
    assert spec.featurizer == CNNConfig(layers=("layer1",)) and spec.features == 64
    with pytest.raises(ConfigError, match=r"job\.toml.*'layer9'"):
        apply_overrides(PRESETS["cnn"], {"featurizer": {"layers": ["layer9"]}}, "job.toml")


# ------------------------------------------------------------------------------- geometry


def test_geometry_puts_cells_where_the_network_looks(feat) -> None:
    """A one-hot heatmap cell, upsampled with the featurizer's geometry, peaks at a pixel; a
    bright spot at that pixel moves the features of that very cell most, in the finest layer
    and in the coarser layer resampled onto its grid (a half-cell misalignment fails)."""
    h, w = 128, 192
    gh, gw = cnn_grid_shape(h, w, feat.cfg)
    geo = feat.geometry
    assert (geo.stride, geo.scale) == (8, 0.5)
    i, j = 4, 6
    hot = np.zeros((gh, gw), np.float32)
    hot[i, j] = 1.0
    up = heatmap_to_image(hot, geo, h, w)
    py, px = divmod(int(up.argmax()), w)
    centre = (
        (i * geo.stride + geo.window / 2) / geo.scale,
        (j * geo.stride + geo.window / 2) / geo.scale,
    )
    assert abs(py + 0.5 - centre[0]) <= 1 / geo.scale and abs(px + 0.5 - centre[1]) <= 1 / geo.scale

    base = torch.full((1, 3, h, w), 0.5)
    spot = base.clone()
    spot[..., py - 1 : py + 1, px - 1 : px + 1] = 1.0
    with torch.no_grad():
        delta = (feat.raw(spot) - feat.raw(base))[0].square()
    ys, xs = torch.arange(gh, dtype=torch.float32), torch.arange(gw, dtype=torch.float32)
    for part in (delta[:128], delta[128:]):  # layer2 channels, then resampled layer3
        m = part.sum(0)
        m = m / m.sum()
        cy, cx = float((m.sum(1) * ys).sum()), float((m.sum(0) * xs).sum())
        assert abs(cy - i) < 0.3 and abs(cx - j) < 0.3, (cy, cx)


# ---------------------------------------------------------------- fitting the featurizer


def test_standardisation_makes_rows_zero_mean_unit_std(feat) -> None:
    spec = replace(PRESETS["cnn"], basis_rows=2000)
    imgs = texture(8, 96, 128, 3)
    raw = basis_sample(spec, imgs, 250, torch.Generator().manual_seed(0), featurizer=feat)
    assert raw.shape == (2000, 384) and raw.device.type == "cpu"
    fitted = fit_featurizer(spec, raw, featurizer=feat)
    assert torch.equal(feat.mean, torch.zeros(384))  # the handed featurizer is not modified
    live = raw.std(0) > 1e-3 * raw.std(0).mean()  # (a few random-init ReLUs are dead)
    assert live.sum() > 300
    assert raw.mean(0)[live].abs().mean() > 0.2 and (raw.std(0)[live] - 1).abs().mean() > 0.2
    # the same cells (same generator): exactly standardised
    rows = feature_rows(fitted, spec, imgs, 250, torch.Generator().manual_seed(0))
    torch.testing.assert_close(rows.mean(0)[live], torch.zeros(int(live.sum())), atol=1e-3, rtol=0)
    torch.testing.assert_close(rows.std(0)[live], torch.ones(int(live.sum())), atol=1e-3, rtol=0)
    # other cells of the same images: about so
    rows = feature_rows(fitted, spec, imgs, 250, torch.Generator().manual_seed(1))
    assert rows.mean(0)[live].abs().mean() < 0.05
    assert (rows.std(0)[live] - 1).abs().mean() < 0.05
    # the standardisation is exactly the featurizer's forward on whole grids
    x = to_tensor(np.stack(imgs[:2]))
    with torch.no_grad():
        want = (feat.raw(x) - fitted.mean[:, None, None]) * fitted.inv_std[:, None, None]
        torch.testing.assert_close(fitted(x), want)


def test_rows_do_not_depend_on_batching(feat) -> None:
    imgs = texture(5, 64, 96, 4)
    a = sample_cells(feat, imgs, 7, torch.Generator().manual_seed(3), dequantize=True, batch=1)
    b = sample_cells(feat, imgs, 7, torch.Generator().manual_seed(3), dequantize=True, batch=4)
    c = sample_cells(feat, imgs, 7, torch.Generator().manual_seed(3), batch=4)
    assert a.shape == (35, 384)
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, c)  # the dequantisation noise is really added


def test_random_backbone_is_deterministic_by_seed() -> None:
    cfg = CNNConfig(layers=("layer1", "layer2"))
    torch.manual_seed(123)
    before = torch.rand(3)
    a = CNNFeaturizer(cfg, seed=5).state_dict()
    b = CNNFeaturizer(cfg, seed=5).state_dict()
    c = CNNFeaturizer(cfg, seed=6).state_dict()
    torch.manual_seed(123)
    assert torch.equal(torch.rand(3), before)  # the global RNG is left alone
    assert _state_equal(a, b)
    assert not torch.equal(a["backbone.conv1.weight"], c["backbone.conv1.weight"])
    spec = replace(PRESETS["cnn"], featurizer=cfg, seed=5)
    assert _state_equal(init_featurizer(spec).state_dict(), a)


def test_backbone_stays_in_eval_mode_and_frozen(feat) -> None:
    f = CNNFeaturizer(CNNConfig(layers=("layer1",)), init=False)
    f.train()
    assert f.training and not f.backbone.training
    assert not any(p.requires_grad for p in f.parameters())
    assert all(not m.training for m in f.backbone.modules())


# ------------------------------------------------------------------------ backbone weights


def _other_resnet18(tmp_path, seed: int = 7) -> tuple[torch.nn.Module, dict]:
    torch.manual_seed(seed)
    model = resnet18(weights=None).eval()
    with torch.no_grad():  # non-trivial BatchNorm statistics, as in trained weights
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 2.0)
    return model, {k: v.clone() for k, v in model.state_dict().items()}


def _torchvision_layer2(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """layer2 of a plain torchvision resnet on images in [0, 1], computed independently."""
    x = F.interpolate(x, scale_factor=0.5, mode="bilinear", antialias=True, align_corners=False)
    mean = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
    std = torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    x = (x - mean) / std
    for name in ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2"):
        x = getattr(model, name)(x)
    return x


def test_weights_from_safetensors_give_that_models_features(feat, tmp_path) -> None:
    model, state = _other_resnet18(tmp_path)
    path = tmp_path / "resnet18.safetensors"
    save_file(state, str(path))  # the whole classifier, fc and layer4 included
    x = to_tensor(np.stack(texture(2, 64, 96, 8)))
    with torch.no_grad():
        want = _torchvision_layer2(model, x)
        f = CNNFeaturizer(CNNConfig(), seed=0)
        assert not torch.allclose(f.raw(x)[:, :128], want, atol=1e-3)
        loaded = load_backbone_weights(f, path)
        torch.testing.assert_close(f.raw(x)[:, :128], want, rtol=1e-4, atol=1e-4)
    assert not any(k.startswith(("fc.", "layer4.")) for k in loaded)
    assert _state_equal(loaded, read_backbone_weights(path, f.cfg))
    # the same state through the fitting steps: init_featurizer, fit_featurizer, fit_scorer
    spec = replace(
        PRESETS["cnn"],
        flow=CouplingConfig(blocks=1, hidden=(16,)),
        fit=FitConfig(max_epochs=1),
        windows_per_image=10,
        basis_rows=60,
    )
    base = init_featurizer(spec, loaded)
    assert _state_equal(base.backbone.state_dict(), f.backbone.state_dict())
    fitted = fit_featurizer(spec, torch.randn(10, 384), loaded)
    assert _state_equal(fitted.backbone.state_dict(), f.backbone.state_dict())
    imgs = texture(4, 64, 96, 9)
    scorer, _ = fit_scorer(imgs[:3], imgs[3:], spec, backbone_state=loaded)
    assert _state_equal(scorer.featurizer.backbone.state_dict(), f.backbone.state_dict())
    with pytest.raises(ValueError, match="windows featurizer has none"):
        fit_featurizer(PRESETS["grain-quarter"], torch.randn(10, 363), loaded)


def test_weights_from_torchvision_pth(tmp_path) -> None:
    model, state = _other_resnet18(tmp_path, seed=8)
    path = tmp_path / "resnet18-f37072fd.pth"
    # old torchvision files carry no BatchNorm num_batches_tracked: still accepted
    torch.save({k: v for k, v in state.items() if "num_batches" not in k}, path)
    f = CNNFeaturizer(CNNConfig(layers=("layer2",)), init=False)
    load_backbone_weights(f, path)
    x = to_tensor(np.stack(texture(1, 64, 96, 10)))
    with torch.no_grad():
        torch.testing.assert_close(f.raw(x), _torchvision_layer2(model, x), rtol=1e-4, atol=1e-4)


def test_bad_weight_files_are_refused_with_file_and_key(feat, tmp_path) -> None:
    _, state = _other_resnet18(tmp_path)
    bad = dict(state)
    bad["layer2.0.conv1.weight"] = torch.zeros(128, 64, 5, 5)
    path = tmp_path / "bad.safetensors"
    save_file(bad, str(path))
    before = {k: v.clone() for k, v in feat.state_dict().items()}
    with pytest.raises(BackboneWeightsError, match=r"bad\.safetensors.*'layer2\.0\.conv1\.weight'"):
        load_backbone_weights(feat, path)
    assert _state_equal(feat.state_dict(), before)  # nothing half-loaded
    with pytest.raises(
        BackboneWeightsError, match=r"bad\.safetensors.*has shape \(128, 64, 5, 5\)"
    ):
        read_backbone_weights(path, feat.cfg)
    missing = tmp_path / "missing.safetensors"
    save_file({k: v for k, v in state.items() if not k.startswith("layer3.")}, str(missing))
    with pytest.raises(BackboneWeightsError, match=r"missing\.safetensors.*'layer3\.0\.conv1"):
        read_backbone_weights(missing, feat.cfg)
    wide = CNNConfig(backbone="wide_resnet50_2")
    save_file(state, str(tmp_path / "resnet18.safetensors"))
    with pytest.raises(BackboneWeightsError, match=r"resnet18\.safetensors.*'layer1\.0\.conv3"):
        read_backbone_weights(tmp_path / "resnet18.safetensors", wide)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a torch file")
    with pytest.raises(BackboneWeightsError, match=r"junk\.pth"):
        read_backbone_weights(junk, feat.cfg)
    with pytest.raises(BackboneWeightsError, match="not found"):
        read_backbone_weights(tmp_path / "nope.pth", feat.cfg)


# --------------------------------------------------------------- scorer, bundle and FLOPs


def test_cnn_preset_fits_and_scores(cnn_scorer) -> None:
    imgs = np.stack(texture(3, 64, 96, 11))
    sb = cnn_scorer.score(imgs)
    assert sb.grid.shape == (3, 4, 6) and np.isfinite(sb.grid).all()
    assert math.isfinite(cnn_scorer.threshold) and cnn_scorer.heatmap_clip is not None
    assert cnn_scorer.geometry == cnn_scorer.featurizer.geometry
    # a bright square stands out as low likelihood where it is
    odd = imgs[:1].copy()
    odd[0, 16:48, 48:80] = 255
    g = cnn_scorer.score(odd).grid[0]
    assert g[1:3, 3:5].mean() < np.median(sb.grid[0])


def test_cnn_bundle_round_trip_is_identical(cnn_scorer, tmp_path, monkeypatch) -> None:
    imgs = np.stack(texture(2, 64, 96, 12))
    b = save_bundle(cnn_scorer, tmp_path / "b")
    meta = json.loads((b / "flowscore.json").read_text())
    assert meta["featurizer"] == {
        "type": "cnn",
        "backbone": "resnet18",
        "layers": ["layer2", "layer3"],
        "scale": 0.5,
    }
    names = load_file(str(b / "weights.safetensors")).keys()
    assert {"featurizer.mean", "featurizer.inv_std", "featurizer.pixel_mean"} <= names
    assert "featurizer.backbone.layer3.1.bn2.running_var" in names

    def boom(*a, **k):
        raise AssertionError("unpickling during bundle load")

    with monkeypatch.context() as m:
        m.setattr(pickle, "loads", boom)
        m.setattr(pickle, "Unpickler", boom)
        m.setattr(torch, "load", boom)
        loaded = load_bundle(b)
    assert np.array_equal(cnn_scorer.score(imgs).grid, loaded.score(imgs).grid)
    assert loaded.geometry == cnn_scorer.geometry

    t = load_file(str(b / "weights.safetensors"))
    t["featurizer.backbone.conv1.weight"] = torch.zeros(64, 3, 3, 3)
    save_file(t, str(b / "weights.safetensors"))
    with pytest.raises(BundleError, match=r"'featurizer\.backbone\.conv1\.weight' has shape"):
        load_bundle(b)


def test_flops_count_the_backbone_convolutions(cnn_scorer) -> None:
    # torchvision documents 1.81 GFLOPS (multiply-adds) for resnet18 at 224×224
    full = CNNFeaturizer(CNNConfig(layers=("layer4",), scale=1.0), init=False)
    assert backbone_flops(full, 224, 224) / 2e9 == pytest.approx(1.814, rel=0.005)
    fl = flops_per_image(cnn_scorer, 64, 96)
    assert fl["windows"] == 24
    assert fl["total"] == fl["projection"] + fl["flow"] > 0


@pytest.mark.gpu
def test_cnn_scorer_and_rows_on_cuda_match_cpu(cnn_scorer) -> None:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    imgs = texture(2, 64, 96, 13)
    spec = replace(PRESETS["cnn"], dequantize=True)
    cpu = cnn_scorer.score(np.stack(imgs))
    rows_cpu = feature_rows(cnn_scorer.featurizer, spec, imgs, 9, torch.Generator().manual_seed(0))
    cnn_scorer.to("cuda")
    try:
        gpu = cnn_scorer.score(np.stack(imgs))
        rows_gpu = feature_rows(
            cnn_scorer.featurizer, spec, imgs, 9, torch.Generator().manual_seed(0)
        )
    finally:
        cnn_scorer.to("cpu")
    assert rows_gpu.device.type == "cuda"
    np.testing.assert_allclose(cpu.grid, gpu.grid, rtol=1e-3, atol=1e-2)
    # cuDNN may use TF32 for convolutions: standardised rows agree to a few 1e-3
    torch.testing.assert_close(rows_cpu, rows_gpu.cpu(), rtol=2e-2, atol=2e-2)
