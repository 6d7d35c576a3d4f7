"""``flowscore bench``: throughput beside the machine's arithmetic limit.

Figures (DESIGN.md "Bench output"): FLOPs per image counted from the model's shapes; the fp32
matmul rate measured in this process (``gemm_gflops``); the roofline
``gemm_gflops / gflop_per_image``; the in-process scorer's images/s on decoded images; the
naive reference (the research code's way: a Python loop over heatmap rows, each window of a row
cropped one by one, projected, one model call per row), timed on a subset of rows and scaled;
peak RSS; and the pipeline: the same scorer saved as a bundle and run by the real scoring job
(``pipelines.usecases.score.run_score``: Ray Data decode tasks, scorer actors, Iceberg commits) on a
generated archive of JPEG files, in a throw-away catalog and MLflow store. Its figure is
images over the time from the first chunk to the last commit (Ray already up); the whole
command's rate (model check, listing, tables, MLflow run) is reported beside it.

``--memory`` runs ``flowscore score`` as a child process on an archive and on one 4× larger
and reports the peak RSS of each (the job's own process, and the sum over every process of
its session, Ray's included) and the growth.

Speed does not depend on the weights' values, so without ``--model`` the bench builds the
preset's scorer with a random orthonormal basis and an untrained flow (same shapes, same
arithmetic as a fitted one).
"""

from __future__ import annotations

import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from flowcore.cnn import CNNConfig, CNNFeaturizer
from flowcore.distill import DistilledConfig, DistilledFeaturizer
from flowcore.encoder import EncoderConfig, EncoderFeaturizer
from flowcore.fit import PRESETS
from flowcore.flops import flops_per_image
from flowcore.flows import build_flow
from flowcore.multiscale import MultiScaleConfig, MultiScaleFeaturizer
from flowcore.precision import check_precision, has_bf16_units
from flowcore.scorer import Scorer
from flowcore.windows import WindowConfig, WindowFeaturizer, grid_shape, resize, to_tensor
from pipelines.log import Log
from pipelines.settings import Settings, current, scratch_env

__all__ = [
    "random_scorer",
    "gemm_gflops",
    "naive_row_loop",
    "pipeline_bench",
    "memory_bench",
    "run_bench",
]


def _random_windows(cfg: WindowConfig, gen: torch.Generator) -> WindowFeaturizer:
    q, _ = torch.linalg.qr(torch.randn(cfg.dims, cfg.kept, generator=gen))
    feat = WindowFeaturizer(cfg)
    feat.set_basis(
        torch.full((cfg.dims,), 0.5),
        q,
        torch.full((cfg.kept,), 4.0),
        residual_var=1e-3 if cfg.has_residual else None,
        complexity_scale=0.02 if cfg.complexity else None,
        residual_feature_stats=(0.0, 1.0) if cfg.has_residual_feature else None,
    )
    return feat


DISTILLED_BENCH = {"distilled": "grain-full", "distilled-quarter": "grain-quarter"}
"""Bench-only names: a student (flowcore.distill, default size) on the teacher preset's
window geometry, for its images/s beside the teacher's."""


def random_scorer(preset: str, seed: int = 0) -> Scorer:
    """The preset's scorer with a random orthonormal basis (a CNN preset: its backbone's
    random initialisation) and a fresh flow: speed does not depend on the values. A name of
    :data:`DISTILLED_BENCH`: a randomly initialised student of that preset's geometry."""
    if preset in DISTILLED_BENCH:
        teacher = PRESETS[DISTILLED_BENCH[preset]]
        assert isinstance(teacher.featurizer, WindowConfig)
        w = teacher.featurizer
        student = DistilledFeaturizer(
            DistilledConfig(window=w.window, stride=w.stride, scale=w.scale), seed=seed
        )
        return Scorer(student.eval(), None, image_score=teacher.image_score).eval()
    spec = PRESETS[preset]
    cfg = spec.featurizer
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    feat: WindowFeaturizer | MultiScaleFeaturizer | CNNFeaturizer | EncoderFeaturizer
    if isinstance(cfg, CNNConfig):
        feat = CNNFeaturizer(cfg, seed=seed).eval()
    elif isinstance(cfg, EncoderConfig):
        feat = EncoderFeaturizer(cfg, seed=seed).eval()
    elif isinstance(cfg, MultiScaleConfig):
        feat = MultiScaleFeaturizer(cfg)
        feat.fine = _random_windows(cfg.fine_config, gen)
        feat.coarse = _random_windows(cfg.coarse_config, gen)
    elif isinstance(cfg, WindowConfig):
        feat = _random_windows(cfg, gen)
    else:
        raise ValueError(f"bench cannot build preset {preset!r}")
    return Scorer(
        feat,
        build_flow(cfg.features, spec.flow),
        image_score=spec.image_score,
    ).eval()


def _best_time(fn: Callable[[], object], repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def gemm_gflops(
    n: int = 2048, repeats: int = 10, device: str = "cpu", dtype: torch.dtype = torch.float32
) -> float:
    """Rate of an n×n by n×n matmul in ``dtype`` (best of ``repeats`` after a warm-up), in
    GFLOP/s. The best, not the mean: the roofline must be the machine's rate, not a noisy one
    (a single cold call measured 236 against 330 GFLOP/s here)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)

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
    f, flow = scorer.featurizer, scorer.flow
    if not isinstance(f, WindowFeaturizer) or flow is None:
        raise ValueError("the naive reference is the single-scale window sweep")
    cfg = f.cfg
    x = resize(to_tensor(image[None], scorer.device), cfg.scale)[0]
    gh, gw = grid_shape(image.shape[0], image.shape[1], cfg)
    w, s = cfg.window, cfg.stride
    t0 = time.perf_counter()
    for i in range(min(rows, gh)):
        crops = [x[:, i * s : i * s + w, j * s : j * s + w].reshape(-1) for j in range(gw)]
        feats = f.project(torch.stack(crops))  # (x - mean) @ basis * scale (+ residual)
        flow.log_prob(feats)
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


def _synth_archive(out: Path, images: int, height: int, width: int, log: Log) -> None:
    """``images`` JPEG files under year=/camera= folders: up to 16 generated images, copied
    to the rest (every file is still read and decoded; only generating them is saved)."""
    import shutil

    from pipelines.synth import write_archive

    t0 = time.perf_counter()
    distinct = min(images, 16)
    write_archive(out, kind="harvest", images=distinct, seed=0, height=height, width=width)
    files = sorted(out.glob("year=*/camera=*/*.*"))
    for k in range(distinct, images):
        src = files[k % len(files)]
        shutil.copyfile(src, src.with_name(f"{src.stem}-copy{k:06d}{src.suffix}"))
    log(
        f"bench: wrote {images} image files {height}×{width} ({distinct} distinct) "
        f"in {time.perf_counter() - t0:.0f} s"
    )


def pipeline_bench(
    scorer: Scorer,
    *,
    images: int,
    height: int,
    width: int,
    actors: int = 1,
    threads: int | None = None,
    use_gpu: bool = False,
    commit_every: int = 5000,
    batch: int = 16,
    ray_address: str | None = None,
    precision: str = "fp32",
    heatmap: str = "likelihood",
    settings: Settings | None = None,
    log: Log = lambda s: None,
) -> dict[str, Any]:
    """Files -> committed table rows through the real scoring job; see the module docstring.
    ``settings`` (default: the environment's) give S3 and the limits; the stores are a
    scratch copy's."""
    from flowcore.bundle import save_bundle
    from pipelines.raycluster import ensure_ray
    from pipelines.usecases.score import ScoreRequest, run_score

    with tempfile.TemporaryDirectory(prefix="flowscore-bench-") as tmp:
        root = Path(tmp)
        _synth_archive(root / "archive", images, height, width, log)
        bundle = save_bundle(scorer, root / "bundle")
        # the catalog, warehouse and MLflow store of the run: a throw-away one under root
        scratch = (settings or current()).scratch(root / "home")
        ensure_ray(ray_address)
        log(f"bench: scoring them through Ray ({actors} actor(s)) into a scratch catalog ...")
        out = run_score(
            ScoreRequest(
                archive=str(root / "archive"),
                model=str(bundle),
                actors=actors,
                use_gpu=use_gpu,
                commit_every=commit_every,
                threads=threads,
                batch_size=batch,
                job="bench",
                precision=precision,
                heatmap=heatmap,
                settings=scratch,
            ),
            log=lambda s: log(f"  {s}"),
        )
    if out.failed:
        raise RuntimeError(f"the bench archive had {out.failed} failed images")
    return {
        "pipeline_images": out.scored,
        "pipeline_actors": actors,
        "pipeline_commit_every": commit_every,
        "pipeline_seconds": round(out.scoring_seconds, 2),
        "pipeline_images_per_s": round(out.scored / out.scoring_seconds, 2),
        "pipeline_command_images_per_s": round(out.scored / out.seconds, 2),
    }


def _session_rss_kb(sid: int) -> tuple[int, int, int]:
    """(peak RSS so far of the session leader, its anonymous RSS now, summed PSS now of every
    process in session ``sid``) in kB, from /proc (Linux). PSS, not RSS, for the sum: Ray's
    processes share the object store's memory, and RSS would count each shared page once per
    process. Anonymous memory is the part that data can grow (the peak RSS also counts
    shared-library pages, which vary by up to ~130 MB from run to run at exit)."""
    leader = anon = total = 0
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            if int(fields[3]) != sid:  # field 6 of stat: the session id
                continue
            with open(f"/proc/{d}/smaps_rollup") as f:
                pss = next(int(line.split()[1]) for line in f if line.startswith("Pss:"))
            if int(d) == sid:
                with open(f"/proc/{d}/status") as f:
                    status = dict(line.split(":", 1) for line in f if ":" in line)
                leader = int(status["VmHWM"].split()[0])
                anon = int(status["RssAnon"].split()[0])
        except (OSError, IndexError, ValueError, StopIteration, KeyError):
            continue  # the process ended meanwhile
        total += pss
    return leader, anon, total


def _score_rss(archive: Path, bundle: Path, home: Path, actors: int) -> dict[str, Any]:
    """Run ``flowscore score`` as its own session and sample its processes' RSS."""
    env = scratch_env(home, RAY_DATA_DISABLE_PROGRESS_BARS="1")
    cmd = [sys.executable, "-m", "jobs.cli", "score", "--archive", str(archive)]
    cmd += ["--model", str(bundle), "--actors", str(actors), "--quiet"]
    t0 = time.perf_counter()
    home.mkdir(parents=True, exist_ok=True)
    with open(home / "score.log", "w+b") as log:
        proc = subprocess.Popen(
            cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        peak_leader = peak_anon = peak_total = 0
        while proc.poll() is None:
            leader, anon, total = _session_rss_kb(proc.pid)
            peak_leader, peak_total = max(peak_leader, leader), max(peak_total, total)
            peak_anon = max(peak_anon, anon)
            time.sleep(0.2)
        if proc.returncode != 0:
            log.seek(0)
            text = log.read().decode(errors="replace")
            raise RuntimeError(f"flowscore score exited {proc.returncode}:\n{text[-2000:]}")
    return {
        "seconds": round(time.perf_counter() - t0, 1),
        "job_peak_rss_mb": round(peak_leader / 1024, 1),
        "job_peak_anon_mb": round(peak_anon / 1024, 1),
        "session_peak_pss_mb": round(peak_total / 1024, 1),
    }


def memory_bench(
    scorer: Scorer,
    *,
    images: int,
    height: int,
    width: int,
    actors: int = 1,
    log: Log = lambda s: None,
) -> dict[str, Any]:
    """Peak RSS of ``flowscore score`` on ``images`` and on ``4 × images`` (Linux: /proc)."""
    from flowcore.bundle import save_bundle

    if not Path("/proc/self/stat").exists():
        raise RuntimeError("--memory reads /proc: Linux only")
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="flowscore-bench-") as tmp:
        root = Path(tmp)
        bundle = save_bundle(scorer, root / "bundle")
        for label, n in (("small", images), ("large", 4 * images)):
            _synth_archive(root / label, n, height, width, log)
            log(f"bench: flowscore score on {n} images, sampling its memory ...")
            r = _score_rss(root / label, bundle, root / f"home-{label}", actors)
            log(
                f"bench: {n} images in {r['seconds']} s, job peak RSS {r['job_peak_rss_mb']} MB "
                f"(anonymous {r['job_peak_anon_mb']} MB), "
                f"all its processes (PSS) {r['session_peak_pss_mb']} MB"
            )
            out[label] = {"images": n, **r}
    s, g = out["small"], out["large"]
    out["job_rss_growth"] = round(g["job_peak_rss_mb"] / s["job_peak_rss_mb"] - 1, 3)
    out["job_anon_growth"] = round(g["job_peak_anon_mb"] / s["job_peak_anon_mb"] - 1, 3)
    out["session_pss_growth"] = round(g["session_peak_pss_mb"] / s["session_peak_pss_mb"] - 1, 3)
    return out


def _gradient_figures(
    scorer: Scorer, imgs: np.ndarray, batch: int, device: str, t_scorer: float, log: Log
) -> dict[str, Any]:
    """The gradient map alone, and the scorer with it (a ``score --heatmap gradient`` actor)."""
    from flowcore.gradient import gradient_map

    log("bench: timing the gradient map ...")

    def gradient_all() -> None:
        for k in range(0, len(imgs), batch):
            gradient_map(scorer, imgs[k : k + batch])
        if device != "cpu":
            torch.cuda.synchronize()

    t_grad = _best_time(gradient_all, 2)
    return {
        "gradient_map_images_per_s": round(len(imgs) / t_grad, 2),
        "scorer_gradient_images_per_s": round(len(imgs) / (t_scorer + t_grad), 2),
    }


def _naive_figures(
    scorer: Scorer, image: np.ndarray, rows: int, roofline: float, log: Log
) -> dict[str, Any]:
    """The research code's row loop, timed on ``rows`` heatmap rows and scaled to the image
    (single-scale window models only: the research code had one scale)."""
    if not isinstance(scorer.featurizer, WindowFeaturizer):
        return {
            "naive_images_per_s": None,
            "naive_rows_timed": 0,
            "naive_fraction_of_roofline": None,
        }
    log("bench: timing the naive reference on a subset of rows ...")
    t_rows, gh = naive_row_loop(scorer, image, rows)
    naive = 1.0 / (t_rows / min(rows, gh) * gh)
    return {
        "naive_images_per_s": round(naive, 3),
        "naive_rows_timed": min(rows, gh),
        "naive_fraction_of_roofline": round(naive / roofline, 3),
    }


def _header_fields(
    scorer: Scorer, fl: dict[str, Any], imgs: np.ndarray, batch: int, device: str, gflop: float
) -> dict[str, Any]:
    """What was measured: images, the model's shapes, threads, device, FLOPs."""
    gpu_name = torch.cuda.get_device_name() if device != "cpu" else platform.processor() or "cpu"
    return {
        "images": len(imgs),
        "batch": batch,
        "image_height": imgs.shape[1],
        "image_width": imgs.shape[2],
        **_shape_fields(scorer, fl, imgs),
        "threads": torch.get_num_threads(),
        "device": device if device == "cpu" else f"{device} ({gpu_name})",
        "test_transforms": scorer.transforms,
        "gflop_per_image": round(gflop, 4),
        "gflop_projection": round(fl["projection"] / 1e9, 4),
        "gflop_flow": round(fl["flow"] / 1e9, 4),
    }


def _shape_fields(scorer: Scorer, fl: dict[str, Any], imgs: np.ndarray) -> dict[str, Any]:
    """What the model looks like: window, stride, scale, features, grid, flow."""
    cfg = scorer.featurizer.cfg
    return {
        "window": getattr(cfg, "window", None),
        "stride": cfg.stride,
        "scale": cfg.scale,
        "components": cfg.features,
        "grid": list(scorer.log_likelihood_grid(imgs[:1]).shape[1:]),
        "windows_per_image": fl["windows"],
        "flow": (
            "none (distilled)"
            if scorer.flow is None
            else type(scorer.flow_config).__name__.removesuffix("Config").lower()
        ),
    }


def _pipeline_figures(
    out: dict[str, Any],
    scorer: Scorer,
    device: str,
    lowp: bool,
    log: Log,
    kw: dict[str, Any],
) -> None:
    """The end-to-end figures into ``out`` (:func:`pipeline_bench` with ``kw``): fp32, and
    bf16 where the machine has the units."""
    use_gpu = device != "cpu"
    p = pipeline_bench(scorer, use_gpu=use_gpu, precision="fp32", log=log, **kw)
    out.update(p)
    out["pipeline_fraction_of_roofline"] = round(
        p["pipeline_images_per_s"] / out["roofline_images_per_s"], 3
    )
    if lowp:
        log("bench: the pipeline again, featurizer in bf16 ...")
        bf = pipeline_bench(scorer, use_gpu=use_gpu, precision="bf16", log=log, **kw)
        out["pipeline_bf16_images_per_s"] = bf["pipeline_images_per_s"]


def _in_process(
    scorer: Scorer,
    fl: dict[str, Any],
    images: int,
    batch: int,
    height: int,
    width: int,
    device: str,
    naive_rows: int,
    bf16: bool,
    heatmap: str,
    log: Log,
) -> tuple[dict[str, Any], bool]:
    """Every figure measured in this process (matmul, scorer, gradient map, decode, bf16,
    naive reference); and whether the machine has bf16 units (the pipeline is measured in
    bf16 too then)."""
    # every test-time transform is one more pass of the image (flips and turns: same FLOPs)
    gflop = fl["total"] * scorer.transforms / 1e9
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
    gradient_figures: dict[str, Any] = {}
    if heatmap == "gradient":
        gradient_figures = _gradient_figures(scorer, imgs, batch, device, t_scorer, log)
    log("bench: timing JPEG decoding ...")
    decode_ms = _decode_ms(imgs)
    lowp = bf16 and has_bf16_units(device)
    bf16_figures: dict[str, Any] = {}
    if lowp:
        log("bench: timing bf16 matmul and the scorer in bf16 ...")
        bf16_figures = _bf16_figures(scorer, imgs, batch, score_all, device)
    roofline = gemm / gflop
    naive_figures = _naive_figures(scorer, imgs[0], naive_rows, roofline, log)
    out: dict[str, Any] = {
        **_header_fields(scorer, fl, imgs, batch, device, gflop),
        "gemm_gflops": round(gemm, 1),
        "roofline_images_per_s": round(roofline, 2),
        "scorer_images_per_s": round(images / t_scorer, 2),
        "scorer_fraction_of_roofline": round(images / t_scorer / roofline, 3),
        "heatmap": heatmap,
        **gradient_figures,
        "pipeline_images_per_s": None,
        "pipeline_fraction_of_roofline": None,
        **naive_figures,
        "decode_ms_per_image": round(decode_ms, 2),
        **bf16_figures,
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "torch": str(torch.__version__),
        "machine": platform.machine(),
    }
    return out, lowp


def run_bench(
    *,
    preset: str = "grain-full",
    model: Scorer | None = None,
    images: int = 32,
    batch: int = 16,
    height: int = 460,
    width: int = 640,
    threads: int | None = None,
    device: str = "cpu",
    naive_rows: int = 6,
    pipeline_images: int = 600,
    actors: int = 1,
    ray_address: str | None = None,
    memory_images: int = 0,
    bf16: bool = True,
    transforms: int | None = None,
    heatmap: str = "likelihood",
    settings: Settings | None = None,
    log: Callable[[str], None] = lambda s: print(s, file=sys.stderr),
) -> dict[str, Any]:
    """Measure and return the bench object of DESIGN.md. With ``bf16`` and bf16 matrix
    units, also the bf16 matmul rate, the scorer and pipeline in bf16, and how far bf16 moves
    the window log-likelihoods of this model on these images. With ``heatmap="gradient"``
    (CNN models), also the gradient map alone and the scorer with it (what a ``score
    --heatmap gradient`` actor computes), and the pipeline writes gradient maps."""
    if threads:
        torch.set_num_threads(threads)
    scorer = (model or random_scorer(preset)).to(device).eval()
    if transforms is not None:
        scorer.transforms = transforms
    if heatmap == "gradient":  # before anything is timed: a window model is refused
        from flowcore.gradient import check_gradient_support

        check_gradient_support(scorer)
    fl = flops_per_image(scorer, height, width)
    log(
        f"bench: {preset if model is None else 'model'} on {device}, "
        f"{torch.get_num_threads()} threads, {images} images {height}×{width}"
    )
    out, lowp = _in_process(
        scorer, fl, images, batch, height, width, device, naive_rows, bf16, heatmap, log
    )
    if pipeline_images:
        kw: dict[str, Any] = {"images": pipeline_images, "height": height, "width": width}
        kw |= {"actors": actors, "batch": batch, "threads": threads}
        kw |= {"ray_address": ray_address, "heatmap": heatmap, "settings": settings}
        _pipeline_figures(out, scorer, device, lowp, log, kw)
    if memory_images:
        out["memory"] = memory_bench(
            scorer, images=memory_images, height=height, width=width, actors=actors, log=log
        )
    # this process's high-water mark: the in-process scorer, plus the Ray driver if the
    # pipeline ran (its actors and tasks are other processes)
    out["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    return out


def _decode_ms(imgs: np.ndarray) -> float:
    """Milliseconds to decode one of these images from JPEG bytes (quality 90) with the
    scoring job's decoder (best of two passes)."""
    import io

    from PIL import Image

    from pipelines.archive import decode_image

    blobs = []
    for img in imgs:
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, "JPEG", quality=90)
        blobs.append(buf.getvalue())

    def run() -> None:
        for b in blobs:
            decode_image(b)

    return 1000 * _best_time(run, 2) / len(blobs)


def _bf16_figures(
    scorer: Scorer,
    imgs: np.ndarray,
    batch: int,
    score_all: Callable[[], None],
    device: str,
) -> dict[str, Any]:
    """The bf16 matmul rate, the scorer's images/s in bf16, and the accuracy gates of
    :func:`flowcore.precision.check_precision` on these images: |ΔLL| per window (median,
    99th percentile) and the Spearman correlation of per-image quality, bf16 against fp32."""
    gemm16 = gemm_gflops(device=device, dtype=torch.bfloat16)
    check = check_precision(scorer, list(imgs), "bf16", batch=batch)
    scorer.set_precision("bf16")
    try:
        with torch.inference_mode():
            t16 = _best_time(score_all, 2)
    finally:
        scorer.set_precision("fp32")
    rho = check.quality_spearman
    return {
        "gemm_bf16_gflops": round(gemm16, 1),
        "scorer_bf16_images_per_s": round(len(imgs) / t16, 2),
        "bf16_median_abs_dll": round(check.median_abs_dll, 4),
        "bf16_p99_abs_dll": round(check.p99_abs_dll, 4),
        "bf16_quality_spearman": None if rho is None else round(rho, 5),
        "bf16_passes_gates": check.passed,
    }
