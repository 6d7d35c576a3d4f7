"""``flowscore bench``'s printing: the figures of :mod:`pipelines.usecases.bench` and
:mod:`pipelines.usecases.bench_tables` as the aligned text the command prints."""

from __future__ import annotations

from typing import Any

from pipelines.usecases.bench_tables import QUERIES


def _pipeline_text(r: dict[str, Any]) -> str:
    if r["pipeline_images_per_s"] is None:
        return "not measured (--pipeline-images 0)"
    return (
        f"{r['pipeline_images_per_s']} "
        f"({100 * r['pipeline_fraction_of_roofline']:.0f} % of roofline; "
        f"{r['pipeline_images']} files to committed rows, {r['pipeline_actors']} "
        f"actor(s); whole command {r['pipeline_command_images_per_s']})"
    )


def _naive_text(r: dict[str, Any]) -> str:
    if r["naive_images_per_s"] is None:
        return "not measured (the reference is the single-scale window sweep)"
    return (
        f"{r['naive_images_per_s']} ({100 * r['naive_fraction_of_roofline']:.0f} % of "
        f"roofline, {r['naive_rows_timed']} rows timed and scaled)"
    )


def _bf16_rows(r: dict[str, Any]) -> list[tuple[str, str]]:
    return [
        ("bf16 matmul GFLOP/s", f"{r['gemm_bf16_gflops']}"),
        (
            "scorer bf16 images/s",
            f"{r['scorer_bf16_images_per_s']} (|ΔLL| median {r['bf16_median_abs_dll']}, "
            f"99th pct {r['bf16_p99_abs_dll']} nats; quality Spearman "
            f"{r['bf16_quality_spearman']})",
        ),
        ("pipeline bf16 images/s", f"{r.get('pipeline_bf16_images_per_s', 'not measured')}"),
    ]


def _memory_rows(m: dict[str, Any] | None) -> list[tuple[str, str]]:
    if not m:
        return []
    rows = [
        (
            f"score RSS, {m[label]['images']} images",
            f"job {m[label]['job_peak_rss_mb']} MB (anonymous "
            f"{m[label]['job_peak_anon_mb']} MB), all its processes (PSS) "
            f"{m[label]['session_peak_pss_mb']} MB ({m[label]['seconds']} s)",
        )
        for label in ("small", "large")
    ]
    rows.append(
        (
            "RSS growth at 4× images",
            f"job {100 * m['job_rss_growth']:+.1f} % (anonymous "
            f"{100 * m['job_anon_growth']:+.1f} %), "
            f"all processes {100 * m['session_pss_growth']:+.1f} %",
        )
    )
    return rows


def format_table(r: dict[str, Any]) -> str:
    rows = [
        (
            "model",
            f"{r['flow']} on {r['components']}-dim windows {r['window']}px / {r['stride']}"
            if r["window"]
            else f"{r['flow']} on {r['components']}-dim CNN cells, stride {r['stride']}",
        ),
        ("image", f"{r['image_height']}×{r['image_width']}, grid {r['grid'][0]}×{r['grid'][1]}"),
        ("device, threads", f"{r['device']}, {r['threads']}"),
        (
            "GFLOP per image",
            f"{r['gflop_per_image']} (projection {r['gflop_projection']}, flow {r['gflop_flow']}"
            + (
                f"; × {r['test_transforms']} test-time transforms)"
                if r["test_transforms"] > 1
                else ")"
            ),
        ),
        ("fp32 matmul GFLOP/s", f"{r['gemm_gflops']}"),
        ("JPEG decode ms/image", f"{r['decode_ms_per_image']}"),
        ("roofline images/s", f"{r['roofline_images_per_s']}"),
        (
            "scorer images/s",
            f"{r['scorer_images_per_s']} "
            f"({100 * r['scorer_fraction_of_roofline']:.0f} % of roofline)",
        ),
        *(
            [
                (
                    "with gradient maps images/s",
                    f"{r['scorer_gradient_images_per_s']} (the gradient map alone "
                    f"{r['gradient_map_images_per_s']}; the pipeline writes gradient maps)",
                )
            ]
            if "gradient_map_images_per_s" in r
            else []
        ),
        ("pipeline images/s", _pipeline_text(r)),
        ("naive images/s", _naive_text(r)),
        ("peak RSS MB", f"{r['peak_rss_mb']}"),
    ]
    if "gemm_bf16_gflops" in r:
        rows[-1:-1] = _bf16_rows(r)
    rows += _memory_rows(r.get("memory"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def format_table_bench(r: dict[str, Any]) -> str:
    lines = [
        f"tables: {r['rows']:,} rows of image_scores in {r['commits']} commits, "
        f"heatmaps of {r['heatmap_cells']} cells"
        + (f"; filled in {r['fill_s']} s" if "fill_s" in r else ""),
        "| step | before maintain | after maintain |",
        "|---|---|---|",
    ]
    b, a = r["shape_before"], r["shape_after"]
    lines.append(
        f"| image_scores files / snapshots / GB | {b['data_files']} / {b['snapshots']} / "
        f"{b['data_gb']} | {a['data_files']} / {a['snapshots']} / {a['data_gb']} |"
    )

    def cell(step: str, phase: str) -> str:
        f = r[f"{step}_{phase}"]
        if step == "query":
            times = ", ".join(f"{f[k + ' s']} s" for k in QUERIES)
            return f"{times}; {f['rss_mb']} MB"
        text = f"diff {f['diff_s']} s"
        if "commit_s" in f:
            text += f" + {f['commits']} commits {f['commit_s']} s"
        return f"{text}; {f['rss_mb']} MB (listing {f['listing_mb']} MB)"

    names = {
        "idle": "nightly run, nothing new",
        "new": "nightly run, 1 % new",
        "query": "queries: " + " / ".join(QUERIES),
    }
    for step, name in names.items():
        lines.append(f"| {name} | {cell(step, 'before')} | {cell(step, 'after')} |")
    lines.append(f"maintain took {r['maintain_s']} s")
    return "\n".join(lines)
