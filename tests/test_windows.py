"""The window sweep is a strided convolution that equals explicit extraction + projection."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from flowcore.fit import project_windows
from flowcore.windows import (
    WindowConfig,
    extract_windows,
    fit_window_featurizer,
    grid_shape,
    resize,
    sample_windows,
    to_tensor,
)


def random_images(n: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (n, h // 4 + 1, w // 4 + 1, 3), dtype=np.uint8)
    img = np.repeat(np.repeat(base, 4, axis=1), 4, axis=2)[:, :h, :w]  # some correlation
    return np.clip(img + rng.integers(-20, 20, img.shape), 0, 255).astype(np.uint8)


@pytest.mark.parametrize(
    "cfg",
    [
        WindowConfig(window=9, stride=3, components=12),
        WindowConfig(window=11, stride=2, scale=0.25, components=None),
        WindowConfig(window=8, stride=8, components=5, whiten=False),
    ],
)
def test_convolution_equals_explicit_windows_times_basis(cfg: WindowConfig) -> None:
    imgs = random_images(2, 61, 83)
    x = to_tensor(imgs, dtype=torch.float64)
    train = extract_windows(x, cfg).float()
    feat = fit_window_featurizer(train, cfg).double()
    got = feat(x)  # (N, k, gh, gw)
    gh, gw = grid_shape(61, 83, cfg)
    assert got.shape == (2, cfg.features, gh, gw)
    # explicit, one window at a time (no unfold): crop, flatten, centre, project, scale
    xr = resize(x, cfg.scale)
    w, s = cfg.window, cfg.stride
    ref = torch.empty_like(got)
    for n in range(2):
        for i in range(gh):
            for j in range(gw):
                win = xr[n, :, i * s : i * s + w, j * s : j * s + w].reshape(-1)
                ref[n, :, i, j] = ((win - feat.mean) @ feat.basis) * feat.inv_scale
    rel = (got - ref).norm() / ref.norm()
    assert rel < 1e-6, float(rel)
    # the row-wise projection used in training is the same map
    rows = extract_windows(x, cfg)
    proj = project_windows(feat, rows).reshape(2, gh, gw, -1).permute(0, 3, 1, 2)
    assert (proj - ref).norm() / ref.norm() < 1e-6


def test_grid_shape_formula() -> None:
    cfg = WindowConfig(window=46, stride=8)
    assert grid_shape(460, 640, cfg) == ((460 - 46) // 8 + 1, (640 - 46) // 8 + 1) == (52, 75)
    q = WindowConfig(window=11, stride=2, scale=0.25, components=None)
    assert grid_shape(460, 640, q) == ((115 - 11) // 2 + 1, (160 - 11) // 2 + 1)
    with pytest.raises(ValueError, match="smaller than the 46px window"):
        grid_shape(40, 640, cfg)


def test_pca_basis_is_orthonormal_centred_and_whitened() -> None:
    cfg = WindowConfig(window=6, stride=2, components=10)
    x = to_tensor(random_images(3, 40, 40, seed=1))
    rows = extract_windows(x, cfg)
    feat = fit_window_featurizer(rows, cfg)
    b = feat.basis.double()
    torch.testing.assert_close(b.T @ b, torch.eye(10, dtype=torch.float64), atol=1e-5, rtol=0)
    torch.testing.assert_close(feat.mean, rows.mean(0), atol=1e-6, rtol=0)
    f = project_windows(feat, rows).double()
    torch.testing.assert_close(f.mean(0), torch.zeros(10, dtype=torch.float64), atol=1e-4, rtol=0)
    torch.testing.assert_close(f.var(0), torch.ones(10, dtype=torch.float64), atol=1e-3, rtol=0)
    # components come out in decreasing order of variance (before whitening)
    v = 1 / feat.inv_scale.double() ** 2
    assert bool((v[:-1] >= v[1:] - 1e-9).all())
    # top component matches an exact eigendecomposition of the covariance
    cov = torch.cov(rows.double().T)
    evals, evecs = torch.linalg.eigh(cov)
    top = evecs[:, -1]
    assert abs(float(top @ b[:, 0])) > 0.999


def test_sample_windows_are_real_windows_of_the_image() -> None:
    cfg = WindowConfig(window=5, stride=1, components=None)
    img = random_images(1, 20, 30, seed=2)
    rows = sample_windows([img[0]], cfg, 50, torch.Generator().manual_seed(0))
    all_rows = extract_windows(to_tensor(img), cfg)
    # every sampled row equals one of the stride-1 windows
    d = torch.cdist(rows.double(), all_rows.double()).amin(dim=1)
    assert float(d.max()) < 1e-6
    noisy = sample_windows([img[0]], cfg, 50, torch.Generator().manual_seed(0), dequantize=True)
    diff = noisy - rows
    assert float(diff.min()) >= 0 and float(diff.max()) <= 1 / 256 and float(diff.abs().max()) > 0


def test_bad_config_is_refused() -> None:
    with pytest.raises(ValueError, match="components must be in"):
        WindowConfig(window=4, components=49)
    with pytest.raises(ValueError, match="scale"):
        WindowConfig(scale=0.0)
    with pytest.raises(ValueError, match=r"\(N, H, W, 3\)"):
        to_tensor(np.zeros((2, 10, 10), np.uint8))


def test_flat_training_windows_keep_whitening_finite():
    """Windows that never vary (flat, JPEG-smoothed areas) get the variance floor of 8-bit
    quantisation, not a scale of 1e6: a different image still has finite, moderate features."""
    from flowcore.windows import QUANTISATION_VARIANCE

    cfg = WindowConfig(window=4, stride=2, components=None)
    flat = torch.full((500, cfg.dims), 0.5, dtype=torch.float32)
    flat[:, :3] += torch.randn(500, 3) * 0.05  # only three directions vary
    feat = fit_window_featurizer(flat, cfg)
    assert float(feat.inv_scale.max()) <= (1 / QUANTISATION_VARIANCE) ** 0.5 * 1.001
    img = torch.full((1, 3, 12, 12), 0.5 + 1 / 255)  # one grey level brighter
    out = feat(img)
    assert torch.isfinite(out).all() and float(out.abs().max()) < 1e3
