"""Model bundle: bit-identical round trip, refusals naming file and tensor, no pickle."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch
from conftest import texture
from safetensors.torch import load_file, save_file

from flowcore.bundle import BundleError, load_bundle, save_bundle
from flowcore.flows import BNAFConfig, CouplingConfig, build_flow
from flowcore.scorer import Scorer


def test_round_trip_is_bit_identical(small_scorer, tmp_path) -> None:
    imgs = np.stack(texture(3, 48, 64, 5))
    before = small_scorer.score(imgs)
    save_bundle(small_scorer, tmp_path / "b", training={"note": "test"})
    loaded = load_bundle(tmp_path / "b")
    after = loaded.score(imgs)
    assert np.array_equal(before.grid, after.grid)
    assert loaded.threshold == small_scorer.threshold
    assert loaded.heatmap_clip == pytest.approx(small_scorer.heatmap_clip)
    assert loaded.training_stats == {"note": "test"}
    meta = json.loads((tmp_path / "b" / "flowscore.json").read_text())
    assert meta["format_version"] == 1 and meta["featurizer"]["window"] == 8
    assert "torch" in meta["versions"]


@pytest.mark.parametrize("cfg", [BNAFConfig(flows=2, hidden_factor=2), CouplingConfig(blocks=2)])
def test_round_trip_other_flows(small_scorer, tmp_path, cfg) -> None:
    torch.manual_seed(1)
    flow = build_flow(small_scorer.flow.features, cfg)
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(0.05 * torch.randn_like(p))
    s = Scorer(small_scorer.featurizer, flow, flow_config=cfg, threshold=1.5)
    imgs = np.stack(texture(2, 48, 64, 6))
    save_bundle(s, tmp_path / "b")
    assert np.array_equal(s.score(imgs).grid, load_bundle(tmp_path / "b").score(imgs).grid)


def test_unknown_format_version_is_refused(small_scorer, tmp_path) -> None:
    b = save_bundle(small_scorer, tmp_path / "b")
    meta = json.loads((b / "flowscore.json").read_text())
    meta["format_version"] = 99
    (b / "flowscore.json").write_text(json.dumps(meta))
    with pytest.raises(BundleError, match=r"flowscore\.json.*version 99 is not supported"):
        load_bundle(b)


def test_missing_tensor_is_named(small_scorer, tmp_path) -> None:
    b = save_bundle(small_scorer, tmp_path / "b")
    t = load_file(str(b / "weights.safetensors"))
    del t["featurizer.basis"]
    save_file(t, str(b / "weights.safetensors"))
    with pytest.raises(BundleError, match=r"weights\.safetensors: tensor 'featurizer\.basis'"):
        load_bundle(b)


def test_shape_mismatch_is_named(small_scorer, tmp_path) -> None:
    b = save_bundle(small_scorer, tmp_path / "b")
    t = load_file(str(b / "weights.safetensors"))
    name = next(k for k in t if k.endswith("weight") and k.startswith("flow."))
    t[name] = torch.zeros(t[name].shape[0] + 1, t[name].shape[1])
    save_file(t, str(b / "weights.safetensors"))
    with pytest.raises(BundleError, match=rf"tensor '{name}' has shape"):
        load_bundle(b)


def test_pickle_file_in_bundle_is_refused(small_scorer, tmp_path) -> None:
    b = save_bundle(small_scorer, tmp_path / "b")
    (b / "model.pkl").write_bytes(pickle.dumps({"x": 1}))
    with pytest.raises(BundleError, match="pickle"):
        load_bundle(b)


def test_loading_never_unpickles(small_scorer, tmp_path, monkeypatch) -> None:
    b = save_bundle(small_scorer, tmp_path / "b")

    def boom(*a, **k):
        raise AssertionError("unpickling during bundle load")

    monkeypatch.setattr(pickle, "load", boom)
    monkeypatch.setattr(pickle, "loads", boom)
    monkeypatch.setattr(pickle, "Unpickler", boom)
    monkeypatch.setattr(torch, "load", boom)
    assert isinstance(load_bundle(b), Scorer)


def test_not_a_bundle(tmp_path) -> None:
    with pytest.raises(BundleError, match="not found"):
        load_bundle(tmp_path / "nope")
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "flowscore.json").write_text("{not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        load_bundle(tmp_path / "x")


def test_test_time_transforms_round_trip_and_are_checked(small_scorer, tmp_path) -> None:
    try:
        small_scorer.transforms = 4
        d = save_bundle(small_scorer, tmp_path / "b")
    finally:
        small_scorer.transforms = 1
    assert load_bundle(d).transforms == 4
    meta = json.loads((d / "flowscore.json").read_text())
    for bad in (0, 9, "4", True):
        meta["test_transforms"] = bad
        (d / "flowscore.json").write_text(json.dumps(meta))
        with pytest.raises(BundleError, match="test_transforms"):
            load_bundle(d)
    del meta["test_transforms"]  # bundles from before them: none
    (d / "flowscore.json").write_text(json.dumps(meta))
    assert load_bundle(d).transforms == 1


def test_loading_a_bundle_does_not_import_the_fitting_code(small_scorer, tmp_path) -> None:
    """The spec and its parsing live in flowcore.spec: a scorer process (a Ray actor)
    loads bundles without importing flowcore.fit and what it pulls in."""
    import subprocess
    import sys

    d = save_bundle(small_scorer, tmp_path / "b")
    code = (
        "import sys; from flowcore.bundle import load_bundle; "
        f"load_bundle({str(d)!r}); "
        "print(sorted(m for m in ('flowcore.fit', 'flowcore.synthetic') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
