"""Maximum-likelihood fitting of a flow: mini-batch Adam, gradient clipping, early stopping on
held-out NLL with the best weights restored. Nothing here knows about Ray: :func:`fit_flow`
and the Ray Train loop (``pipelines/train.py``) run the same epoch, made of
:func:`train_batches` (the optimisation over whatever batches they have), :func:`nll_sums`
(held-out NLL) and :class:`EpochTracker` (early stopping, the best weights, the history);
the Ray loop only adds data shards, all-reduces and checkpoint reports around them.

With ``FitConfig.synthetic_anomalies`` the rows come labelled: ``y = 1`` marks feature
vectors of windows that see a synthetic defect (:mod:`flowcore.synthetic`). The objective
is then the normal rows' NLL plus ``synthetic_weight`` times the mean hinge
``max(0, log p(anomaly) - τ)``, with τ = median − ``synthetic_margin`` · spread of the batch's
normal log-likelihoods (:func:`robust_floor`): normal windows keep their maximum likelihood,
made-up defects are pushed below all but the rarest of them (the self-supervised flow of Chiu & Lai,
2023, with NSA/CutPaste-style anomalies). Early stopping follows the same objective on
held-out rows."""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .flows import Flow

__all__ = [
    "FitConfig",
    "EpochStats",
    "FitResult",
    "EarlyStopping",
    "EpochTracker",
    "fit_flow",
    "train_batches",
    "nll_sums",
    "shuffled_batches",
    "mean_nll",
    "Batch",
    "split_batch",
    "objective_sums",
    "held_out_objective",
    "robust_floor",
    "train_epoch",
    "nll_step",
    "optimizer_tensors",
    "load_optimizer_tensors",
]


@dataclass(frozen=True)
class FitConfig:
    """Optimisation settings. NLL is in nats per window (feature vector)."""

    batch_size: int = 512
    lr: float = 1e-3
    weight_decay: float = 1e-6
    max_epochs: int = 50
    patience: int = 5
    min_delta: float = 1e-3
    clip_norm: float = 5.0
    seed: int = 0
    synthetic_anomalies: bool = False
    """Train on synthetic anomalies too (see the module docstring); off: plain maximum
    likelihood, as every bundle from before it."""
    synthetic_weight: float = 1.0
    """Weight of the anomaly hinge against the normal rows' mean NLL."""
    synthetic_margin: float = 3.0
    """How far below the median normal window synthetic anomalies are pushed, in robust
    standard deviations of the normal windows' log-likelihoods (3: about their 0.1 % tail
    if they were normally distributed)."""
    synthetic_rows: int = 32
    """Feature rows taken per synthetic-anomaly image (at most; the cells that see it)."""

    def __post_init__(self) -> None:
        for name in ("batch_size", "max_epochs"):
            if getattr(self, name) < 1:
                raise ValueError(f"FitConfig.{name} must be >= 1")
        if self.patience < 0:
            raise ValueError("FitConfig.patience must be >= 0")
        if not self.lr > 0:
            raise ValueError("FitConfig.lr must be > 0")
        if not self.clip_norm > 0:
            raise ValueError("FitConfig.clip_norm must be > 0")
        if not self.synthetic_weight >= 0 or not self.synthetic_margin >= 0:
            raise ValueError("FitConfig.synthetic_weight and synthetic_margin must be >= 0")
        if self.synthetic_rows < 1:
            raise ValueError("FitConfig.synthetic_rows must be >= 1")


@dataclass(frozen=True)
class EpochStats:
    epoch: int
    train_nll: float
    val_nll: float
    seconds: float
    samples_per_s: float
    best_val_nll: float
    is_best: bool


@dataclass
class FitResult:
    best_epoch: int
    best_val_nll: float
    history: list[EpochStats] = field(default_factory=list)
    stopped_early: bool = False


Batch = Tensor | tuple[Tensor, Tensor]
"""Feature rows ``x`` (n, D), or ``(x, y)`` with ``y`` (n,) = 1 for synthetic anomalies."""


def split_batch(batch: Batch) -> tuple[Tensor, Tensor | None]:
    if isinstance(batch, tuple):
        return batch
    return batch, None


def objective_sums(ll: Tensor, y: Tensor | None, margin: float) -> tuple[Tensor, int, Tensor, int]:
    """(summed NLL of the normal rows, their count, summed hinge of the anomaly rows, their
    count) of a batch's log-likelihoods ``ll`` (n,): the pieces of the objective (module
    docstring), as tensors that carry gradients. Without ``y`` every row is normal."""
    zero = ll.new_zeros(())
    if y is None:
        return -ll.sum(), ll.shape[0], zero, 0
    bad = y > 0.5
    normal, anomalous = ll[~bad], ll[bad]
    hinge = zero
    if anomalous.numel() and normal.numel() >= 2:
        hinge = torch.relu(anomalous - robust_floor(normal.detach(), margin)).sum()
    return -normal.sum(), normal.numel(), hinge, anomalous.numel() if normal.numel() >= 2 else 0


def robust_floor(normal: Tensor, margin: float) -> Tensor:
    """``median - margin · spread`` of normal log-likelihoods, spread being 1.4826 times
    their median absolute deviation: where synthetic anomalies are pushed to. Median and
    MAD barely move when a few normal rows lose likelihood, so pushing anomalies down cannot
    drag the target down with them (a low quantile of the batch did, and ran away)."""
    med = normal.median()
    spread = 1.4826 * (normal - med).abs().median()
    return med - margin * spread.clamp_min(1e-3)


def held_out_objective(sums: Iterable[float], weight: float) -> float:
    """The objective from (NLL sum, normal rows, hinge sum, anomaly rows), summed over
    batches (and workers): mean NLL + ``weight`` · mean hinge."""
    nll, n, hinge, m = sums
    return nll / max(1.0, n) + (weight * hinge / m if m else 0.0)


@torch.no_grad()
def nll_sums(
    flow: Flow, batches: Iterable[Batch], margin: float = 0.0
) -> tuple[float, int, float, int]:
    """(summed NLL of the normal rows, their count, summed anomaly hinge, anomaly rows) of
    the batches under the flow, in evaluation mode (float64 sums); plain tensors are all
    normal rows, so the last two are 0."""
    was_training = flow.training
    flow.eval()
    total, count, hinge, bad = 0.0, 0, 0.0, 0
    for batch in batches:
        x, y = split_batch(batch)
        nll, n, h, m = objective_sums(flow.log_prob(x).double(), y, margin)
        total, count, hinge, bad = total + float(nll), count + n, hinge + float(h), bad + m
    flow.train(was_training)
    return total, count, hinge, bad


def mean_nll(flow: Flow, x: Tensor, batch_size: int = 4096) -> float:
    """Mean negative log-likelihood of the rows of x under the flow, in evaluation mode."""
    total, count, _, _ = nll_sums(flow, x.split(batch_size))
    return total / max(1, count)


def nll_step(
    model: torch.nn.Module,
    opt: torch.optim.Optimizer,
    x: Tensor,
    clip_norm: float,
    y: Tensor | None = None,
    *,
    weight: float = 1.0,
    margin: float = 0.0,
) -> tuple[float, int]:
    """One step on the rows x: ``model(x)`` is their log-density (a :class:`Flow`, or one
    wrapped by DDP, whose forward is ``log_prob``). Maximum likelihood, plus the weighted
    anomaly hinge where ``y`` marks synthetic anomalies. Returns (summed NLL of the normal
    rows, their count); a non-finite loss raises instead of poisoning the weights."""
    nll, n, hinge, m = objective_sums(model(x), y, margin)
    loss = nll / max(1, n)
    if m:
        loss = loss + weight * hinge / m
    if not torch.isfinite(loss):
        raise FloatingPointError(
            f"training NLL became {float(loss)}; lower the learning rate or check the data"
        )
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), clip_norm)
    opt.step()
    return float(nll.detach()), n


def train_batches(
    model: torch.nn.Module,
    opt: torch.optim.Optimizer,
    batches: Iterable[Batch],
    clip_norm: float,
    cfg: FitConfig | None = None,
) -> tuple[float, int]:
    """One epoch of optimisation, one :func:`nll_step` per batch: (summed training NLL of
    the normal rows, their count). A batch of fewer than two rows is skipped (batch norm
    needs two; equal shards of a distributed run skip alike). ``cfg`` gives the anomaly
    hinge's weight and margin for labelled batches."""
    model.train()
    weight = cfg.synthetic_weight if cfg is not None else 1.0
    margin = cfg.synthetic_margin if cfg is not None else 0.0
    total, count = 0.0, 0
    for batch in batches:
        x, y = split_batch(batch)
        if x.shape[0] < 2:
            continue
        nll, n = nll_step(model, opt, x, clip_norm, y, weight=weight, margin=margin)
        total += nll
        count += n
    return total, count


def shuffled_batches(
    x: Tensor, batch_size: int, generator: torch.Generator, y: Tensor | None = None
) -> Iterator[Batch]:
    """The rows of x (and their labels y) in a random order (from ``generator``),
    ``batch_size`` at a time."""
    perm = torch.randperm(x.shape[0], generator=generator, device="cpu").to(x.device)
    for start in range(0, x.shape[0], batch_size):
        idx = perm[start : start + batch_size]
        yield x[idx] if y is None else (x[idx], y[idx])


def train_epoch(
    flow: Flow,
    opt: torch.optim.Optimizer,
    x: Tensor,
    cfg: FitConfig,
    generator: torch.Generator,
    y: Tensor | None = None,
) -> float:
    """One pass over x in shuffled mini-batches; returns the mean training NLL of its
    normal rows."""
    total, count = train_batches(
        flow, opt, shuffled_batches(x, cfg.batch_size, generator, y), cfg.clip_norm, cfg
    )
    return total / max(1, count)


class EarlyStopping:
    """Early-stopping bookkeeping on held-out NLL, shared by :func:`fit_flow` and the
    distributed loop (where every worker sees the same all-reduced NLL and so takes the same
    decision). Patience restarts only on an improvement of at least ``min_delta``; the best
    epoch is tracked regardless of the margin."""

    def __init__(self, patience: int, min_delta: float) -> None:
        self.patience = patience
        self.min_delta = min_delta
        self.best = math.inf
        self.best_epoch = 0
        self.bad = 0

    def update(self, epoch: int, val_nll: float) -> bool:
        """Record an epoch; returns whether it is the best so far."""
        is_best = math.isfinite(val_nll) and val_nll < self.best
        self.bad = 0 if is_best and val_nll < self.best - self.min_delta else self.bad + 1
        if is_best:
            self.best, self.best_epoch = val_nll, epoch
        return is_best

    @property
    def should_stop(self) -> bool:
        return self.bad > self.patience

    def state(self) -> dict[str, float | int]:
        return {"best": self.best, "best_epoch": self.best_epoch, "bad": self.bad}

    def load_state(self, d: dict[str, float | int]) -> None:
        self.best = float(d["best"])
        self.best_epoch = int(d["best_epoch"])
        self.bad = int(d["bad"])


class EpochTracker:
    """What happens at the end of every epoch, in :func:`fit_flow` and in the Ray Train loop
    alike: early stopping on the held-out NLL, a copy of the best epoch's weights, the
    history of :class:`EpochStats`. A resumed run restores ``stopper`` (its state is
    plain numbers) and ``best_state`` from its checkpoint."""

    def __init__(self, flow: Flow, cfg: FitConfig) -> None:
        self.flow = flow
        self.stopper = EarlyStopping(cfg.patience, cfg.min_delta)
        self.best_state: dict[str, Tensor] = copy.deepcopy(flow.state_dict())
        self.history: list[EpochStats] = []

    def end_epoch(
        self, epoch: int, train_nll: float, val_nll: float, seconds: float, rows: float
    ) -> EpochStats:
        is_best = self.stopper.update(epoch, val_nll)
        if is_best:
            self.best_state = copy.deepcopy(self.flow.state_dict())
        stats = EpochStats(
            epoch,
            train_nll,
            val_nll,
            seconds,
            rows / seconds if seconds > 0 else 0.0,
            self.stopper.best,
            is_best,
        )
        self.history.append(stats)
        return stats

    @property
    def should_stop(self) -> bool:
        return self.stopper.should_stop


def fit_flow(
    flow: Flow,
    train: Tensor,
    val: Tensor,
    cfg: FitConfig | None = None,
    on_epoch: Callable[[EpochStats], None] | None = None,
    *,
    train_y: Tensor | None = None,
    val_y: Tensor | None = None,
) -> FitResult:
    """Fit ``flow`` to the rows of ``train`` (n, D) by maximum likelihood, stopping when the
    NLL of ``val`` has not improved by ``min_delta`` for ``patience`` epochs. The weights of
    the best validation epoch are restored before returning. ``on_epoch`` sees each epoch's
    statistics (progress lines, metrics). ``train_y``/``val_y`` (n,) mark synthetic-anomaly
    rows with 1 (see the module docstring); early stopping then follows the held-out
    objective, which :class:`EpochStats` reports as ``val_nll``."""
    cfg = cfg or FitConfig()
    if train.ndim != 2 or val.ndim != 2 or train.shape[1] != val.shape[1]:
        raise ValueError(
            f"train and val must be (n, D) with the same D: {train.shape}, {val.shape}"
        )
    if train.shape[0] < 2 or val.shape[0] < 1:
        raise ValueError("need at least 2 training rows and 1 validation row")
    gen = torch.Generator().manual_seed(cfg.seed)
    opt = torch.optim.Adam(flow.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    tracker = EpochTracker(flow, cfg)
    result = FitResult(best_epoch=0, best_val_nll=math.inf, history=tracker.history)
    for epoch in range(1, cfg.max_epochs + 1):
        t0 = time.perf_counter()
        train_nll = train_epoch(flow, opt, train, cfg, gen, train_y)
        val_batches = (
            val.split(4096)
            if val_y is None
            else list(zip(val.split(4096), val_y.split(4096), strict=True))
        )
        val_nll = held_out_objective(
            nll_sums(flow, val_batches, cfg.synthetic_margin), cfg.synthetic_weight
        )
        stats = tracker.end_epoch(
            epoch, train_nll, val_nll, time.perf_counter() - t0, train.shape[0]
        )
        if stats.is_best:
            result.best_epoch, result.best_val_nll = epoch, val_nll
        if on_epoch is not None:
            on_epoch(stats)
        if tracker.should_stop:
            result.stopped_early = True
            break
    flow.load_state_dict(tracker.best_state)
    flow.eval()
    return result


def optimizer_tensors(opt: torch.optim.Optimizer) -> dict[str, Tensor]:
    """The per-parameter state of an optimizer (Adam's step, exp_avg, exp_avg_sq) as a flat
    ``{"<param index>.<name>": tensor}`` dict that safetensors can store: checkpoints never
    need pickle. Hyper-parameters are not stored (they come from the config)."""
    out: dict[str, Tensor] = {}
    for pid, st in opt.state_dict()["state"].items():
        for key, value in st.items():
            t = value if isinstance(value, Tensor) else torch.tensor(value)
            out[f"{pid}.{key}"] = t.detach().cpu().contiguous().clone()
    return out


def load_optimizer_tensors(opt: torch.optim.Optimizer, tensors: dict[str, Tensor]) -> None:
    """Inverse of :func:`optimizer_tensors` for an optimizer built over the same parameters."""
    sd = opt.state_dict()
    state: dict[int, dict[str, Tensor]] = {}
    for name, t in tensors.items():
        pid, key = name.split(".", 1)
        state.setdefault(int(pid), {})[key] = t
    sd["state"] = state
    opt.load_state_dict(sd)
