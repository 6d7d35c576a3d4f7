"""Is a fitted scorer as good in bf16 as in fp32? The accuracy gates of a lower precision,
checked on a model's own held-out images.

``train`` runs :func:`check_precision` on the held-out images and up to 24 training images
after calibration and
records in the bundle the precisions that passed (``Scorer.validated_precisions``, always
including ``fp32``); ``--precision auto`` picks bf16 only for a model validated in it and a
device that multiplies bf16 in hardware (:func:`has_bf16_units`). ``bench`` and ``evaluate``
report the same figures.

The gates (:data:`GATES`) are per-window |ΔLL| between the two precisions (median and 99th
percentile, in nats) and the Spearman rank correlation of per-image ``quality``. A grid
where fp32 gives a finite log-likelihood and bf16 does not (or the reverse) fails outright.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass

import numpy as np
import torch

from .scorer import PRECISIONS, Scorer, summarize

__all__ = [
    "GATES",
    "PrecisionGates",
    "PrecisionCheck",
    "PrecisionTally",
    "check_precision",
    "has_bf16_units",
    "spearman",
]


@dataclass(frozen=True)
class PrecisionGates:
    median_abs_dll: float = 0.05
    p99_abs_dll: float = 0.5
    quality_spearman: float = 0.999


GATES = PrecisionGates()
"""Issue 14's gates: median |ΔLL| ≤ 0.05 nats, 99th percentile ≤ 0.5, Spearman ≥ 0.999."""


@dataclass(frozen=True)
class PrecisionCheck:
    """``precision`` against fp32 on ``images`` images (``windows`` windows in all)."""

    precision: str
    images: int
    windows: int
    median_abs_dll: float
    p99_abs_dll: float
    quality_spearman: float | None  # None with fewer than 3 images
    passed: bool
    why: str  # "" when passed, else the first gate missed

    def as_dict(self) -> dict[str, object]:
        return asdict(self)

    def summary(self) -> str:
        rho = "—" if self.quality_spearman is None else f"{self.quality_spearman:.4f}"
        verdict = "passed" if self.passed else f"not used: {self.why}"
        return (
            f"{self.precision} against fp32 on {self.images} images: |ΔLL| median "
            f"{self.median_abs_dll:.3f}, p99 {self.p99_abs_dll:.3f} nats, quality Spearman "
            f"{rho}: {verdict}"
        )


def has_bf16_units(device: str | torch.device = "cpu") -> bool:
    """Whether the device multiplies bf16 matrices in hardware: a CUDA GPU with bf16, or a
    CPU with AMX tiles or AVX-512 BF16 dot products (Linux flags ``amx_bf16``,
    ``avx512_bf16``). Elsewhere bf16 is emulated and slower than fp32."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    if dev.type != "cpu":
        return False
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            flags = {w for line in f if line.startswith("flags") for w in line.split()}
    except OSError:
        return False
    return bool(flags & {"amx_bf16", "avx512_bf16"})


def spearman(a: np.ndarray, b: np.ndarray) -> float | None:
    """Spearman's rank correlation (scipy's, ties averaged); None below 3 values, 1.0 when
    both are constant, 0.0 when only one is (where scipy answers nan)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if len(a) < 3:
        return None
    flat_a, flat_b = bool(np.all(a == a[0])), bool(np.all(b == b[0]))
    if flat_a or flat_b:
        return 1.0 if flat_a and flat_b else 0.0
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).statistic)


class PrecisionTally:
    """Grids of the same images in fp32 and in a lower precision, batch by batch; then
    :meth:`check` against the gates (used by :func:`check_precision` and ``evaluate``)."""

    def __init__(self) -> None:
        self.diffs: list[np.ndarray] = []
        self.quality: tuple[list[np.ndarray], list[np.ndarray]] = ([], [])
        self.mismatched = 0
        self.images = 0

    def add(self, full: torch.Tensor, low: torch.Tensor) -> None:
        """(N, gh, gw) window log-likelihoods of N images in fp32 and the lower precision."""
        a, b = full.double().cpu(), low.double().cpu()
        fa, fb = torch.isfinite(a), torch.isfinite(b)
        self.mismatched += int((fa != fb).sum())
        self.diffs.append((a - b).abs()[fa & fb].numpy())
        lowest = torch.finfo(torch.float64).min  # an impossible window: the lowest quality
        for side, g, fin in ((0, a, fa), (1, b, fb)):
            q = summarize(torch.where(fin, g, lowest))["quality"]
            self.quality[side].append(q.double().numpy())
        self.images += a.shape[0]

    def check(self, precision: str, gates: PrecisionGates = GATES) -> PrecisionCheck:
        if self.images == 0:
            raise ValueError("a precision check needs at least one image")
        d = np.concatenate(self.diffs)
        med = float(np.median(d)) if d.size else math.inf
        p99 = float(np.quantile(d, 0.99)) if d.size else math.inf
        rho = spearman(np.concatenate(self.quality[0]), np.concatenate(self.quality[1]))
        why = ""
        if self.mismatched:
            why = f"{self.mismatched} window(s) finite in one precision only"
        elif med > gates.median_abs_dll:
            why = f"median |ΔLL| {med:.3f} > {gates.median_abs_dll}"
        elif p99 > gates.p99_abs_dll:
            why = f"p99 |ΔLL| {p99:.3f} > {gates.p99_abs_dll}"
        elif rho is not None and rho < gates.quality_spearman:
            why = f"quality Spearman {rho:.4f} < {gates.quality_spearman}"
        return PrecisionCheck(
            precision=precision,
            images=self.images,
            windows=int(d.size + self.mismatched),
            median_abs_dll=round(med, 5),
            p99_abs_dll=round(p99, 5),
            quality_spearman=None if rho is None else round(rho, 6),
            passed=not why,
            why=why,
        )


@torch.no_grad()
def check_precision(
    scorer: Scorer,
    images: Iterable[np.ndarray],
    precision: str = "bf16",
    *,
    batch: int = 8,
    gates: PrecisionGates = GATES,
) -> PrecisionCheck:
    """Score ``images`` (H×W×3 uint8; sizes may differ) in fp32 and in ``precision`` and
    compare the window log-likelihood grids against ``gates``. The scorer's own precision is
    restored afterwards."""
    if precision not in PRECISIONS or precision == "fp32":
        raise ValueError(f"check_precision compares a lower precision with fp32, not {precision!r}")
    keep = scorer.precision
    tally = PrecisionTally()

    def run(group: list[np.ndarray]) -> None:
        x = np.stack(group)
        scorer.set_precision("fp32")
        a = scorer.log_likelihood_grid(x)
        scorer.set_precision(precision)
        tally.add(a, scorer.log_likelihood_grid(x))

    try:
        pending: list[np.ndarray] = []
        for img in images:
            if pending and (img.shape != pending[0].shape or len(pending) >= batch):
                run(pending)
                pending = []
            pending.append(img)
        if pending:
            run(pending)
    finally:
        scorer.set_precision(keep)
    return tally.check(precision, gates)
