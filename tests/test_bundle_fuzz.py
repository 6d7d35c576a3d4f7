"""A malformed ``flowscore.json`` is one BundleError (exit 2 at the CLI), never a traceback or a
memory blow-up; every mutation either loads into a working scorer or is refused."""

from __future__ import annotations

import copy
import json
import random
import resource
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from flowcore.bundle import BundleError, load_bundle, save_bundle
from flowcore.flows import BNAFConfig, CouplingConfig, MAFConfig, build_flow
from flowcore.flows.config import flow_elements
from flowcore.scorer import Scorer
from flowcore.windows import WindowConfig, fit_window_featurizer

BAD_VALUES: list[Any] = [
    None,
    True,
    -1,
    0,
    10**9,
    10**18,
    1e308,
    float("nan"),
    float("inf"),
    "abc",
    [],
    [1],
    {"a": 1},
    [[[[1]]]],
]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cfg = WindowConfig(window=4, stride=4, components=3, residual_feature=True)
    feat = fit_window_featurizer(torch.rand(200, cfg.dims), cfg)
    torch.manual_seed(0)
    flow_cfg = MAFConfig(blocks=1, hidden=8)
    sc = Scorer(feat, build_flow(cfg.features, flow_cfg), flow_config=flow_cfg, threshold=1.5)
    sc.heatmap_clip = (-3.0, 1.0)
    return save_bundle(sc, tmp_path_factory.mktemp("b") / "bundle")


def _leaves(d: Any, path: tuple = ()) -> list[tuple]:
    if isinstance(d, dict):
        return [p for k, v in d.items() for p in _leaves(v, (*path, k))] or [path]
    return [path]


def _set(d: Any, path: tuple, value: Any) -> None:
    for k in path[:-1]:
        d = d[k]
    d[path[-1]] = value


def _works_or_refused(root: Path) -> str:
    try:
        sc = load_bundle(root)
    except BundleError as e:
        assert "\n" not in str(e) and str(root) in str(e)
        return "refused"
    sb = sc.score(np.zeros((1, 8, 8, 3), np.uint8))
    assert sb.grid.shape == (1, 2, 2)
    assert not np.isnan(sc.threshold)
    return "loaded"


@pytest.mark.parametrize(
    "key, value",
    [
        ("threshold", float("nan")),
        ("threshold", float("inf")),
        ("threshold", "abc"),
        ("heatmap_clip", [1]),
        ("heatmap_clip", [float("nan"), 1.0]),
        ("heatmap_clip", [2.0, 1.0]),
        ("heatmap_clip", "x"),
    ],
)
def test_bad_thresholds_and_clips_are_refused(bundle, tmp_path, key, value):
    root = tmp_path / "b"
    meta = json.loads((bundle / "flowscore.json").read_text())
    meta[key] = value
    root.mkdir()
    (root / "weights.safetensors").write_bytes((bundle / "weights.safetensors").read_bytes())
    (root / "flowscore.json").write_text(json.dumps(meta))
    with pytest.raises(BundleError, match=key):
        load_bundle(root)


def test_huge_sizes_and_deep_nesting_are_refused_without_allocating(bundle, tmp_path):
    meta = json.loads((bundle / "flowscore.json").read_text())
    cases = {
        "hidden": lambda m: m["flow"].__setitem__("hidden", 10**9),
        "window": lambda m: m["featurizer"].__setitem__("window", 10**6),
        "components": lambda m: m["featurizer"].update(window=500, components=None),
    }
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for name, mutate in cases.items():
        root = tmp_path / name
        root.mkdir()
        m = copy.deepcopy(meta)
        mutate(m)
        (root / "weights.safetensors").write_bytes((bundle / "weights.safetensors").read_bytes())
        (root / "flowscore.json").write_text(json.dumps(m))
        with pytest.raises(BundleError):
            load_bundle(root)
    deep = tmp_path / "deep"
    deep.mkdir()
    (deep / "flowscore.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(BundleError, match="not valid JSON"):
        load_bundle(deep)
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mb < 500, grown_mb


def test_random_mutations_load_or_are_refused(bundle, tmp_path):
    """A fixed-seed fuzz (printed for replay): every leaf of the JSON set to hostile values."""
    seed = 20261130
    print(f"fuzz seed {seed}")
    rng = random.Random(seed)
    meta = json.loads((bundle / "flowscore.json").read_text())
    leaves = [p for p in _leaves(meta) if p and p[0] not in ("training", "versions")]
    assert _works_or_refused(bundle) == "loaded"  # the unmutated bundle is fine
    outcomes = {"loaded": 0, "refused": 0}
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for k in range(200):
        m = copy.deepcopy(meta)
        for path in rng.sample(leaves, rng.randint(1, 3)):
            # hostile values, and plausible ones a model can take (some mutations must load)
            _set(m, path, rng.choice([*BAD_VALUES, 1, 2, 0.5, 7.25, False]))
        root = tmp_path / f"m{k}"
        root.mkdir()
        (root / "weights.safetensors").write_bytes((bundle / "weights.safetensors").read_bytes())
        (root / "flowscore.json").write_text(json.dumps(m))
        outcomes[_works_or_refused(root)] += 1
    print(outcomes)
    assert outcomes["refused"] > 50 and outcomes["loaded"] > 5
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mb < 500, grown_mb


@pytest.mark.parametrize(
    "cfg",
    [
        MAFConfig(blocks=3, hidden=17, layers=2),
        MAFConfig(blocks=1, hidden=5, layers=1, batch_norm=False),
        BNAFConfig(flows=2, hidden_factor=3, hidden_layers=2),
        CouplingConfig(blocks=3, hidden=(13, 7)),
    ],
)
@pytest.mark.parametrize("features", [1, 4, 9])
def test_the_size_estimate_bounds_the_built_flow(cfg, features):
    if isinstance(cfg, CouplingConfig) and features < 2:
        pytest.skip("coupling needs D >= 2")
    built = build_flow(features, cfg)
    held = sum(t.numel() for t in built.state_dict().values())
    assert held <= flow_elements(features, cfg) <= 8 * held + 64


def test_a_json_asking_for_a_huge_flow_is_refused_before_it_is_built(bundle, tmp_path):
    """Sizes each within their bounds, together ~10^13 elements: refused from the JSON and
    the weights file's size, in well under a second and without memory."""
    bad = tmp_path / "huge"
    bad.mkdir()
    (bad / "weights.safetensors").write_bytes((bundle / "weights.safetensors").read_bytes())
    meta = json.loads((bundle / "flowscore.json").read_text())
    meta["flow"].update(hidden=65536, blocks=1024, layers=1024)
    (bad / "flowscore.json").write_text(json.dumps(meta))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(BundleError, match="needs about .* MB of tensors"):
        load_bundle(bad)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200_000  # KiB
    with pytest.raises(ValueError, match="more than the"):
        build_flow(101, MAFConfig(hidden=65536, blocks=1024, layers=1024))
