"""Maximum-likelihood fitting of a flow: mini-batch Adam, gradient clipping, early stopping on
held-out NLL with the best weights restored. A plain function: the Ray Train loop calls it (or
its one-epoch pieces) per worker; nothing here knows about Ray."""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .flows import Flow

__all__ = [
    "FitConfig",
    "EpochStats",
    "FitResult",
    "EarlyStopping",
    "fit_flow",
    "mean_nll",
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


@torch.no_grad()
def mean_nll(flow: Flow, x: Tensor, batch_size: int = 4096) -> float:
    """Mean negative log-likelihood of the rows of x under the flow, in evaluation mode."""
    was_training = flow.training
    flow.eval()
    total = 0.0
    for start in range(0, x.shape[0], batch_size):
        total -= float(flow.log_prob(x[start : start + batch_size]).double().sum())
    flow.train(was_training)
    return total / max(1, x.shape[0])


def nll_step(
    model: torch.nn.Module, opt: torch.optim.Optimizer, x: Tensor, clip_norm: float
) -> float:
    """One maximum-likelihood step on the rows x: ``model(x)`` is their log-density (a
    :class:`Flow`, or one wrapped by DDP, whose forward is ``log_prob``). Returns the batch's
    mean NLL; a non-finite loss raises instead of poisoning the weights."""
    loss = -model(x).mean()
    if not torch.isfinite(loss):
        raise FloatingPointError(
            f"training NLL became {float(loss)}; lower the learning rate or check the data"
        )
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), clip_norm)
    opt.step()
    return float(loss.detach())


def train_epoch(
    flow: Flow,
    opt: torch.optim.Optimizer,
    x: Tensor,
    cfg: FitConfig,
    generator: torch.Generator,
) -> float:
    """One pass over x in shuffled mini-batches; returns the mean training NLL."""
    flow.train()
    perm = torch.randperm(x.shape[0], generator=generator, device="cpu").to(x.device)
    total, count = 0.0, 0
    for start in range(0, x.shape[0], cfg.batch_size):
        idx = perm[start : start + cfg.batch_size]
        if idx.numel() < 2:  # batch norm needs two rows
            continue
        total += nll_step(flow, opt, x[idx], cfg.clip_norm) * idx.numel()
        count += idx.numel()
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


def fit_flow(
    flow: Flow,
    train: Tensor,
    val: Tensor,
    cfg: FitConfig | None = None,
    on_epoch: Callable[[EpochStats], None] | None = None,
) -> FitResult:
    """Fit ``flow`` to the rows of ``train`` (n, D) by maximum likelihood, stopping when the
    NLL of ``val`` has not improved by ``min_delta`` for ``patience`` epochs. The weights of
    the best validation epoch are restored before returning. ``on_epoch`` sees each epoch's
    statistics (progress lines, metrics)."""
    cfg = cfg or FitConfig()
    if train.ndim != 2 or val.ndim != 2 or train.shape[1] != val.shape[1]:
        raise ValueError(
            f"train and val must be (n, D) with the same D: {train.shape}, {val.shape}"
        )
    if train.shape[0] < 2 or val.shape[0] < 1:
        raise ValueError("need at least 2 training rows and 1 validation row")
    gen = torch.Generator().manual_seed(cfg.seed)
    opt = torch.optim.Adam(flow.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    stopper = EarlyStopping(cfg.patience, cfg.min_delta)
    best_state = copy.deepcopy(flow.state_dict())
    result = FitResult(best_epoch=0, best_val_nll=math.inf)
    for epoch in range(1, cfg.max_epochs + 1):
        t0 = time.perf_counter()
        train_nll = train_epoch(flow, opt, train, cfg, gen)
        val_nll = mean_nll(flow, val)
        dt = time.perf_counter() - t0
        is_best = stopper.update(epoch, val_nll)
        if is_best:
            best_state = copy.deepcopy(flow.state_dict())
            result.best_epoch, result.best_val_nll = epoch, val_nll
        stats = EpochStats(
            epoch, train_nll, val_nll, dt, train.shape[0] / dt, stopper.best, is_best
        )
        result.history.append(stats)
        if on_epoch is not None:
            on_epoch(stats)
        if stopper.should_stop:
            result.stopped_early = True
            break
    flow.load_state_dict(best_state)
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
