"""A small CNN distilled from a flow's window log-likelihoods (the grain paper's cheap scorer).

The student sits in the featurizer slot of a :class:`flowcore.scorer.Scorer` and leaves the
flow slot empty: it predicts the teacher's (N, gh, gw) window log-likelihood grid directly,
on the teacher's own window geometry, so the summaries, the image statistic, the threshold,
the calibration by a path column, the heatmaps and the scoring actors apply unchanged::

    image (N, 3, H, W) in [0, 1] ─resize by the teacher's scale─▶
      trunk: a non-overlapping "patchify" conv (kernel = stride = s; more than one for
             s > 8), then ``depth`` convs 3×3 of stride 1 (ReLU, C channels)
      ─▶ mean and max pool over ⌊w/s⌋ × ⌊w/s⌋ cells (about a window), stride 1
      ─▶ (N, 2C, gh, gw) features (what baselines are fitted on in ``evaluate``)
      ─▶ 1×1 conv 2C→C, ReLU, 1×1 conv C→1 ─▶ standardised log-likelihood
      ─▶ × std + mean of the teacher's training grids ─▶ (N, gh, gw) log-likelihoods

Cell (i, j) is the teacher's window at (i·s, j·s) of the resized image: the pooled cells cover
``[i·s, i·s + s·⌊w/s⌋)`` (the window but for its last ``w mod s`` pixels, which the 3×3
convs see); ``gh = ⌊(H' − w)/s⌋ + 1`` (the extra cells at the far edges are cut off), the grid
of the window featurizers. One patchify conv keeps the arithmetic small (0.16 GFLOP on a
460×640 image at grain-full's geometry, against 6.1 for the teacher); a first version with
overlapping 3×3 stride-2 convs cost 0.65 GFLOP and ran at a tenth of the matmul rate on the
CPU, and torch's stride-1 pools were 5-10x slower than the running sums and shifted maxima
used here.

Training (:func:`distill`): the teacher scores every training image and ``synthetic_copies``
copies of each with one made-up defect (:func:`flowcore.synthetic.add_defect`; no label is
read), and the student learns their grids (Huber loss on standardised values, plus
``quality_weight`` × the squared error of each image's quality). Epochs stop early on the
same loss over the held-out whole images and their synthetic copies; the best weights are
kept. Its threshold and heatmap clip are then calibrated afresh on the student's own scores
of the held-out normal images, as :func:`flowcore.fit.fit_scorer` does for a flow. The
bundle records the teacher (:func:`teacher_record`: its URI, name, version and preset where
known, and a SHA-256 of its tensors).
"""

from __future__ import annotations

import copy
import hashlib
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .windows import Geometry, resize, scaled_size, to_tensor

if TYPE_CHECKING:
    from .scorer import Scorer

__all__ = [
    "DistilledConfig",
    "DistilledFeaturizer",
    "DistillReport",
    "TEACHER_KEYS",
    "distill",
    "spearman",
    "teacher_record",
    "weights_sha256",
]

MAX_CHANNELS = 256
LOSSES = ("mse", "huber")  # DistilledConfig.loss
TEACHER_KEYS = ("uri", "name", "version", "preset", "featurizer", "weights_sha256")
"""What a distilled bundle records of its teacher (each a string or null)."""


@dataclass(frozen=True)
class DistilledConfig:
    """The student: the teacher's geometry (``window``, ``stride``, ``scale``), ``channels``
    C of its convolutions and ``depth`` extra stride-1 convolutions. Training: at most
    ``epochs`` epochs of Adam at ``lr`` on batches of ``batch`` images, stopping after
    ``patience`` epochs without a better held-out loss; ``synthetic_copies`` defect copies of
    each image scored by the teacher; ``quality_weight`` of the per-image quality term;
    targets more than ``target_floor`` standard deviations (of the normal training windows)
    below their mean are learnt as that floor: a synthetic defect can take a window to
    -450,000 nats where normal ones lie within ±60 (factory), and such values, or -inf,
    made the loss NaN; every image the threshold separates lies far above the floor.
    ``loss`` compares the student's standardised grid with the teacher's: ``"mse"``, squared
    error, or ``"huber"`` (smooth L1, quadratic within one standard deviation and linear
    beyond). The image score is a tail statistic (the mean of the lowest windows), and the
    Huber loss gives exactly those windows, many standard deviations down, the least weight:
    on harvest (two copies each) its student reached image AUROC 0.857 where the squared
    error's reached 0.982 (teacher 1.000; README). Four copies rather than two took the
    development AUROC from 0.852 to 0.939 (README)."""

    window: int = 46
    stride: int = 8
    scale: float = 1.0
    channels: int = 32
    depth: int = 1
    epochs: int = 60
    lr: float = 3e-3
    batch: int = 4
    patience: int = 8
    synthetic_copies: int = 4
    quality_weight: float = 0.0
    target_floor: float = 20.0
    loss: str = "mse"

    def __post_init__(self) -> None:
        ints = ("window", "stride", "channels", "depth", "epochs", "batch", "patience")
        for name in (*ints, "synthetic_copies"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise ValueError(f"DistilledConfig.{name} must be an integer, got {v!r}")
        if not 1 <= self.window <= 1024 or not 1 <= self.stride <= 64:
            raise ValueError("DistilledConfig: window must be in [1, 1024], stride in [1, 64]")
        if not 0 < self.scale <= 1:
            raise ValueError(f"DistilledConfig.scale must be in (0, 1], got {self.scale}")
        if not 1 <= self.channels <= MAX_CHANNELS or not 0 <= self.depth <= 4:
            raise ValueError(
                f"DistilledConfig: channels must be in [1, {MAX_CHANNELS}], depth in [0, 4]"
            )
        if self.epochs < 1 or self.batch < 1 or self.patience < 1 or self.synthetic_copies < 0:
            raise ValueError("DistilledConfig: epochs, batch, patience >= 1, copies >= 0")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError("DistilledConfig.lr must be > 0")
        if not (self.quality_weight >= 0 and math.isfinite(self.quality_weight)):
            raise ValueError("DistilledConfig.quality_weight must be >= 0")
        if not (self.target_floor > 0 and math.isfinite(self.target_floor)):
            raise ValueError("DistilledConfig.target_floor must be > 0")
        if self.loss not in LOSSES:
            raise ValueError(f"DistilledConfig.loss must be one of {LOSSES}, got {self.loss!r}")

    @property
    def features(self) -> int:
        """Channels of the feature grid (mean- and max-pooled trunk channels)."""
        return 2 * self.channels

    @property
    def pool(self) -> int:
        """Trunk cells per window side: ⌊w/s⌋ (at least 1), so the pooled grid is never
        smaller than the teacher's."""
        return max(1, self.window // self.stride)


def _strides(s: int) -> list[int]:
    """The patchify layers' strides, product s: one layer up to stride 8 (a linear map of
    each s × s patch, like a PCA of patches), more for larger strides."""
    out = []
    while s > 8:
        f = next(f for f in (8, 7, 6, 5, 4, 3, 2, s) if s % f == 0)
        out.append(f)
        s //= f
    return [*out, s] if s > 1 else out


class DistilledFeaturizer(nn.Module):
    """The student network; see the module docstring. ``teacher`` is what the bundle records
    of the model it was distilled from (:data:`TEACHER_KEYS`)."""

    mean: Tensor
    target_mean: Tensor
    target_std: Tensor

    def __init__(self, cfg: DistilledConfig, seed: int = 0) -> None:
        super().__init__()
        self.cfg = cfg
        self.teacher: dict[str, str | None] = {}
        gen_state = torch.random.get_rng_state()
        torch.manual_seed(seed)
        try:
            cin, c = 3, cfg.channels
            self.patchify = nn.ModuleList()
            for s in _strides(cfg.stride):
                self.patchify.append(nn.Conv2d(cin, c, s, stride=s))
                cin = c
            self.mix = nn.ModuleList(
                nn.Conv2d(c if k or cfg.stride > 1 else 3, c, 3, padding=1)
                for k in range(cfg.depth if cfg.stride > 1 else max(1, cfg.depth))
            )
            self.head = nn.Sequential(nn.Conv2d(cfg.features, c, 1), nn.ReLU(), nn.Conv2d(c, 1, 1))
        finally:
            torch.random.set_rng_state(gen_state)
        self.register_buffer("mean", torch.full((3,), 0.5))
        self.register_buffer("target_mean", torch.zeros(1))
        self.register_buffer("target_std", torch.ones(1))

    @property
    def geometry(self) -> Geometry:
        return Geometry(self.cfg.window, self.cfg.stride, self.cfg.scale)

    @property
    def device(self) -> torch.device:
        return self.mean.device

    def grid_shape(self, height: int, width: int) -> tuple[int, int]:
        """The teacher's (gh, gw) for a full-resolution height × width image."""
        h, w = scaled_size(height, width, self.cfg.scale)
        if h < self.cfg.window or w < self.cfg.window:
            raise ValueError(
                f"image {height}×{width} (×{self.cfg.scale}) is smaller than the "
                f"{self.cfg.window}px window"
            )
        return (h - self.cfg.window) // self.cfg.stride + 1, (
            w - self.cfg.window
        ) // self.cfg.stride + 1

    def featurize(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(N, 3, H, W) in [0, 1] -> the (N, 2C, gh, gw) features and the (N, gh, gw)
        predicted window log-likelihoods (in the teacher's units)."""
        feats = self(x)
        z = self.head(feats)[:, 0]
        return feats, z * self.target_std + self.target_mean

    def forward(self, x: Tensor) -> Tensor:
        gh, gw = self.grid_shape(x.shape[-2], x.shape[-1])
        t = resize(x, self.cfg.scale)
        convs = self._convs(self.patchify)
        if convs:  # the pixel mean folded into the first layer's bias
            first = convs[0]
            assert first.bias is not None
            bias = first.bias - first.weight.sum((2, 3)) @ self.mean
            t = F.conv2d(t, first.weight, bias, stride=first.stride).relu_()
            for conv in convs[1:]:
                t = conv(t).relu_()
        else:
            t = t - self.mean.view(1, 3, 1, 1)
        for conv in self._convs(self.mix):
            t = conv(t).relu_()
        p = self.cfg.pool
        feats = torch.cat([_box_mean(t, p), _box_max(t, p)], dim=1)
        return feats[:, :, :gh, :gw]  # ⌊H'/s⌋ − ⌊w/s⌋ + 1 ≥ gh cells

    @staticmethod
    def _convs(layers: nn.ModuleList) -> list[nn.Conv2d]:
        return [m for m in layers if isinstance(m, nn.Conv2d)]

    def flops(self, height: int, width: int) -> int:
        """FLOPs of the matrix products and convolutions on one height × width image."""
        h, w = scaled_size(height, width, self.cfg.scale)
        total = 0
        for conv in self._convs(self.patchify):
            s = conv.stride[0]
            h, w = h // s, w // s
            total += 2 * h * w * conv.weight.numel()
        total += sum(2 * h * w * conv.weight.numel() for conv in self._convs(self.mix))
        gh, gw = self.grid_shape(height, width)
        return total + sum(
            2 * gh * gw * m.weight.numel() for m in self.head if isinstance(m, nn.Conv2d)
        )


def _box_mean(t: Tensor, p: int) -> Tensor:
    """Mean over every p × p block of (N, C, H, W), stride 1 (``avg_pool2d(t, p, 1)``, which
    ran 5x slower on this CPU): running sums along each axis."""
    c = F.pad(t, (0, 0, 1, 0)).cumsum(2)
    c = c[:, :, p:] - c[:, :, :-p]
    c = F.pad(c, (1, 0)).cumsum(3)
    return (c[:, :, :, p:] - c[:, :, :, :-p]) / (p * p)


def _box_max(t: Tensor, p: int) -> Tensor:
    """Max over every p × p block, stride 1 (``max_pool2d(t, p, 1)``, 10x slower here):
    shifted maxima along each axis."""
    h = t.shape[2] - p + 1
    m = t[:, :, :h]
    for k in range(1, p):
        m = torch.maximum(m, t[:, :, k : k + h])
    w = m.shape[3] - p + 1
    r = m[:, :, :, :w]
    for k in range(1, p):
        r = torch.maximum(r, m[:, :, :, k : k + w])
    return r


def weights_sha256(scorer: nn.Module) -> str:
    """SHA-256 over a model's tensors (names, dtypes, shapes and bytes, sorted by name): the
    same for the same weights wherever they were loaded."""
    h = hashlib.sha256()
    for name, t in sorted(scorer.state_dict().items()):
        c = t.detach().cpu().contiguous()
        h.update(f"{name}|{c.dtype}|{tuple(c.shape)}|".encode())
        h.update(c.view(torch.uint8).numpy().tobytes() if c.numel() else b"")
    return h.hexdigest()


def teacher_record(
    teacher: Scorer, uri: str | None = None, name: str | None = None, version: str | None = None
) -> dict[str, str | None]:
    """What a distilled bundle records of its teacher: ``uri``, ``name``, ``version`` (where
    known), its ``preset`` (from its training record, where it has one), its featurizer type
    and the SHA-256 of its tensors (:func:`weights_sha256`)."""
    stats = teacher.training_stats or {}
    preset = stats.get("preset")
    return {
        "uri": uri,
        "name": name,
        "version": None if version is None else str(version),
        "preset": preset if isinstance(preset, str) else None,
        "featurizer": type(teacher.featurizer).__name__,
        "weights_sha256": weights_sha256(teacher),
    }


def spearman(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray) -> float:
    """Spearman's rank correlation (average ranks for ties); NaN for fewer than 2 values or
    a constant input."""
    x, y = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if x.shape != y.shape or x.size < 2:
        return math.nan

    def ranks(v: np.ndarray) -> np.ndarray:
        order = np.argsort(v, kind="mergesort")
        r = np.empty(v.size, np.float64)
        r[order] = np.arange(v.size, dtype=np.float64)
        _, inv, counts = np.unique(v, return_inverse=True, return_counts=True)
        sums = np.bincount(inv, weights=r)
        return (sums / counts)[inv]

    rx, ry = ranks(x), ranks(y)
    sx, sy = rx.std(), ry.std()
    if sx == 0 or sy == 0:
        return math.nan
    return float(((rx - rx.mean()) * (ry - ry.mean())).mean() / (sx * sy))


@dataclass
class DistillReport:
    """What :func:`distill` did: images and copies seen, epochs, the held-out loss, the
    held-out Spearman of quality between student and teacher, and the time taken."""

    train_images: int
    val_images: int
    train_grids: int
    val_grids: int
    best_epoch: int
    best_val_loss: float
    val_quality_spearman: float
    threshold: float
    heatmap_clip: tuple[float, float]
    seconds: float
    epochs: list[dict[str, float]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "train_images": self.train_images,
            "val_images": self.val_images,
            "train_grids": self.train_grids,
            "val_grids": self.val_grids,
            "best_epoch": self.best_epoch,
            "best_val_loss": self.best_val_loss,
            "val_quality_spearman": self.val_quality_spearman,
            "threshold": self.threshold,
            "heatmap_clip": list(self.heatmap_clip),
            "seconds": self.seconds,
            "epochs": self.epochs,
        }


def _teacher_grids(
    teacher: Scorer, images: Sequence[np.ndarray], copies: int, rng: np.random.Generator
) -> list[tuple[np.ndarray, Tensor]]:
    """(image, teacher grid) for every image and ``copies`` synthetic-defect copies of it."""
    from .synthetic import add_defect

    out = []
    for img in images:
        variants = [np.asarray(img)]
        for _ in range(copies):
            variants.append(add_defect(np.asarray(img), rng)[0])
        grids = teacher.log_likelihood_grid(np.stack(variants)).float().cpu()
        out += list(zip(variants, grids, strict=True))
    return out


def _batches(
    pairs: Sequence[tuple[np.ndarray, Tensor]], batch: int, order: Sequence[int]
) -> list[list[int]]:
    """Indices in ``order`` grouped into batches of at most ``batch`` same-size images."""
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for i in order:
        by_shape.setdefault(pairs[i][0].shape, []).append(i)
    return [ids[k : k + batch] for ids in by_shape.values() for k in range(0, len(ids), batch)]


def _loss(
    student: DistilledFeaturizer,
    pairs: Sequence[tuple[np.ndarray, Tensor]],
    ids: Sequence[int],
    cfg: DistilledConfig,
) -> Tensor:
    dev = student.device
    x = to_tensor(np.stack([pairs[i][0] for i in ids]), dev)
    target = torch.stack([pairs[i][1] for i in ids]).to(dev)
    z_target = (target - student.target_mean) / student.target_std
    z_target = z_target.nan_to_num(nan=-cfg.target_floor, neginf=-cfg.target_floor).clamp(
        -cfg.target_floor, cfg.target_floor
    )
    z = student.head(student(x))[:, 0]
    loss = F.mse_loss(z, z_target) if cfg.loss == "mse" else F.smooth_l1_loss(z, z_target)
    if cfg.quality_weight > 0:
        q = torch.tensor([0.25, 0.5], device=dev)
        pq = torch.quantile(z.flatten(1), q, dim=1).mean(0)
        tq = torch.quantile(z_target.flatten(1), q, dim=1).mean(0)
        loss = loss + cfg.quality_weight * F.mse_loss(pq, tq)
    return loss


def distill(
    teacher: Scorer,
    train_images: Sequence[np.ndarray],
    val_images: Sequence[np.ndarray],
    cfg: DistilledConfig | None = None,
    *,
    teacher_info: dict[str, str | None] | None = None,
    threshold_quantile: float = 0.99,
    seed: int = 0,
    val_groups: Sequence[str | None] | None = None,
    calibrate_by: str = "",
    on_epoch: Callable[[dict[str, float]], None] | None = None,
) -> tuple[Scorer, DistillReport]:
    """Train a student of ``teacher`` on RGB uint8 training images; ``val_images`` are whole
    images held out (early stopping and the threshold; no labels anywhere). ``cfg`` defaults
    to the teacher's geometry with :class:`DistilledConfig`'s defaults. Returns the student
    as a scorer with the teacher's image statistic, calibrated on the held-out images, and
    the report. ``teacher_info``: :func:`teacher_record` (computed here when ``None``)."""
    from dataclasses import replace

    from .fit import calibrate
    from .scorer import ImageScore, Scorer

    if len(train_images) < 1 or len(val_images) < 1:
        raise ValueError("distillation needs at least one training and one held-out image")
    t0 = time.perf_counter()
    g = teacher.geometry
    cfg = replace(cfg or DistilledConfig(), window=g.window, stride=g.stride, scale=g.scale)
    teacher.eval()
    rng = np.random.default_rng(seed)
    train = _teacher_grids(teacher, train_images, cfg.synthetic_copies, rng)
    val = _teacher_grids(teacher, val_images, cfg.synthetic_copies, rng)
    student = DistilledFeaturizer(cfg, seed=seed).to(teacher.device)
    for img, grid in train[:1]:
        want = student.grid_shape(img.shape[0], img.shape[1])
        if tuple(grid.shape) != want:
            raise ValueError(
                f"the teacher's grid {tuple(grid.shape)} is not the window grid {want} of its "
                f"geometry; distillation needs a window-grid teacher (windows featurizer)"
            )
    normal = torch.cat([grid.reshape(-1) for grid in train_images_grids(train, cfg)])
    normal = normal[torch.isfinite(normal)]
    if normal.numel() < 2:
        raise ValueError("the teacher gave no finite log-likelihood on the training images")
    student.target_mean.fill_(float(normal.mean()))
    student.target_std.fill_(max(float(normal.std()), 1e-6))
    opt = torch.optim.Adam(student.parameters(), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs)
    gen = torch.Generator().manual_seed(seed)
    best, best_epoch, best_state, history = math.inf, 0, copy.deepcopy(student.state_dict()), []
    for epoch in range(1, cfg.epochs + 1):
        student.train()
        order = torch.randperm(len(train), generator=gen).tolist()
        total, n = 0.0, 0
        for ids in _batches(train, cfg.batch, order):
            loss = _loss(student, train, ids, cfg)
            opt.zero_grad()
            loss.backward()
            opt.step()
            total, n = total + float(loss.detach()) * len(ids), n + len(ids)
        sched.step()
        student.eval()
        with torch.no_grad():
            vt, vn = 0.0, 0
            for ids in _batches(val, cfg.batch, range(len(val))):
                vt += float(_loss(student, val, ids, cfg)) * len(ids)
                vn += len(ids)
        row = {"epoch": float(epoch), "train_loss": total / max(n, 1), "val_loss": vt / vn}
        history.append(row)
        if on_epoch is not None:
            on_epoch(row)
        if row["val_loss"] < best:
            best, best_epoch, best_state = (
                row["val_loss"],
                epoch,
                copy.deepcopy(student.state_dict()),
            )
        elif epoch - best_epoch >= cfg.patience:
            break
    student.load_state_dict(best_state)
    student.eval()
    student.teacher = dict(teacher_info) if teacher_info is not None else teacher_record(teacher)
    stat = teacher.image_score
    image_score = ImageScore(stat.statistic, stat.k, stat.defect_fraction, stat.two_sided)
    scorer = Scorer(student, None, image_score=image_score).eval()
    plain = [i for i in range(len(val)) if i % (cfg.synthetic_copies + 1) == 0]
    with torch.no_grad():
        sq = summaries_quality(scorer, [val[i][0] for i in plain])
    tq = [float(teacher.summarize(val[i][1][None])["quality"][0]) for i in plain]
    cal = calibrate(scorer, val_images, threshold_quantile, groups=val_groups, by=calibrate_by)
    cal.install(scorer)
    report = DistillReport(
        train_images=len(train_images),
        val_images=len(val_images),
        train_grids=len(train),
        val_grids=len(val),
        best_epoch=best_epoch,
        best_val_loss=best,
        val_quality_spearman=spearman(sq, tq),
        threshold=cal.threshold,
        heatmap_clip=cal.heatmap_clip,
        seconds=time.perf_counter() - t0,
        epochs=history,
    )
    scorer.training_stats = {"distill": report.as_dict()}
    return scorer, report


def train_images_grids(
    pairs: Sequence[tuple[np.ndarray, Tensor]], cfg: DistilledConfig
) -> list[Tensor]:
    """The grids of the unaltered images among ``pairs`` (every ``copies + 1``-th)."""
    return [grid for i, (_, grid) in enumerate(pairs) if i % (cfg.synthetic_copies + 1) == 0]


def summaries_quality(scorer: Scorer, images: Sequence[np.ndarray]) -> list[float]:
    """``quality`` of each image under ``scorer`` (one image at a time: sizes may differ)."""
    return [float(scorer.score(np.asarray(img)[None]).summary["quality"][0]) for img in images]
