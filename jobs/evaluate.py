"""``flowscore evaluate``: the command's printing; the use case is
:func:`pipelines.usecases.evaluate.run_evaluate`."""

from __future__ import annotations

from pipelines.usecases.evaluate import EvalOutcome

__all__ = ["print_evaluation"]


def _fmt(v: float | None, digits: int = 3) -> str:
    return "—" if v is None else f"{v:.{digits}f}"


def print_evaluation(out: EvalOutcome) -> None:
    """The table of methods, the flow's image AUROC by path column and by kind of defect,
    and fp32 beside bf16 when both were measured (stdout)."""
    from pipelines.evaluation import format_table

    report = out.report
    print(format_table(out.result))
    by = [*report.get("flow_image_auroc_by", {}).items()]
    by.append(("defect", report.get("flow_image_auroc_by_defect") or {}))
    for key, vals in by:
        if not vals:
            continue
        shown = ", ".join(f"{v}: {'—' if a is None else f'{a:.3f}'}" for v, a in vals.items())
        print(f"flow image AUROC by {key}: {shown}")
    if "pixel_auroc_gradient" in report:
        print(
            f"flow pixel AUROC, gradient map: {_fmt(report['pixel_auroc_gradient'])} "
            f"(likelihood heatmap: {_fmt(report['pixel_auroc'].get('flow'))})"
        )
    c = report.get("precision_comparison")
    if c:
        print(
            f"fp32 | bf16: image AUROC {_fmt(c['fp32']['image_auroc'])} | "
            f"{_fmt(c['bf16']['image_auroc'])}, pixel AUROC {_fmt(c['fp32']['pixel_auroc'])} | "
            f"{_fmt(c['bf16']['pixel_auroc'])}; window |ΔLL| median {c['median_abs_dll']:.3f}, "
            f"p99 {c['p99_abs_dll']:.3f} nats; quality Spearman {_fmt(c['quality_spearman'], 4)}"
            f"; gates {'passed' if c['passes_gates'] else 'missed'}"
        )
