"""Fitting a scorer on Ray: Ray Data reads and samples the archive, Ray Train fits the flow.

The two stages of the grain paper, distributed:

1. **Featurizer.** Ray Data tasks decode the training images and draw raw rows (windows) at
   random positions; the driver fits the featurizer (the PCA basis) on that sample.
2. **Flow.** A ``TorchTrainer`` runs :func:`train_loop` on ``workers`` workers (CPU with
   gloo, or one GPU each). Each epoch every worker streams its shard of freshly drawn feature
   rows (new random windows per image per epoch, decoded and projected by Ray Data tasks)
   and trains the DDP-wrapped flow; validation rows come from whole held-out images and are
   the same every epoch. The held-out NLL is all-reduced, so every worker takes the same
   early-stopping decision. Rank 0 reports a checkpoint every epoch (safetensors and JSON,
   no pickle); ``FailureConfig`` replaces a failed worker group and the loop resumes from the
   last checkpoint; a killed job resumes when run again under the same run name.

Everything mathematical is a ``flowcore`` call; this module moves data and state around.
"""

from __future__ import annotations

import copy
import json
import math
import os
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from flowcore.fit import (
    ScorerSpec,
    anomaly_rows,
    basis_sample,
    constant_dimensions_warning,
    feature_rows,
    fit_featurizer,
    image_generator,
    init_featurizer,
)
from flowcore.flows import Flow, build_flow
from flowcore.scorer import FeaturizerModule
from flowcore.training import (
    Batch,
    EpochTracker,
    held_out_objective,
    load_optimizer_tensors,
    nll_sums,
    optimizer_tensors,
    train_batches,
)

from .archive import ArchiveEntry, DecodeError, decode_image, read_bytes
from .log import Log
from .raycluster import WorkerPlan

__all__ = [
    "TrainFault",
    "RayFitResult",
    "fit_featurizer_on_ray",
    "train_flow_on_ray",
    "iter_images",
    "train_loop",
    "read_checkpoint_state",
]

_IMAGES_PER_TASK = 8


@dataclass(frozen=True)
class TrainFault:
    """Fault injection for tests: rank 0 raises at the start of ``epoch`` once (a marker
    file records that it happened, so the replacement worker does not raise again)."""

    epoch: int
    marker: str


@dataclass
class RayFitResult:
    flow: Flow
    best_epoch: int
    best_val_nll: float
    initial_val_nll: float
    history: list[dict[str, float]] = field(default_factory=list)
    stopped_early: bool = False
    checkpoint_path: str | None = None
    seconds: float = 0.0


# ------------------------------------------------------------------ data tasks


def _entry_rows(entries: Sequence[ArchiveEntry]) -> list[dict[str, str]]:
    return [{"image_uri": e.image_uri, "path": e.path} for e in entries]


def _decode_many(batch: dict[str, np.ndarray]) -> Iterator[tuple[str, np.ndarray]]:
    """(path, RGB uint8) of each decodable image of a batch; a bad file is skipped with a
    line on the worker's log (training tolerates them; the scoring job records them)."""
    for uri, path in zip(batch["image_uri"], batch["path"], strict=True):
        try:
            yield str(path), decode_image(read_bytes(str(uri))).rgb
        except DecodeError as e:
            print(f"flowscore train: skipped {uri}: {e.error_type}: {e.message}", flush=True)


def _basis_rows_task(
    batch: dict[str, np.ndarray],
    spec: ScorerSpec,
    per_image: int,
    backbone_state: dict[str, torch.Tensor] | None,
) -> dict[str, np.ndarray]:
    torch.set_num_threads(1)
    base = init_featurizer(spec, backbone_state=backbone_state)
    rows = [
        basis_sample(spec, [img], per_image, image_generator(spec.seed, "basis:" + p), base)
        for p, img in _decode_many(batch)
    ]
    if not rows:
        return {"x": np.zeros((0, 1), np.float32)}
    return {"x": torch.cat(rows).numpy().astype(np.float32, copy=False)}


def _feature_rows_task(
    batch: dict[str, np.ndarray],
    spec: ScorerSpec,
    featurizer: FeaturizerModule,
    per_image: int,
    fresh: bool,
) -> dict[str, np.ndarray]:
    """Feature rows of each image: ``fresh`` draws new random positions on every call (the
    training set, a new sample each epoch); otherwise positions are seeded by the image path
    (the validation set, identical every epoch and on every worker). With synthetic
    anomalies (``[fit] synthetic_anomalies``) each image adds the rows of its made-up
    defects (patches cut from the batch's other images), and column ``y`` labels them 1."""
    torch.set_num_threads(1)
    rows, labels = [], []
    decoded = list(_decode_many(batch))
    donors = [img for _, img in decoded]
    for p, img in decoded:
        if fresh:
            gen = torch.Generator()
            gen.seed()
        else:
            gen = image_generator(spec.seed, "val:" + p)
        normal = feature_rows(featurizer, spec, [img], per_image, gen).cpu()
        rows.append(normal)
        labels.append(torch.zeros(normal.shape[0]))
        if spec.fit.synthetic_anomalies:
            bad = anomaly_rows(featurizer, spec, [img], gen, donors=donors).cpu()
            rows.append(bad)
            labels.append(torch.ones(bad.shape[0]))
    x = torch.cat(rows).numpy() if rows else np.zeros((0, spec.features), np.float32)
    out = {"x": x.astype(np.float32, copy=False)}
    if spec.fit.synthetic_anomalies:
        y = torch.cat(labels).numpy() if labels else np.zeros(0, np.float32)
        out["y"] = y.astype(np.float32, copy=False)
    return out


def _dataset(entries: Sequence[ArchiveEntry]) -> Any:
    import ray.data

    n = len(entries)
    return ray.data.from_items(_entry_rows(entries), override_num_blocks=max(1, -(-n // 8)))


def fit_featurizer_on_ray(
    spec: ScorerSpec,
    train: Sequence[ArchiveEntry],
    log: Log,
    backbone_state: dict[str, torch.Tensor] | None = None,
) -> FeaturizerModule:
    """Stage 1: decode the training images in Ray Data tasks, draw ``basis_rows`` raw rows
    spread evenly over them, fit the featurizer in the driver. ``backbone_state``: the CNN
    backbone's weights (None: the random backbone seeded by ``spec.seed``)."""
    per_image = max(1, -(-spec.basis_rows // max(1, len(train))))
    ds = _dataset(train).map_batches(
        _basis_rows_task,
        fn_kwargs={
            "spec": spec,
            "per_image": per_image,
            "backbone_state": backbone_state,
        },
        batch_size=_IMAGES_PER_TASK,
        batch_format="numpy",
    )
    parts = [b["x"] for b in ds.iter_batches(batch_size=None, batch_format="numpy")]
    parts = [p for p in parts if p.shape[0]]
    rows = np.concatenate(parts) if parts else np.zeros((0, 1), np.float32)
    if rows.shape[0] < 2:
        raise ValueError("no training image could be decoded; nothing to fit")
    log(f"featurizer: fitting on {rows.shape[0]} rows from {len(train)} images")
    warning = constant_dimensions_warning(spec, torch.from_numpy(rows))
    if warning:
        log(f"warning: {warning}")
    feat = fit_featurizer(spec, torch.from_numpy(rows), backbone_state=backbone_state)
    return feat.eval()


def iter_images(entries: Sequence[ArchiveEntry]) -> Iterator[tuple[str, np.ndarray]]:
    """(path, RGB uint8) of the images, decoded by Ray Data tasks and streamed to the driver
    in order of completion. Undecodable files are skipped (logged by the task)."""

    def decode(batch: dict[str, np.ndarray]) -> dict[str, Any]:
        out = list(_decode_many(batch))
        return {"path": [p for p, _ in out], "rgb": [img for _, img in out]}

    ds = _dataset(entries).map_batches(decode, batch_size=4, batch_format="numpy")
    for row in ds.iter_rows():
        yield str(row["path"]), np.array(row["rgb"], dtype=np.uint8)


# ------------------------------------------------------------------ the training loop


def _allreduce(values: list[float]) -> list[float]:
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t.tolist()


def _save_checkpoint(
    directory: Path,
    flow: Flow,
    best_state: dict[str, torch.Tensor],
    opt: torch.optim.Optimizer,
    state: dict[str, Any],
) -> None:
    def host(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().contiguous().clone() for k, v in sd.items()}

    save_file(host(flow.state_dict()), str(directory / "flow.safetensors"))
    save_file(host(best_state), str(directory / "best.safetensors"))
    save_file(optimizer_tensors(opt), str(directory / "optimizer.safetensors"))
    (directory / "state.json").write_text(json.dumps(state, indent=1))


def read_checkpoint_state(directory: str | Path) -> dict[str, Any]:
    state: dict[str, Any] = json.loads((Path(directory) / "state.json").read_text())
    return state


def _rows(b: dict[str, torch.Tensor]) -> Batch:
    """A Ray Data batch as the training functions take it: x, or (x, y) when labelled."""
    return (b["x"], b["y"]) if "y" in b else b["x"]


def _nll_sums(flow: Flow, it: Any, device: torch.device, margin: float) -> list[float]:
    """This worker's (NLL sum, normal rows, hinge sum, anomaly rows) of its validation shard
    (:func:`flowcore.training.nll_sums`), to be all-reduced."""
    batches = it.iter_torch_batches(batch_size=4096, dtypes=torch.float32, device=device)
    return [float(v) for v in nll_sums(flow, (_rows(b) for b in batches), margin)]


def _progress(config: dict[str, Any], line: str) -> None:
    """Send a progress line to the driver (which prints it); a worker never blocks on it."""
    queue = config.get("progress")
    if queue is None:
        print(line, flush=True)
        return
    try:
        queue.put_nowait(line)
    except Exception:  # noqa: BLE001 - progress is best effort, training goes on
        pass


def train_loop(config: dict[str, Any]) -> None:
    """The per-worker loop run by ``TorchTrainer`` (every ``ray.train`` call is here)."""
    import ray.train
    import ray.train.torch as rtt

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(int(config["threads"]))
    spec: ScorerSpec = config["spec"]  # the frozen dataclass, as Ray shipped it
    cfg = spec.fit
    device = rtt.get_device()
    torch.manual_seed(spec.seed)
    flow = build_flow(spec.features, spec.flow)
    opt = torch.optim.Adam(flow.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    tracker = EpochTracker(flow, cfg)  # early stopping and the best weights, as in fit_flow
    history: list[dict[str, float]] = []  # the metrics reported (and logged to MLflow)
    initial_val: float | None = None
    start = 1
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            state = read_checkpoint_state(d)
            flow.load_state_dict(load_file(str(Path(d) / "flow.safetensors")))
            tracker.best_state = load_file(str(Path(d) / "best.safetensors"))
            load_optimizer_tensors(opt, load_file(str(Path(d) / "optimizer.safetensors")))
        tracker.stopper.load_state(state["stopper"])
        history = list(state["history"])
        initial_val = state["initial_val_nll"]
        start = int(state["epoch"]) + 1
        if rank == 0:
            _progress(config, f"resuming from the checkpoint of epoch {start - 1}")
    model = rtt.prepare_model(flow)
    train_it = ray.train.get_dataset_shard("train")
    val_it = ray.train.get_dataset_shard("val")
    if initial_val is None:
        initial_val = held_out_objective(
            _allreduce(_nll_sums(flow, val_it, device, cfg.synthetic_margin)),
            cfg.synthetic_weight,
        )
    per_batch = max(2, cfg.batch_size // world)
    fault = config.get("fault")
    stopped = bool(history) and tracker.should_stop
    epoch = start
    for epoch in range(start, cfg.max_epochs + 1):
        if stopped:
            break
        if fault and rank == 0 and epoch == fault["epoch"] and not os.path.exists(fault["marker"]):
            Path(fault["marker"]).write_text(f"raised at epoch {epoch}\n")
            raise RuntimeError(f"injected worker failure at epoch {epoch} (fault test)")
        t0 = time.perf_counter()
        batches = train_it.iter_torch_batches(
            batch_size=per_batch, dtypes=torch.float32, device=device
        )
        total, count = train_batches(model, opt, (_rows(b) for b in batches), cfg.clip_norm, cfg)
        t_sum, t_n = _allreduce([total, float(count)])
        val_nll = held_out_objective(
            _allreduce(_nll_sums(flow, val_it, device, cfg.synthetic_margin)),
            cfg.synthetic_weight,
        )
        train_nll = t_sum / max(1.0, t_n)
        seconds = time.perf_counter() - t0
        is_best = tracker.end_epoch(epoch, train_nll, val_nll, seconds, t_n).is_best
        stopper = tracker.stopper
        metrics = {
            "epoch": epoch,
            "train_nll": train_nll,
            "val_nll": val_nll,
            "windows_per_s": t_n / seconds,
            "seconds": seconds,
            "best_val_nll": stopper.best,
            "best_epoch": stopper.best_epoch,
            "timestamp_ms": int(time.time() * 1000),
        }
        history.append(metrics)
        stopped = tracker.should_stop
        if rank == 0:
            mean_s = sum(h["seconds"] for h in history) / len(history)
            left = 0 if stopped else (cfg.max_epochs - epoch) * mean_s
            _progress(
                config,
                f"epoch {epoch:3d}/{cfg.max_epochs}  train NLL {train_nll:9.3f}  "
                f"val NLL {val_nll:9.3f}{' *' if is_best else '  '}  "
                f"{t_n / seconds:8.0f} windows/s  {seconds:5.1f} s  "
                f"≤ {left:4.0f} s left{'  (early stop)' if stopped else ''}",
            )
            state = {
                "epoch": epoch,
                "stopper": stopper.state(),
                "history": history,
                "initial_val_nll": initial_val,
                "stopped_early": stopped,
            }
            with tempfile.TemporaryDirectory() as tmp:
                _save_checkpoint(Path(tmp), flow, tracker.best_state, opt, state)
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
        else:
            ray.train.report(metrics)


def _drain_now(queue: Any, log: Log) -> None:
    while True:
        try:
            items = queue.get_nowait_batch(queue.qsize())
        except Exception:  # noqa: BLE001 - the queue actor may be gone
            return
        if not items:
            return
        for line in items:
            log(f"flow: {line}")


def _drain(queue: Any, log: Log, stop: threading.Event) -> None:
    while not stop.wait(0.5):
        _drain_now(queue, log)


def train_flow_on_ray(
    spec: ScorerSpec,
    featurizer: torch.nn.Module,
    train: Sequence[ArchiveEntry],
    val: Sequence[ArchiveEntry],
    *,
    plan: WorkerPlan,
    storage_path: str,
    run_name: str,
    max_failures: int = 2,
    fault: TrainFault | None = None,
    log: Log,
) -> RayFitResult:
    """Stage 2: fit the flow with ``TorchTrainer``. Reusing ``run_name`` under the same
    ``storage_path`` resumes from that run's last checkpoint (Ray Train v2 restores it).
    ``storage_path`` is a folder every node reaches, or ``s3://bucket/prefix``
    (:func:`pipelines.storage.ray_train_storage`)."""
    import ray
    from ray.train import (
        CheckpointConfig,
        FailureConfig,
        LoggingConfig,
        RunConfig,
        ScalingConfig,
    )
    from ray.train.torch import TorchTrainer
    from ray.util.queue import Queue

    from .storage import ray_train_storage

    ray_path, ray_fs = ray_train_storage(storage_path)
    t0 = time.perf_counter()
    feat_cpu = copy.deepcopy(featurizer).cpu().eval()
    common = {"batch_size": _IMAGES_PER_TASK, "batch_format": "numpy"}
    train_ds = _dataset(train).map_batches(
        _feature_rows_task,
        fn_kwargs={
            "spec": spec,
            "featurizer": feat_cpu,
            "per_image": spec.windows_per_image,
            "fresh": True,
        },
        **common,
    )
    val_ds = (
        _dataset(val)
        .map_batches(
            _feature_rows_task,
            fn_kwargs={
                "spec": spec,
                "featurizer": feat_cpu,
                "per_image": spec.windows_per_image,
                "fresh": False,
            },
            **common,
        )
        .materialize()
    )
    resources: dict[str, float] = {"CPU": plan.cpus_per_worker}
    if plan.use_gpu:
        resources["GPU"] = 1.0
    queue = Queue(maxsize=1000, actor_options={"num_cpus": 0})
    config: dict[str, Any] = {
        "spec": spec,
        "threads": plan.threads_per_worker,
        "progress": queue,
    }
    if fault is not None:
        config["fault"] = {"epoch": fault.epoch, "marker": fault.marker}
    trainer = TorchTrainer(
        train_loop,
        train_loop_config=config,
        # CPU workers spread over the nodes (their cores and memory bandwidth are the
        # limit; on one node this changes nothing); GPU workers pack as Ray Train does
        scaling_config=ScalingConfig(
            num_workers=plan.workers,
            use_gpu=plan.use_gpu,
            resources_per_worker=resources,
            placement_strategy="PACK" if plan.use_gpu else "SPREAD",
        ),
        run_config=RunConfig(
            name=run_name,
            storage_path=ray_path,
            storage_filesystem=ray_fs,
            failure_config=FailureConfig(max_failures=max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            logging_config=LoggingConfig(log_level="WARNING"),  # type: ignore[call-arg]
        ),
        datasets={"train": train_ds, "val": val_ds},
    )
    log(f"flow: training on {plan.describe()}, run {run_name}")
    stop = threading.Event()
    printer = threading.Thread(target=_drain, args=(queue, log, stop), daemon=True)
    printer.start()
    try:
        result = trainer.fit()
    finally:
        stop.set()
        printer.join(timeout=5)
        _drain_now(queue, log)
        ray.kill(cast(Any, queue.actor))
    if result.checkpoint is None:
        raise RuntimeError(f"training run {run_name} ended without a checkpoint")
    with result.checkpoint.as_directory() as d:
        state = read_checkpoint_state(d)
        best = load_file(str(Path(d) / "best.safetensors"))
    torch.manual_seed(spec.seed)
    flow = build_flow(spec.features, spec.flow)
    flow.load_state_dict(best)
    stopper = state["stopper"]
    return RayFitResult(
        flow=flow.eval(),
        best_epoch=int(stopper["best_epoch"]),
        best_val_nll=float(stopper["best"]),
        initial_val_nll=float(state["initial_val_nll"]),
        history=list(state["history"]),
        stopped_early=bool(state["stopped_early"]),
        checkpoint_path=result.checkpoint.path,
        seconds=time.perf_counter() - t0,
    )


def finite_or_none(x: float) -> float | None:
    return x if math.isfinite(x) else None
