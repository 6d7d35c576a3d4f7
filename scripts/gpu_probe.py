"""Where a GPU scorer's time goes, and what helps: a diagnostic beside ``flowscore bench``.

    PYTHONPATH=. python3 scripts/gpu_probe.py        # needs CUDA; writes $OUT/probe.json

For grain-full and grain-quarter (random bases, 256 synthetic 460×640 images): images/s at
4,096 / 65,536 / 1,048,576 flow rows per call and 64 / 256 images per call; the upload,
featurizer and flow times of 64 images; a page-locked against an ordinary host-to-device
copy; the flow under ``torch.compile`` and under bf16 autocast; the top CUDA kernels. The
README's GPU section quotes its output on one H200.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

sys.path.insert(0, os.getcwd())
from flowcore.flops import flops_per_image  # noqa: E402
from flowcore.windows import to_tensor  # noqa: E402
from pipelines.usecases.bench import _images, gemm_gflops, random_scorer  # noqa: E402

DEV = "cuda"


def timeit(fn: Callable[[], object], reps: int = 3) -> float:
    fn()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return best


def probe(preset: str, imgs: np.ndarray) -> dict[str, Any]:
    sc = random_scorer(preset).to(DEV).eval()
    res: dict[str, Any] = {"gflop_per_image": flops_per_image(sc, 460, 640)["total"] / 1e9}
    n = len(imgs)
    for chunk in (4096, 65536, 1 << 20):
        sc.chunk_rows = chunk
        for batch in (64, 256):

            def run(batch: int = batch) -> None:
                with torch.inference_mode():
                    for k in range(0, n, batch):
                        sc.log_likelihood_grid(imgs[k : k + batch])

            res[f"chunk{chunk}_b{batch}"] = round(n / timeit(run), 1)
            print(preset, chunk, batch, res[f"chunk{chunk}_b{batch}"], flush=True)
    sc.chunk_rows = 1 << 20
    x = imgs[:64]
    xt = to_tensor(x, DEV)
    with torch.inference_mode():
        feats = sc.featurizer.featurize(xt)[0]
        rows = feats.permute(0, 2, 3, 1).reshape(-1, feats.shape[1])
        pinned = torch.from_numpy(np.stack(x)).pin_memory()
        res["upload_ms"] = timeit(lambda: to_tensor(x, DEV)) * 1e3
        res["feat_ms"] = timeit(lambda: sc.featurizer.featurize(xt)) * 1e3
        res["flow_ms"] = timeit(lambda: sc.grid_from_features(feats)) * 1e3
        res["pinned_copy_ms"] = timeit(lambda: pinned.to(DEV, non_blocking=True)) * 1e3
        res["pageable_copy_ms"] = timeit(lambda: torch.from_numpy(np.stack(x)).to(DEV)) * 1e3
        try:
            compiled = torch.compile(sc.flow.log_prob, mode="max-autotune-no-cudagraphs")
            res["flow_compiled_ms"] = timeit(lambda: compiled(rows)) * 1e3
        except Exception as e:  # noqa: BLE001 - a diagnostic reports what failed
            res["compile_error"] = repr(e)[:300]
        with torch.autocast("cuda", dtype=torch.bfloat16):
            res["flow_bf16_ms"] = timeit(lambda: sc.flow.log_prob(rows)) * 1e3
    acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.inference_mode(), torch.profiler.profile(activities=acts) as prof:
        sc.log_likelihood_grid(x)
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=15), flush=True)
    return res


def main() -> None:
    print(torch.__version__, torch.cuda.get_device_name(), flush=True)
    out: dict[str, Any] = {
        "gemm_fp32": gemm_gflops(device=DEV),
        "gemm_bf16": gemm_gflops(device=DEV, dtype=torch.bfloat16),
    }
    imgs = _images(256, 460, 640, seed=0)
    for preset in ("grain-full", "grain-quarter"):
        out[preset] = probe(preset, imgs)
        print(json.dumps(out[preset]), flush=True)
    folder = os.environ.get("OUT", ".")
    with open(os.path.join(folder, "probe.json"), "w", encoding="utf-8") as f:
        json.dump(out, f, indent=1)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
