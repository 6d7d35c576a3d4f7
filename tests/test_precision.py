"""bfloat16 arithmetic for the featurizer (``--precision bf16``): the convolution it uses,
and how far it moves a trained window model's log-likelihoods (the gates of issue 14)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.stats import spearmanr

from flowcore.bundle import BundleError, load_bundle, save_bundle
from flowcore.fit import ScorerSpec, fit_scorer
from flowcore.flows import MAFConfig
from flowcore.precision import GATES, PrecisionGates, check_precision, has_bf16_units, spearman
from flowcore.scorer import resolve_precision
from flowcore.training import FitConfig
from flowcore.windows import WindowConfig, conv_windows_bf16
from pipelines.synth import render_image


@pytest.mark.parametrize(
    ("h", "w", "window", "stride"), [(37, 50, 9, 4), (64, 96, 8, 8), (33, 41, 11, 3)]
)
@pytest.mark.parametrize("pixels", ["8-bit", "resized"])
def test_bf16_convolution_matches_the_float32_one(h, w, window, stride, pixels):
    gen = torch.Generator().manual_seed(h + w)
    x = torch.rand(2, 3, h, w, generator=gen)
    if pixels == "8-bit":
        x = torch.round(x * 255) / 255
    weight = torch.randn(7, 3, window, window, generator=gen) / window
    bias = torch.randn(7, generator=gen)
    centre = x.mean((0, 2, 3))
    ref = F.conv2d(x.double(), weight.double(), bias.double(), stride=stride)
    got = conv_windows_bf16(x, weight, bias, window, stride, centre, levels=pixels == "8-bit")
    assert got.dtype == torch.float32 and got.shape == ref.shape
    scale = (ref - bias.double().view(1, -1, 1, 1)).abs().max()
    err = (got.double() - ref).abs().max() / scale
    assert err < 1e-2, err  # bf16 operands (8 bits), float32 accumulation


def test_resolve_precision():
    assert resolve_precision("fp32") == "fp32" and resolve_precision("bf16") == "bf16"
    # auto: bf16 only for a model validated in it, on a device with bf16 units
    assert resolve_precision("auto", "cpu") == "fp32"
    assert resolve_precision("auto", "cpu", ("fp32",), bf16_units=True) == "fp32"
    assert resolve_precision("auto", "cpu", ("fp32", "bf16"), bf16_units=False) == "fp32"
    assert resolve_precision("auto", "cpu", ("fp32", "bf16"), bf16_units=True) == "bf16"
    assert resolve_precision("auto", "cpu", ("fp32", "bf16")) == (
        "bf16" if has_bf16_units("cpu") else "fp32"
    )
    with pytest.raises(ValueError, match="fp32, bf16 or auto"):
        resolve_precision("fp16")


def test_spearman_values_and_edge_cases():
    assert spearman(np.array([1.0, 2, 3, 4]), np.array([1.0, 3, 2, 4])) == pytest.approx(0.8)
    assert spearman(np.array([1.0, 1, 2, 3]), np.array([3.0, 3, 2, 1])) == pytest.approx(-1.0)
    assert spearman(np.array([1.0, 2]), np.array([2.0, 1])) is None  # too few to rank
    assert spearman(np.ones(5), np.arange(5.0)) == 0.0  # scipy: nan
    assert spearman(np.ones(5), np.ones(5)) == 1.0


@pytest.fixture(scope="module")
def trained():
    rng = np.random.default_rng(3)
    imgs = [
        render_image("harvest", rng, camera=1 + i % 2, anomalous=i >= 24, height=96, width=128)[0]
        for i in range(32)
    ]
    spec = ScorerSpec(
        featurizer=WindowConfig(window=16, stride=4, components=24, residual_feature=True),
        flow=MAFConfig(blocks=3, hidden=48),
        fit=FitConfig(max_epochs=15, batch_size=256),
        windows_per_image=200,
        basis_rows=4000,
    )
    torch.manual_seed(0)
    scorer, _ = fit_scorer(imgs[:18], imgs[18:22], spec)
    return scorer.eval(), imgs[22:]


@pytest.mark.slow
def test_a_trained_window_model_in_bf16_stays_within_the_gates(trained):
    """Per window |ΔLL| median <= 0.05 nats; per-image quality ranked the same (Spearman
    >= 0.999). The 99th percentile is reported by ``flowscore bench`` (0.6 nats measured on
    grain-full: the residual energy subtracts two nearly equal sums)."""
    scorer, imgs = trained
    with torch.inference_mode():
        ref = scorer.log_likelihood_grid(imgs)
        scorer.set_precision("bf16")
        try:
            low = scorer.log_likelihood_grid(imgs)
        finally:
            scorer.set_precision("fp32")
    assert torch.equal(scorer.log_likelihood_grid(imgs), ref)  # back to float32 exactly
    diff = (low - ref).abs().flatten()
    assert float(diff.median()) <= 0.05, float(diff.median())

    def quality(g: torch.Tensor) -> np.ndarray:
        q = torch.quantile(g.flatten(1), torch.tensor([0.25, 0.5]), dim=1)
        return ((q[0] + q[1]) / 2).numpy()

    assert spearmanr(quality(ref), quality(low)).correlation >= 0.999
    with pytest.raises(ValueError, match="precision must be"):
        scorer.set_precision("int8")


@pytest.mark.slow  # the trained fixture fits a model: about 8 s
def test_the_precision_check_applies_the_gates_and_restores_the_scorer(trained):
    scorer, imgs = trained
    ok = check_precision(scorer, imgs, "bf16")
    assert ok.images == len(imgs) and ok.windows > 0
    assert ok.median_abs_dll <= GATES.median_abs_dll and ok.quality_spearman >= 0.999
    assert ok.passed == (ok.p99_abs_dll <= GATES.p99_abs_dll) and scorer.precision == "fp32"
    strict = check_precision(scorer, imgs, "bf16", gates=PrecisionGates(median_abs_dll=1e-9))
    assert not strict.passed and strict.why.startswith("median |ΔLL|")
    assert "not used: median" in strict.summary()
    with pytest.raises(ValueError, match="lower precision"):
        check_precision(scorer, imgs, "fp32")


@pytest.mark.slow  # the trained fixture fits a model: about 8 s
def test_the_bundle_keeps_the_validated_precisions(trained, tmp_path):
    scorer, imgs = trained
    scorer.validated_precisions = ("fp32", "bf16")
    try:
        path = save_bundle(scorer, tmp_path / "b")
    finally:
        scorer.validated_precisions = ("fp32",)
    assert load_bundle(path).validated_precisions == ("fp32", "bf16")
    meta = json.loads((path / "flowscore.json").read_text())
    for bad in (["bf16"], ["fp32", "int8"], "fp32", ["fp32", "fp32"]):
        meta["validated_precisions"] = bad
        (path / "flowscore.json").write_text(json.dumps(meta))
        with pytest.raises(BundleError, match="validated_precisions"):
            load_bundle(path)
    del meta["validated_precisions"]  # a bundle from before the check: fp32 only
    (path / "flowscore.json").write_text(json.dumps(meta))
    assert load_bundle(path).validated_precisions == ("fp32",)
