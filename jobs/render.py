"""The report's charts (box plots, histograms, trends, bars), each drawn on a bare matplotlib
``Figure`` with the Agg canvas and written as one PNG. The pictures the use cases log to
MLflow (overlays, ROC curves, the loss curve) are in :mod:`pipelines.plots`."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from pipelines.plots import figure as _figure
from pipelines.plots import save_figure as _save

__all__ = [
    "save_image_boxplots",
    "save_histogram",
    "save_trend",
    "save_grouped_boxplots",
    "save_bar_chart",
]


# ---------------------------------------------------------------- report figures
# Each takes plain arrays, draws on a bare matplotlib ``Figure`` with the Agg canvas (no
# pyplot state) and writes one PNG; the caller (``jobs/report.py``) does the SQL.


_BIN_COLOURS = ("#8b0000", "#d2691e", "#daa520", "#6b8e23", "#2e8b57", "#4682b4", "#6a5acd")


def save_image_boxplots(
    path: str | Path,
    boxes: Sequence[tuple[str, np.ndarray, int]],
    bin_labels: Sequence[str],
    title: str,
) -> Path:
    """Per-image box plots of window log-likelihoods (the grain paper's Figure 2): one box
    per ``(label, values, bin)`` in the order given (the caller orders them by quality), each
    coloured by its bin; the legend names ``bin_labels[bin]``."""
    from matplotlib.patches import Patch

    fig = _figure(max(7.0, 0.45 * len(boxes) + 5.0), 5.0)
    ax = fig.add_subplot()
    if boxes:
        bp = ax.boxplot(
            [np.asarray(v, dtype=float) for _, v, _ in boxes],
            patch_artist=True,
            widths=0.6,
            flierprops={"markersize": 2, "alpha": 0.4},
            medianprops={"color": "black"},
        )
        for patch, (_, _, b) in zip(bp["boxes"], boxes, strict=True):
            patch.set_facecolor(_BIN_COLOURS[b % len(_BIN_COLOURS)])
            patch.set_alpha(0.8)
        ax.set_xticks(range(1, len(boxes) + 1))
        ax.set_xticklabels([lab for lab, _, _ in boxes], rotation=60, ha="right", fontsize=7)
        used = sorted({b for _, _, b in boxes})
        ax.legend(
            handles=[
                Patch(facecolor=_BIN_COLOURS[b % len(_BIN_COLOURS)], alpha=0.8, label=bin_labels[b])
                for b in used
            ],
            title="quality bin",
            fontsize="small",
            loc="upper left",
            bbox_to_anchor=(1.01, 1.0),
        )
    ax.set_ylabel("window log-likelihood")
    ax.set_xlabel("image (ordered by quality)")
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def save_histogram(path: str | Path, values: np.ndarray, title: str, xlabel: str) -> Path:
    """A histogram of ``values`` (non-finite values left out) with its median marked."""
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    fig = _figure(6.0, 4.0)
    ax = fig.add_subplot()
    if v.size:
        ax.hist(v, bins=int(np.clip(np.sqrt(v.size) * 2, 5, 60)), color="#4682b4", alpha=0.85)
        med = float(np.median(v))
        ax.axvline(med, color="black", linestyle="--", linewidth=1, label=f"median {med:.3g}")
        ax.legend(fontsize="small")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("images")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def save_trend(
    path: str | Path,
    times: np.ndarray,
    values: np.ndarray,
    flagged: np.ndarray,
    line: tuple[np.ndarray, np.ndarray, str] | None,
    title: str,
    ylabel: str,
) -> Path:
    """A scatter of ``values`` over ``times`` (``datetime64``), flagged points in red, with
    an optional median line ``(times, medians, label)``."""
    fig = _figure(8.0, 4.0)
    ax = fig.add_subplot()
    t = np.asarray(times, dtype="datetime64[us]")
    v = np.asarray(values, dtype=float)
    f = np.asarray(flagged, dtype=bool)
    if t.size:
        ax.scatter(t[~f], v[~f], s=6, alpha=0.5, color="#4682b4", label="image", rasterized=True)
        if f.any():
            ax.scatter(t[f], v[f], s=10, alpha=0.8, color="#8b0000", label="flagged anomaly")
    if line is not None and line[0].size:
        lt = np.asarray(line[0], dtype="datetime64[us]")
        ax.plot(lt, line[1], color="black", linewidth=1.8, marker=".", label=line[2])
    ax.set_xlabel("captured_at (UTC)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if t.size:
        ax.legend(fontsize="small", loc="best")
    fig.autofmt_xdate()
    return _save(fig, path)


def save_daily(
    path: str | Path,
    days: np.ndarray,
    series: Sequence[tuple[str, np.ndarray, np.ndarray, np.ndarray]],
    title: str,
) -> Path:
    """Two panels over ``days`` (``datetime64[D]``): the median quality per day and the
    share of flagged images per day, one line per ``(label, images, flagged, median)``
    (e.g. "all", then one per value of a path column)."""
    fig = _figure(8.0, 6.0)
    top, bottom = fig.add_subplot(2, 1, 1), fig.add_subplot(2, 1, 2, sharex=None)
    d = np.asarray(days, dtype="datetime64[D]").astype("datetime64[us]")
    for i, (label, images, flagged, median) in enumerate(series):
        n = np.asarray(images, dtype=float)
        share = np.where(n > 0, np.asarray(flagged, dtype=float) / np.maximum(n, 1), np.nan)
        style = {"color": "black", "linewidth": 2.0} if i == 0 else {"linewidth": 1.2}
        top.plot(d, np.asarray(median, dtype=float), marker=".", label=label, **style)
        bottom.plot(d, 100 * share, marker=".", label=label, **style)
    top.set_ylabel("median quality")
    top.set_title(title)
    bottom.set_ylabel("flagged images (%)")
    bottom.set_xlabel("day scored (UTC)")
    for ax in (top, bottom):
        ax.grid(alpha=0.3)
        if series:
            ax.legend(fontsize="small", loc="best")
    fig.autofmt_xdate()
    return _save(fig, path)


def save_grouped_boxplots(
    path: str | Path,
    panels: Sequence[tuple[str, Sequence[tuple[str, np.ndarray]]]],
    ylabel: str,
) -> Path:
    """One panel per ``(column, [(value, values), ...])``: a box of ``values`` for each value
    of the column, in the order given, with each box's count under its label."""
    fig = _figure(8.0, 3.6 * max(1, len(panels)))
    for i, (column, groups) in enumerate(panels):
        ax = fig.add_subplot(max(1, len(panels)), 1, i + 1)
        if groups:
            ax.boxplot(
                [np.asarray(v, dtype=float) for _, v in groups],
                widths=0.6,
                flierprops={"markersize": 2, "alpha": 0.4},
                medianprops={"color": "#8b0000"},
            )
            ax.set_xticks(range(1, len(groups) + 1))
            ax.set_xticklabels(
                [f"{name}\n(n={len(v)})" for name, v in groups],
                rotation=0 if len(groups) <= 8 else 60,
                fontsize=8,
            )
        ax.set_title(f"{ylabel} by {column}")
        ax.set_ylabel(ylabel)
        ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def save_bar_chart(
    path: str | Path, labels: Sequence[str], counts: Sequence[int], title: str
) -> Path:
    """A horizontal bar chart of ``counts`` (first at the top), each bar labelled."""
    from matplotlib.ticker import MaxNLocator

    fig = _figure(7.0, max(2.5, 0.4 * len(labels) + 1.5))
    ax = fig.add_subplot()
    y = np.arange(len(labels))
    ax.barh(y, list(counts), color="#8b0000", alpha=0.85)
    ax.set_yticks(y)
    ax.set_yticklabels(list(labels), fontsize=8)
    ax.invert_yaxis()
    for yi, c in zip(y, counts, strict=True):
        ax.annotate(f" {c}", (c, yi), va="center", fontsize=8)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("files")
    ax.set_title(title)
    ax.grid(axis="x", alpha=0.3)
    return _save(fig, path)
