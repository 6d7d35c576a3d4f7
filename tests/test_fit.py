"""Spec as data (TOML/MLflow/Ray form), hold-out split and the per-image fitting steps."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import texture

from flowcore.fit import (
    PRESETS,
    ConfigError,
    apply_overrides,
    basis_sample,
    constant_dimensions_warning,
    feature_rows,
    fit_featurizer,
    image_generator,
    spec_from_dict,
    spec_to_dict,
    split_holdout,
)
from flowcore.flows import BNAFConfig, MAFConfig
from flowcore.training import EarlyStopping, load_optimizer_tensors, optimizer_tensors


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_spec_round_trips_through_dict(name):
    spec = PRESETS[name]
    assert spec_from_dict(spec_to_dict(spec)) == spec


def test_overrides_replace_fields_and_keep_the_rest():
    base = PRESETS["grain-full"]
    spec = apply_overrides(
        base, {"fit": {"lr": 5e-4}, "flow": {"blocks": 3}, "seed": 7}, "job.toml"
    )
    assert spec.fit.lr == 5e-4 and spec.fit.batch_size == base.fit.batch_size
    assert isinstance(spec.flow, MAFConfig) and spec.flow.blocks == 3
    assert spec.flow.hidden == base.flow.hidden and spec.seed == 7
    assert spec.featurizer == base.featurizer


def test_changing_flow_type_starts_from_its_defaults():
    spec = apply_overrides(PRESETS["grain-full"], {"flow": {"type": "bnaf"}}, "x.toml")
    assert spec.flow == BNAFConfig()


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ({"fit": {"lrr": 1}}, "'lrr'"),
        ({"bogus": 1}, "'bogus'"),
        ({"flow": {"type": "glow"}}, "glow"),
        ({"featurizer": {"window": -1}}, "window"),
        ({"fit": 3}, "'fit' must be a table"),
    ],
)
def test_bad_overrides_name_file_and_key(override, needle):
    with pytest.raises(ConfigError) as e:
        apply_overrides(PRESETS["grain-full"], override, "my.toml")
    assert "my.toml" in str(e.value) and needle in str(e.value)


def test_split_holds_out_whole_items_stably():
    keys = [f"year=2017/img{i:03d}.jpg" for i in range(200)]
    train, val = split_holdout(keys, 0.1, seed=0)
    assert sorted(train + val) == list(range(200)) and not set(train) & set(val)
    assert len(val) == 20  # exactly round(0.1 · 200), whatever the hash values
    assert len(split_holdout(keys[:31], 0.2, 0)[1]) == 6
    assert split_holdout(list(reversed(keys)), 0.1, 0)[1] == sorted(199 - i for i in val)
    assert split_holdout(keys, 0.1, seed=1)[1] != val
    tiny_train, tiny_val = split_holdout(["a", "b"], 0.1, 0)
    assert len(tiny_train) == 1 and len(tiny_val) == 1


def test_per_image_generator_is_stable_and_distinct():
    a = torch.rand(4, generator=image_generator(0, "x.jpg"))
    b = torch.rand(4, generator=image_generator(0, "x.jpg"))
    c = torch.rand(4, generator=image_generator(0, "y.jpg"))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_feature_rows_are_the_featurizer_projection():
    spec = spec_from_dict(
        {"featurizer": {"type": "windows", "window": 6, "stride": 3, "components": 5}}
    )
    imgs = texture(3, 24, 32, 0)
    rows = basis_sample(spec, imgs, 50, torch.Generator().manual_seed(0))
    assert rows.shape == (150, 3 * 36)
    feat = fit_featurizer(spec, rows)
    x = feature_rows(feat, spec, imgs, 40, torch.Generator().manual_seed(1))
    assert x.shape == (120, 5)
    # whitened: unit variance per component on (other) windows of the same images
    torch.testing.assert_close(x.std(0), torch.ones(5), atol=0.35, rtol=0)


def test_early_stopping_state_round_trips():
    s = EarlyStopping(patience=1, min_delta=0.1)
    assert s.update(1, 5.0) and s.bad == 0
    # a better epoch by less than min_delta is the new best, but patience keeps counting
    assert s.update(2, 4.95) and s.best == 4.95 and s.best_epoch == 2 and s.bad == 1
    assert not s.should_stop and not s.update(3, 6.0) and s.should_stop
    t = EarlyStopping(1, 0.1)
    t.load_state(s.state())
    assert (t.best, t.best_epoch, t.bad) == (s.best, s.best_epoch, s.bad)


def test_optimizer_state_survives_safetensors_form():
    lin = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(lin.parameters(), lr=0.1)
    for _ in range(3):
        opt.zero_grad()
        lin(torch.randn(5, 3)).square().sum().backward()
        opt.step()
    flat = optimizer_tensors(opt)
    assert all(isinstance(v, torch.Tensor) for v in flat.values())
    lin2 = torch.nn.Linear(3, 2)
    lin2.load_state_dict(lin.state_dict())
    opt2 = torch.optim.Adam(lin2.parameters(), lr=0.1)
    load_optimizer_tensors(opt2, flat)
    x = torch.randn(5, 3)
    for o, m in ((opt, lin), (opt2, lin2)):
        o.zero_grad()
        m(x).square().sum().backward()
        o.step()
    torch.testing.assert_close(lin.weight, lin2.weight)


def test_a_model_without_reduction_gets_no_dimension_that_never_varies_from_grey_images():
    """A grey camera's images are RGB with R = G = B: two thirds of a window's dimensions never
    vary, and a flow trained on exact windows shrinks them to nothing (gravel, 11×11 windows
    at full resolution: spots at image AUROC 0.485; 0.972 with dequantised windows).
    grain-quarter keeps every dimension, so it trains on dequantised windows: each feature
    its flow sees varies by at least a tenth of a whitened unit. Exact windows do not."""
    grey = [np.repeat(im[..., :1], 3, axis=2) for im in texture(6, 96, 96, 4)]
    preset = PRESETS["grain-quarter"]
    assert preset.featurizer.components is None and preset.dequantize
    spec = replace(preset, featurizer=replace(preset.featurizer, window=5, scale=1.0))
    feat = fit_featurizer(spec, basis_sample(spec, grey, 500, torch.Generator().manual_seed(0)))
    spread = {}
    for dq in (True, False):
        rows = feature_rows(feat, replace(spec, dequantize=dq), grey, 400, torch.Generator())
        spread[dq] = float(rows.std(0).min())
    assert spread[True] > 0.1 and spread[False] < 0.01, spread
    # a user who turns the noise off on such images is warned at fit time, naming the fix
    rows = basis_sample(spec, grey, 500, torch.Generator().manual_seed(0))
    exact = replace(spec, dequantize=False)
    warning = constant_dimensions_warning(exact, rows)
    assert warning is not None and "50 of the 75 window dimensions" in warning
    assert "dequantize = true" in warning
    assert constant_dimensions_warning(spec, rows) is None  # dequantised: nothing to say
    # a model that keeps only the dimensions that vary is fine on exact windows
    reduced = replace(exact, featurizer=replace(exact.featurizer, components=20))
    assert constant_dimensions_warning(reduced, rows) is None
    colour = basis_sample(spec, texture(6, 96, 96, 4), 500, torch.Generator().manual_seed(0))
    assert constant_dimensions_warning(exact, colour) is None
