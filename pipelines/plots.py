"""The pictures a use case logs with its MLflow run: heatmap overlays (upsample the
log-likelihood grid to the image, colour low likelihood dark red, blend it semi-transparently,
clip to the model's training quantiles), ROC curves and the training loss curve. Each draws
on a bare matplotlib ``Figure`` with the Agg canvas (no pyplot state, no GUI backend) and
writes one PNG. The report's charts are in ``jobs/render.py``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from flowcore.scorer import Geometry, heatmap_to_image

__all__ = [
    "overlay",
    "side_by_side",
    "save_overlay",
    "save_roc_curves",
    "save_loss_curve",
    "figure",
    "save_figure",
]

DARK_RED = np.array([139.0, 0.0, 0.0])


def _plain_text() -> None:
    """Labels are data (file names, path values such as ``$5``): never parsed as mathtext,
    where ``$…$`` would be a formula and a lone ``$`` an error. Set before any Text exists."""
    import matplotlib

    matplotlib.rcParams["text.parse_math"] = False


def figure(width: float, height: float, dpi: int = 100) -> Any:
    """A bare matplotlib ``Figure`` on the Agg canvas (no pyplot state, no GUI backend;
    matplotlib is imported here, only when a picture is drawn)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    _plain_text()
    fig = Figure(figsize=(width, height), dpi=dpi)
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig: Any, path: str | Path) -> Path:
    """Lay the figure out, write it as a PNG (folders created) and release its artists."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(p, format="png")
    fig.clear()
    return p


def overlay(
    rgb: np.ndarray,
    grid: np.ndarray,
    geometry: Geometry,
    clip: tuple[float, float] | None,
    max_alpha: float = 0.75,
) -> np.ndarray:
    """RGB uint8 (H, W, 3) with the heatmap blended over it: transparent where the window
    log-likelihood is at or above the clip's upper value (typical of normal images), fully
    ``max_alpha`` dark red at or below its lower value."""
    h, w = rgb.shape[:2]
    ll = heatmap_to_image(grid, geometry, h, w).numpy()
    lo, hi = clip if clip else (float(np.quantile(grid, 0.01)), float(np.quantile(grid, 0.99)))
    badness = np.clip((hi - ll) / max(hi - lo, 1e-6), 0.0, 1.0)
    alpha = (max_alpha * badness)[..., None]
    out = rgb.astype(np.float32) * (1 - alpha) + DARK_RED * alpha
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def side_by_side(rgb: np.ndarray, over: np.ndarray, gap: int = 8) -> np.ndarray:
    """Original and overlay next to each other with a white gap."""
    h = rgb.shape[0]
    sep = np.full((h, gap, 3), 255, np.uint8)
    return np.concatenate([rgb, sep, over], axis=1)


def save_overlay(
    path: str | Path,
    rgb: np.ndarray,
    grid: np.ndarray,
    geometry: Geometry,
    clip: tuple[float, float] | None,
) -> Path:
    """Write original | overlay as a PNG."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(side_by_side(rgb, overlay(rgb, grid, geometry, clip))).save(p)
    return p


def save_roc_curves(
    path: str | Path,
    curves: dict[str, tuple[np.ndarray, np.ndarray, float | None]],
    title: str,
) -> Path:
    """Write ROC curves as a PNG: one line per method (``{method: (fpr, tpr, auroc)}``), its
    AUROC in the legend ("n/a" when None), and the chance diagonal. Methods with an empty
    curve are listed in the legend without a line.

    Uses a bare matplotlib ``Figure`` on the Agg canvas: no pyplot state, no GUI backend, and
    nothing left open once the function returns."""
    fig = figure(5.5, 5.0, dpi=110)
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], linestyle="--", color="0.6", linewidth=1, label="chance")
    for name, (fpr, tpr, auc) in curves.items():
        label = f"{name} (AUROC {auc:.3f})" if auc is not None else f"{name} (AUROC n/a)"
        x = np.asarray(fpr, dtype=float).reshape(-1)
        y = np.asarray(tpr, dtype=float).reshape(-1)
        if x.shape != y.shape:
            raise ValueError(f"{name}: fpr has {x.size} points but tpr has {y.size}")
        if x.size:
            ax.plot(x, y, linewidth=1.6, label=label, drawstyle="default")
        else:
            ax.plot([], [], linewidth=1.6, label=label)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_aspect("equal")
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize="small")
    return save_figure(fig, path)


def save_loss_curve(path: str | Path, history: list[dict[str, float]], title: str) -> Path:
    """Write the per-epoch training and validation NLL (nats per window) as a PNG, the best
    epoch marked."""
    fig = figure(6.0, 4.0, dpi=110)
    ax = fig.add_subplot()
    epochs = [int(h["epoch"]) for h in history]
    ax.plot(epochs, [h["train_nll"] for h in history], marker="o", label="train NLL")
    ax.plot(epochs, [h["val_nll"] for h in history], marker="o", label="held-out NLL")
    if history:
        best = min(history, key=lambda h: h["val_nll"])
        ax.axvline(int(best["epoch"]), color="0.6", linestyle="--", linewidth=1)
        ax.annotate(
            f"best epoch {int(best['epoch'])}",
            (int(best["epoch"]), best["val_nll"]),
            textcoords="offset points",
            xytext=(6, 10),
        )
    ax.set_xlabel("epoch")
    ax.set_ylabel("negative log-likelihood (nats / window)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    return save_figure(fig, path)
