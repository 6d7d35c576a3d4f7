"""The mathematics of the flows, checked in float64 on flows moved away from the identity."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.mixture import GaussianMixture
from torch import nn

from flowcore.flows import (
    BNAFConfig,
    Chain,
    CouplingConfig,
    MAFConfig,
    Permutation,
    build_flow,
    flow_config_from_dict,
    flow_config_to_dict,
    soft_clamp,
)
from flowcore.flows.bnaf import BNAFTransform
from flowcore.flows.coupling import AffineCoupling, mlp_subnet
from flowcore.flows.maf import MADE, BatchNormBijector
from flowcore.training import FitConfig, fit_flow

SMALL = {
    "maf": MAFConfig(blocks=3, hidden=16),
    "bnaf": BNAFConfig(flows=2, hidden_factor=4, hidden_layers=2),
    "coupling": CouplingConfig(blocks=3, hidden=(16, 16)),
}


def perturbed(module: nn.Module, scale: float = 0.3, seed: int = 0) -> nn.Module:
    """Move every parameter away from its initial value (zero-initialised couplings start as
    the identity) and give batch norms non-trivial running statistics."""
    gen = torch.Generator().manual_seed(seed)
    module = module.double()
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen, dtype=p.dtype))
        for m in module.modules():
            if isinstance(m, BatchNormBijector):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen))
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)
    return module.eval()


def autograd_logabsdet(f: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = []
    for row in x:
        jac = torch.autograd.functional.jacobian(lambda v: f(v[None])[0][0], row)
        out.append(torch.linalg.slogdet(jac).logabsdet)
    return torch.stack(out)


def bijectors(features: int) -> dict[str, nn.Module]:
    torch.manual_seed(3)  # module initialisation draws from the global generator
    gen = torch.Generator().manual_seed(3)
    return {
        "made-natural": MADE(features, 12, 1, torch.arange(features)),
        "made-random-2layers": MADE(features, 12, 2, torch.randperm(features, generator=gen)),
        "batchnorm": BatchNormBijector(features),
        "bnaf-1": BNAFTransform(features, 3, 1),
        "bnaf-2": BNAFTransform(features, 3, 2),
        "coupling": AffineCoupling(features, mlp_subnet((10,)), clamp=1.5),
        "permutation": Permutation.random(features, gen),
        **{f"flow-{k}": build_flow(features, c).transform for k, c in SMALL.items()},
    }


@pytest.mark.parametrize("name", list(bijectors(5)))
def test_logdet_matches_autograd_jacobian(name: str) -> None:
    f = perturbed(bijectors(5)[name])
    x = torch.randn(4, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    z, ladj = f(x)
    assert z.shape == x.shape and ladj.shape == (4,)
    torch.testing.assert_close(ladj, autograd_logabsdet(f, x), rtol=1e-9, atol=1e-9)


def test_fresh_coupling_is_identity_and_perturbed_is_not() -> None:
    # guards the test above: the perturbation really moves the flow away from the identity
    f = AffineCoupling(4, mlp_subnet((8,)))
    x = torch.randn(3, 4)
    assert torch.equal(f(x)[0], x)
    g = perturbed(AffineCoupling(4, mlp_subnet((8,))))
    z, ladj = g(x.double())
    assert (z - x.double()).abs().max() > 1e-2 and ladj.abs().max() > 1e-2


@pytest.mark.parametrize("name", ["maf", "coupling"])
def test_round_trip(name: str) -> None:
    flow = perturbed(build_flow(6, SMALL[name]))
    x = torch.randn(16, 6, dtype=torch.float64)
    z, _ = flow.transform(x)
    assert (z - x).abs().max() > 1e-2
    torch.testing.assert_close(flow.transform.inverse(z), x, rtol=1e-9, atol=1e-9)
    s = flow.sample(8)
    torch.testing.assert_close(flow.transform.inverse(flow.transform(s)[0]), s)


def test_bnaf_has_no_inverse() -> None:
    flow = build_flow(3, SMALL["bnaf"])
    with pytest.raises(NotImplementedError, match="no closed-form inverse"):
        flow.sample(2)


@pytest.mark.parametrize("name", list(SMALL))
def test_density_integrates_to_one_in_2d(name: str) -> None:
    torch.manual_seed(0)
    flow = perturbed(build_flow(2, SMALL[name]), scale=0.2)
    # ±20 rather than ±10: a perturbed BNAF has heavier tails (its gated residual shrinks x)
    step, half = 0.025, 20.0
    g = torch.arange(-half, half + step / 2, step, dtype=torch.float64)
    xx, yy = torch.meshgrid(g, g, indexing="ij")
    pts = torch.stack([xx.reshape(-1), yy.reshape(-1)], dim=1)
    with torch.no_grad():
        logp = torch.cat([flow.log_prob(c) for c in pts.split(100_000)])
    mass = float(torch.exp(logp).sum()) * step * step
    assert abs(mass - 1.0) < 1e-2, mass
    # and the density is not a standard normal in disguise
    base = -0.5 * (pts.square().sum(1) + 2 * math.log(2 * math.pi))
    assert (logp - base).abs().max() > 0.1


def test_soft_clamp_is_bounded_monotone_with_slope_2_over_pi() -> None:
    s = torch.linspace(-100, 100, 1001, dtype=torch.float64)
    c = soft_clamp(s, 3.0)
    assert c.abs().max() < 3.0
    assert bool((c.diff() > 0).all())
    small = torch.tensor([1e-4, -2e-3], dtype=torch.float64)
    torch.testing.assert_close(soft_clamp(small, 3.0), small * 2 / math.pi, rtol=1e-6, atol=0)


def test_permutations_and_orders_are_stored_with_the_model() -> None:
    a = build_flow(8, MAFConfig(blocks=3, seed=1)).state_dict()
    orders = [a[k] for k in sorted(a) if k.endswith(".order")]
    assert len(orders) == 3 and torch.equal(orders[0], torch.arange(8))
    assert not torch.equal(orders[1], orders[2])  # the later MADEs use random orders
    b = build_flow(8, CouplingConfig(blocks=2)).state_dict()
    assert sum(k.endswith(".perm") for k in b) == 1


def test_config_round_trip_and_errors() -> None:
    for cfg in SMALL.values():
        assert flow_config_from_dict(flow_config_to_dict(cfg)) == cfg
    with pytest.raises(ValueError, match="unknown key 'widht'"):
        flow_config_from_dict({"type": "maf", "widht": 3})
    with pytest.raises(ValueError, match="type must be one of"):
        flow_config_from_dict({"type": "glow"})
    with pytest.raises(ValueError, match=r"blocks must be an integer in \[1, 1024\]"):
        MAFConfig(blocks=0)


# ---- each flow, trained briefly, beats a full-covariance Gaussian on held-out data -------


def two_moons(n: int, rng: np.random.Generator) -> np.ndarray:
    t = rng.uniform(0, math.pi, n)
    upper = rng.random(n) < 0.5
    x = np.where(upper, np.cos(t), 1 - np.cos(t))
    y = np.where(upper, np.sin(t), 0.5 - np.sin(t))
    return np.stack([x, y], 1) + 0.08 * rng.standard_normal((n, 2))


def curved_10d(n: int, rng: np.random.Generator) -> np.ndarray:
    a = rng.standard_normal((n, 10))
    out = a.copy()
    out[:, 1:] += 0.8 * np.square(a[:, :-1]) - 0.8  # each feature bends on the previous
    out[:, 5] = np.abs(a[:, 5]) * 1.5 + 0.1 * a[:, 4]
    return out


TRAIN_CFG = {  # (flow, learning rate): BNAF wants the larger rate its paper used
    "maf": (MAFConfig(blocks=4, hidden=64), 3e-3),
    "bnaf": (BNAFConfig(flows=2, hidden_factor=8), 1e-2),
    "coupling": (CouplingConfig(blocks=4, hidden=(64, 64)), 3e-3),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(TRAIN_CFG))
@pytest.mark.parametrize("data", ["moons-2d", "curved-10d"])
def test_trained_flow_beats_full_covariance_gaussian(name: str, data: str) -> None:
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    make = two_moons if data == "moons-2d" else curved_10d
    x_train, x_val, x_test = (make(n, rng) for n in (3000, 1000, 2000))
    gauss = GaussianMixture(1, covariance_type="full").fit(x_train)
    gauss_nll = -float(gauss.score(x_test))
    cfg, lr = TRAIN_CFG[name]
    flow = build_flow(x_train.shape[1], cfg)
    as_t = lambda a: torch.as_tensor(a, dtype=torch.float32)  # noqa: E731
    result = fit_flow(
        flow,
        as_t(x_train),
        as_t(x_val),
        FitConfig(batch_size=256, lr=lr, max_epochs=30, patience=4),
    )
    with torch.no_grad():
        flow_nll = -float(flow.log_prob(as_t(x_test)).mean())
    assert result.best_epoch >= 1
    assert flow_nll < gauss_nll - 0.05, (flow_nll, gauss_nll)


def test_fit_restores_best_weights_and_stops_early() -> None:
    torch.manual_seed(0)
    x = torch.randn(400, 3) * torch.tensor([1.0, 2.0, 0.5])
    flow = build_flow(3, MAFConfig(blocks=2, hidden=8))
    seen = []
    res = fit_flow(
        flow, x[:300], x[300:], FitConfig(max_epochs=200, patience=2, lr=1e-2), seen.append
    )
    assert res.stopped_early and len(res.history) < 200
    assert seen == res.history
    with torch.no_grad():
        final = -float(flow.eval().log_prob(x[300:]).mean())
    assert final == pytest.approx(res.best_val_nll, rel=1e-5)
    assert res.best_val_nll == min(h.val_nll for h in res.history)
    assert res.history[res.best_epoch - 1].is_best


def test_chain_sums_logdets() -> None:
    a, b = perturbed(MADE(3, 6, 1, torch.arange(3))), perturbed(BatchNormBijector(3))
    x = torch.randn(5, 3, dtype=torch.float64)
    z1, l1 = a(x)
    z2, l2 = b(z1)
    z, ladj = Chain([a, b])(x)
    torch.testing.assert_close(z, z2)
    torch.testing.assert_close(ladj, l1 + l2)


@pytest.mark.parametrize(
    "cfg", [MAFConfig(blocks=2, hidden=8), BNAFConfig(flows=2), CouplingConfig(blocks=2)]
)
def test_a_built_flow_carries_its_config_and_a_scorer_takes_it(cfg) -> None:
    from flowcore.scorer import Scorer
    from flowcore.windows import WindowConfig, WindowFeaturizer

    flow = build_flow(4, cfg)
    assert flow.config == cfg
    feat = WindowFeaturizer(WindowConfig(window=2, stride=1, components=4, whiten=False))
    assert Scorer(feat, flow).flow_config == cfg
