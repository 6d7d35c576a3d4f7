"""``flowscore bench``: throughput beside the machine's arithmetic limit.

Figures (DESIGN.md "Bench output"): FLOPs per image counted from the model's shapes; the fp32
matmul rate measured in this process (``gemm_gflops``); the roofline
``gemm_gflops / gflop_per_image``; the in-process scorer's images/s on decoded images; the
naive reference (the research code's way: a Python loop over heatmap rows, each window of a row
cropped one by one, projected, one model call per row), timed on a subset of rows and scaled;
peak RSS. The pipeline figure (files -> table rows through Ray) needs the Ray scoring job and
is reported as null until that exists.

Speed does not depend on the weights' values, so without ``--model`` the bench builds the
preset's scorer with a random orthonormal basis and an untrained flow (same shapes, same
arithmetic as a fitted one).
"""

from __future__ import annotations

import platform
import resource
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from flowcore.fit import PRESETS
from flowcore.flops import flops_per_image
from flowcore.flows import build_flow
from flowcore.scorer import Scorer
from flowcore.windows import WindowFeaturizer, grid_shape, resize, to_tensor

__all__ = ["random_scorer", "gemm_gflops", "naive_row_loop", "run_bench", "format_table"]


def random_scorer(preset: str, seed: int = 0) -> Scorer:
    """The preset's scorer with a random orthonormal basis and a fresh flow."""
    spec = PRESETS[preset]
    cfg = spec.featurizer
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(cfg.dims, cfg.features, generator=gen))
    feat = WindowFeaturizer(cfg)
    feat.set_basis(torch.full((cfg.dims,), 0.5), q, torch.full((cfg.features,), 4.0))
    return Scorer(feat, build_flow(cfg.features, spec.flow), flow_config=spec.flow).eval()


def _best_time(fn: Callable[[], object], repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def gemm_gflops(n: int = 2048, repeats: int = 10, device: str = "cpu") -> float:
    """fp32 rate of an n×n by n×n matmul (best of ``repeats`` after a warm-up), in GFLOP/s.
    The best, not the mean: the roofline must be the machine's rate, not a noisy one (a
    single cold call measured 236 against 330 GFLOP/s here)."""
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)

    def run() -> None:
        a @ b
        if device != "cpu":
            torch.cuda.synchronize()

    for _ in range(3):
        run()
    return 2 * n**3 / _best_time(run, repeats) / 1e9


@torch.inference_mode()
def naive_row_loop(scorer: Scorer, image: np.ndarray, rows: int) -> tuple[float, int]:
    """The research code's sweep on the first ``rows`` heatmap rows of one image: crop each
    window of a row one by one, project, one flow call per row. Returns (seconds, gh)."""
    cfg = scorer.featurizer.cfg
    f = scorer.featurizer
    x = resize(to_tensor(image[None], scorer.device), cfg.scale)[0]
    gh, gw = grid_shape(image.shape[0], image.shape[1], cfg)
    w, s = cfg.window, cfg.stride
    t0 = time.perf_counter()
    for i in range(min(rows, gh)):
        crops = [x[:, i * s : i * s + w, j * s : j * s + w].reshape(-1) for j in range(gw)]
        feats = ((torch.stack(crops) - f.mean) @ f.basis) * f.inv_scale
        scorer.flow.log_prob(feats)
    return time.perf_counter() - t0, gh


def _images(n: int, height: int, width: int, seed: int) -> np.ndarray:
    from pipelines.synth import render_image

    rng = np.random.default_rng(seed)
    distinct = [
        render_image("harvest", rng, camera=1 + k % 2, anomalous=False, height=height, width=width)[
            0
        ]
        for k in range(min(n, 4))
    ]
    return np.stack([distinct[k % len(distinct)] for k in range(n)])


def run_bench(
    *,
    preset: str = "grain-full",
    model: Scorer | None = None,
    images: int = 32,
    batch: int = 8,
    height: int = 460,
    width: int = 640,
    threads: int | None = None,
    device: str = "cpu",
    naive_rows: int = 6,
    log: Callable[[str], None] = lambda s: print(s, file=sys.stderr),
) -> dict[str, Any]:
    """Measure and return the bench object of DESIGN.md."""
    if threads:
        torch.set_num_threads(threads)
    scorer = (model or random_scorer(preset)).to(device).eval()
    cfg = scorer.featurizer.cfg
    fl = flops_per_image(scorer, height, width)
    gflop = fl["total"] / 1e9
    log(
        f"bench: {preset if model is None else 'model'} on {device}, "
        f"{torch.get_num_threads()} threads, {images} images {height}×{width}"
    )
    log("bench: timing fp32 matmul ...")
    gemm = gemm_gflops(device=device)
    imgs = _images(images, height, width, seed=0)
    log("bench: timing the scorer ...")

    def score_all() -> None:
        for k in range(0, images, batch):
            scorer.log_likelihood_grid(imgs[k : k + batch])
        if device != "cpu":
            torch.cuda.synchronize()

    t_scorer = _best_time(score_all, 2)
    log("bench: timing the naive reference on a subset of rows ...")
    t_rows, gh = naive_row_loop(scorer, imgs[0], naive_rows)
    naive_s_per_image = t_rows / min(naive_rows, gh) * gh
    gpu_name = torch.cuda.get_device_name() if device != "cpu" else platform.processor() or "cpu"
    out: dict[str, Any] = {
        "images": images,
        "batch": batch,
        "image_height": height,
        "image_width": width,
        "window": cfg.window,
        "stride": cfg.stride,
        "scale": cfg.scale,
        "components": cfg.features,
        "grid": list(grid_shape(height, width, cfg)),
        "windows_per_image": fl["windows"],
        "flow": type(scorer.flow_config).__name__.removesuffix("Config").lower(),
        "threads": torch.get_num_threads(),
        "device": device if device == "cpu" else f"{device} ({gpu_name})",
        "gflop_per_image": round(gflop, 4),
        "gflop_projection": round(fl["projection"] / 1e9, 4),
        "gflop_flow": round(fl["flow"] / 1e9, 4),
        "gemm_gflops": round(gemm, 1),
        "roofline_images_per_s": round(gemm / gflop, 2),
        "scorer_images_per_s": round(images / t_scorer, 2),
        "scorer_fraction_of_roofline": round(images / t_scorer / (gemm / gflop), 3),
        "pipeline_images_per_s": None,
        "naive_images_per_s": round(1.0 / naive_s_per_image, 3),
        "naive_rows_timed": min(naive_rows, gh),
        "naive_fraction_of_roofline": round(1.0 / naive_s_per_image / (gemm / gflop), 3),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "torch": str(torch.__version__),
        "machine": platform.machine(),
    }
    return out


def format_table(r: dict[str, Any]) -> str:
    rows = [
        ("model", f"{r['flow']} on {r['components']}-dim windows {r['window']}px / {r['stride']}"),
        ("image", f"{r['image_height']}×{r['image_width']}, grid {r['grid'][0]}×{r['grid'][1]}"),
        ("device, threads", f"{r['device']}, {r['threads']}"),
        (
            "GFLOP per image",
            f"{r['gflop_per_image']} (projection {r['gflop_projection']}, flow {r['gflop_flow']})",
        ),
        ("fp32 matmul GFLOP/s", f"{r['gemm_gflops']}"),
        ("roofline images/s", f"{r['roofline_images_per_s']}"),
        (
            "scorer images/s",
            f"{r['scorer_images_per_s']} "
            f"({100 * r['scorer_fraction_of_roofline']:.0f} % of roofline)",
        ),
        (
            "pipeline images/s",
            "not measured (needs the Ray scoring job)"
            if r["pipeline_images_per_s"] is None
            else f"{r['pipeline_images_per_s']}",
        ),
        (
            "naive images/s",
            f"{r['naive_images_per_s']} "
            f"({100 * r['naive_fraction_of_roofline']:.0f} % of roofline, "
            f"{r['naive_rows_timed']} rows timed and scaled)",
        ),
        ("peak RSS MB", f"{r['peak_rss_mb']}"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
