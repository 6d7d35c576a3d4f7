"""Scoring an archive on Ray Data into the Iceberg tables.

    listing (driver) ──from_items (segments of up to 50 000 images)
        ──map_batches(decode_task)  CPU tasks: read bytes, decode to RGB, captured_at
        ──map_batches(ScorerActor)  actor pool: the bundle loaded once per actor, one
                                    flowcore call per batch of same-size images
        ──iter_batches──▶ driver: every commit_every rows (no pixels, a heatmap each)
              scoring_errors: the chunk's error rows in, the rows of every key it
                              settled out (this model version) ─pyiceberg─▶ one commit
              image_scores rows  ─write_iceberg(UPSERT on the key)─▶ one commit

A bad file never fails a block: reading and decoding errors become rows (stage, type,
message) that travel beside the images and land in ``scoring_errors``. The stream keeps
flowing while the driver commits. Each chunk is committed atomically, so a crash loses at
most one chunk of work and a rerun (UPSERT on ``image_uri, etag, model_version``) never
doubles a row. The errors commit comes first, so a key is never in both tables: a crash
between the two leaves the chunk's scored keys in neither, and the next run scores them.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from . import settings as settings_mod
from .archive import (
    ArchiveEntry,
    DecodeError,
    StorageUnavailable,
    captured_at,
    decode_image,
    read_bytes,
)
from .errors import find_in_chain
from .lock import LockLost
from .storage import retry_transient

__all__ = [
    "ScoreConfig",
    "ChunkResult",
    "decode_task",
    "ScorerActor",
    "score_stream",
    "path_column_name",
]

ERROR_COLUMNS = ("stage", "error_type", "message")
_KEY_SCORES = ["image_uri", "etag", "model_version"]
# one error row per file version: a rerun that fails the same file again replaces it


#: files above this size are not read (an error row instead): a 1 GiB file read whole took
#: 1.1 GB of a decode task's memory
DEFAULT_MAX_FILE_BYTES = int(settings_mod.DEFAULT_MAX_FILE_MB * 2**20)
MAX_FILE_ENV = settings_mod.MAX_FILE_ENV
TOO_LARGE = "FileTooLarge"


def max_file_bytes(settings: settings_mod.Settings | None = None) -> int:
    """The largest file a scoring run reads: ``FLOWSCORE_MAX_FILE_MB`` (default 256)."""
    return (settings or settings_mod.current()).max_file_bytes


def path_column_name(key: str) -> str:
    return key


@dataclass(frozen=True)
class ScoreConfig:
    """What every actor needs to know (sent once per chunk)."""

    bundle_path: str
    model_name: str
    model_version: str
    run_id: str
    heatmaps: bool = True
    threads: int = 1
    device: str = "cpu"
    batch_size: int = 8
    max_pixels: int = 100_000_000
    max_bytes: int = DEFAULT_MAX_FILE_BYTES  # larger files are not read (FLOWSCORE_MAX_FILE_MB)
    precision: str = "fp32"  # the featurizer's arithmetic (Scorer.set_precision)
    transforms: int | None = None  # test-time transforms (None: the model's own)
    heatmap: str = "likelihood"  # what the heatmap column holds (flowcore.gradient.HEATMAP_KINDS)
    pid_dir: str | None = None  # test hook: each actor leaves a file named by its pid


@dataclass
class ChunkResult:
    scored: int
    failed: int
    seconds: float  # since the previous commit ended
    commit_seconds: float  # of which writing and committing


def _entry_rows(entries: Sequence[ArchiveEntry], path_columns: Sequence[str]) -> list[dict]:
    rows = []
    for e in entries:
        row: dict[str, Any] = {
            "image_uri": e.image_uri,
            "etag": e.etag,
            "path": e.path,
            "mtime": e.mtime.isoformat() if e.mtime else None,
            "size": e.size,
        }
        for k in path_columns:
            row[k] = e.columns.get(k)
        rows.append(row)
    return rows


def decode_task(
    batch: pa.Table, max_pixels: int = 100_000_000, max_bytes: int = DEFAULT_MAX_FILE_BYTES
) -> pa.Table:
    """Read and decode each image of a batch (CPU task). Adds ``rgb`` (raw H·W·3 bytes),
    ``width``, ``height``, ``captured_at`` and, for a file that cannot be read or decoded,
    ``stage``/``error_type``/``message`` (then ``rgb`` is null). Never raises for a bad file;
    raises :class:`StorageUnavailable` when S3 stays down past the retry budget (an outage is
    not a bad file: the task fails, its chunk is not committed, the run ends). A file whose
    listed ``size`` is above ``max_bytes`` is not read at all: an error row
    (``FileTooLarge``, not retried)."""
    n = batch.num_rows
    uris = batch.column("image_uri").to_pylist()
    paths = batch.column("path").to_pylist()
    mtimes = batch.column("mtime").to_pylist()
    sizes = batch.column("size").to_pylist() if "size" in batch.column_names else [None] * n
    rgb: list[bytes | None] = [None] * n
    width: list[int | None] = [None] * n
    height: list[int | None] = [None] * n
    when: list[datetime | None] = [None] * n
    stage: list[str | None] = [None] * n
    etype: list[str | None] = [None] * n
    msg: list[str | None] = [None] * n
    for i in range(n):
        mtime = datetime.fromisoformat(mtimes[i]) if mtimes[i] else None
        size = sizes[i]
        if size is not None and size > max_bytes:
            stage[i], etype[i] = "read", TOO_LARGE
            msg[i] = (
                f"{uris[i]}: {size / 2**20:.1f} MB is above the limit of "
                f"{max_bytes / 2**20:g} MB ({MAX_FILE_ENV}); not read"
            )
            when[i] = captured_at(None, paths[i], mtime)
            continue
        try:
            img = decode_image(read_bytes(uris[i]), max_pixels=max_pixels)
        except DecodeError as e:
            stage[i], etype[i], msg[i] = e.stage, e.error_type, e.message
            when[i] = captured_at(None, paths[i], mtime)
            continue
        except StorageUnavailable:
            raise
        except Exception as e:  # noqa: BLE001 - anything else about one file: one error row
            stage[i], etype[i], msg[i] = "read", type(e).__name__, f"{uris[i]}: {e}"[:500]
            continue
        rgb[i] = img.rgb.tobytes()
        width[i], height[i] = img.width, img.height
        when[i] = captured_at(img, paths[i], mtime)
    out = batch.drop_columns([c for c in ("mtime", "size") if c in batch.column_names])
    for name, values, typ in (
        ("rgb", rgb, pa.large_binary()),
        ("width", width, pa.int32()),
        ("height", height, pa.int32()),
        ("captured_at", when, pa.timestamp("us")),
        ("stage", stage, pa.string()),
        ("error_type", etype, pa.string()),
        ("message", msg, pa.string()),
    ):
        out = out.append_column(name, pa.array(values, type=typ))
    return out


class ScorerActor:
    """Loads the bundle once; each call scores a batch of decoded images with one flowcore
    call per group of same-size images. Rows that arrive with an error pass through; an
    image that fails to score becomes an error row (stage ``score``)."""

    def __init__(self, cfg: ScoreConfig) -> None:
        import torch

        from flowcore.bundle import load_bundle

        torch.set_num_threads(max(1, cfg.threads))
        self.cfg = cfg
        self.scorer = load_bundle(cfg.bundle_path, device=cfg.device)
        self.scorer.set_precision(cfg.precision)
        if cfg.transforms is not None:
            self.scorer.transforms = cfg.transforms
        self.geometry = self.scorer.geometry
        if cfg.pid_dir:
            import os

            Path(cfg.pid_dir, str(os.getpid())).write_text("scorer actor\n")

    def __call__(self, batch: pa.Table) -> pa.Table:
        from flowcore.gradient import heatmap_grid
        from flowcore.scorer import SUMMARY_COLUMNS

        cfg = self.cfg
        n = batch.num_rows
        blobs = batch.column("rgb").to_pylist()
        widths = batch.column("width").to_pylist()
        heights = batch.column("height").to_pylist()
        stage = batch.column("stage").to_pylist()
        etype = batch.column("error_type").to_pylist()
        msg = batch.column("message").to_pylist()
        summary = {c: np.full(n, np.nan, np.float32) for c in SUMMARY_COLUMNS}
        flag = np.zeros(n, bool)
        source: list[str | None] = [None] * n
        cal = self.scorer.calibration
        cal_values = (  # each image's value of the calibration column (per-camera thresholds)
            batch.column(cal.by).to_pylist()
            if cal is not None and cal.by in batch.column_names
            else [None] * n
        )
        grid_h = np.zeros(n, np.int32)
        grid_w = np.zeros(n, np.int32)
        heat: list[np.ndarray | None] = [None] * n
        groups: dict[tuple[int, int], list[int]] = {}
        for i in range(n):
            if stage[i] is None:
                groups.setdefault((heights[i], widths[i]), []).append(i)
        for (h, w), idx in groups.items():
            for start in range(0, len(idx), cfg.batch_size):
                part = idx[start : start + cfg.batch_size]
                imgs = np.stack([np.frombuffer(blobs[i], np.uint8).reshape(h, w, 3) for i in part])
                try:
                    sb = self.scorer.score(imgs, [cal_values[i] for i in part])
                    maps = (
                        heatmap_grid(self.scorer, imgs, cfg.heatmap, sb.grid)
                        if cfg.heatmaps
                        else sb.grid
                    )
                except Exception as e:  # noqa: BLE001 - one bad image must not fail the block
                    for i in part:
                        stage[i], etype[i], msg[i] = "score", type(e).__name__, str(e)[:500]
                    continue
                for c in SUMMARY_COLUMNS:
                    summary[c][part] = sb.summary[c]
                flag[part] = sb.is_anomaly
                for i, src in zip(part, sb.threshold_source or [], strict=True):
                    source[i] = src
                grid_h[part], grid_w[part] = sb.grid.shape[1], sb.grid.shape[2]
                if cfg.heatmaps:
                    for k, i in enumerate(part):
                        heat[i] = maps[k].reshape(-1)
        geo = self.geometry
        scored = [s is None for s in stage]
        now = datetime.now(UTC).replace(tzinfo=None)
        out = batch.drop_columns(["rgb", "stage", "error_type", "message"])

        def const(value: Any, typ: pa.DataType) -> pa.Array:
            return pa.array([value if ok else None for ok in scored], type=typ)

        missing = np.array([not ok for ok in scored])
        cols: list[tuple[str, pa.Array]] = [
            ("model_name", pa.array([cfg.model_name] * n, pa.string())),
            ("model_version", pa.array([cfg.model_version] * n, pa.string())),
            ("run_id", pa.array([cfg.run_id] * n, pa.string())),
            ("scored_at", pa.array([now] * n, pa.timestamp("us"))),
            ("grid_h", pa.array(grid_h, pa.int32(), mask=missing)),
            ("grid_w", pa.array(grid_w, pa.int32(), mask=missing)),
            ("window", const(geo.window, pa.int32())),
            ("stride", const(geo.stride, pa.int32())),
            ("scale", const(geo.scale, pa.float32())),
            # NULL, not NaN, where a value is missing or not finite (NaN poisons avg())
            *(
                (c, pa.array(v, pa.float32(), mask=missing | ~np.isfinite(v)))
                for c, v in summary.items()
            ),
            ("is_anomaly", pa.array(flag, pa.bool_(), mask=missing)),
            ("heatmap", _heatmap_array(heat)),
            ("threshold_source", pa.array(source, pa.string())),
            ("heatmap_kind", const(cfg.heatmap if cfg.heatmaps else None, pa.string())),
            ("stage", pa.array(stage, pa.string())),
            ("error_type", pa.array(etype, pa.string())),
            ("message", pa.array(msg, pa.string())),
        ]
        for name, arr in cols:
            out = out.append_column(name, arr)
        return out


def _heatmap_array(heat: Sequence[np.ndarray | None]) -> pa.Array:
    """list<float32> from per-image float32 arrays (None: null), built from one buffer."""
    sizes = np.array([0 if h is None else h.size for h in heat], np.int32)
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int32)
    present = [h for h in heat if h is not None]
    values = np.concatenate(present).astype(np.float32) if present else np.zeros(0, np.float32)
    mask = pa.array([h is None for h in heat], pa.bool_())
    return pa.ListArray.from_arrays(
        pa.array(offsets), pa.array(values, pa.float32()), type=pa.list_(pa.float32()), mask=mask
    )


def _select(batch: pa.Table, schema: pa.Schema, errors: bool, run_id: str) -> pa.Table:
    """The rows of one table (scores or errors), in that table's exact schema."""
    import pyarrow.compute as pc

    failed = pc.is_valid(batch.column("stage"))
    rows = batch.filter(failed if errors else pc.invert(failed))
    cols = []
    now = datetime.now(UTC).replace(tzinfo=None)
    for f in schema:
        if f.name in rows.column_names:
            cols.append(rows.column(f.name).cast(f.type))
        elif f.name == "at":
            cols.append(pa.array([now] * rows.num_rows, f.type))
        elif f.name == "run_id":
            cols.append(pa.array([run_id] * rows.num_rows, f.type))
        elif f.name == "retryable":  # the bytes could not be fetched: try again next run
            read = pc.equal(rows.column("stage"), "read")
            too_large = pc.equal(rows.column("error_type"), TOO_LARGE)
            cols.append(pc.and_(read, pc.invert(too_large)).cast(f.type))
        else:
            cols.append(pa.nulls(rows.num_rows, f.type))
    return pa.Table.from_arrays(cols, schema=schema)


#: images per Ray Dataset: the listing is fed to Ray in segments of this many (rounded up to
#: whole commits), so the object store never holds the rows of a whole archive's listing;
#: each segment starts its actor pool once
SEGMENT_IMAGES = 50_000
#: bytes each decode task may hold (a batch of decoded images and the decoder's buffers)
DECODE_TASK_MEMORY = 256 * 2**20
#: object-store bytes the stream may hold per scorer actor (decoded images waiting to be
#: scored, scored rows waiting for the driver); without a cap the decode tasks run ahead of
#: the actors and the store grows with the archive (measured: 170 MB for 200 images of
#: 460×640, 528 MB for 800; capped at 256 MB: 116 and 136 MB, same images/s).
#: ``FLOWSCORE_STREAM_BUFFER_MB`` overrides it (per actor).
STREAM_BUFFER_PER_ACTOR = int(settings_mod.DEFAULT_STREAM_BUFFER_MB * 2**20)
#: images per data file written to image_scores
FILE_IMAGES = 2000
#: seconds between progress callbacks while a commit fills up
PROGRESS_EVERY_S = 30.0


def stream_buffer_per_actor(settings: settings_mod.Settings | None = None) -> int:
    """Bytes of Ray's object store per scorer actor (``FLOWSCORE_STREAM_BUFFER_MB``)."""
    return (settings or settings_mod.current()).stream_buffer_bytes


def score_stream(
    entries: Sequence[ArchiveEntry],
    path_columns: Sequence[str],
    cfg: ScoreConfig,
    *,
    actors: int,
    cpus_per_actor: float,
    gpus_per_actor: float,
    commit_every: int,
    scores_schema: pa.Schema,
    errors_schema: pa.Schema,
    catalog_kwargs: dict[str, Any],
    stream_buffer_bytes: int | None = None,
    on_commit: Callable[[ChunkResult], None] = lambda r: None,
    on_progress: Callable[[int], None] = lambda done: None,
    before_commit: Callable[[], None] = lambda: None,
) -> None:
    """Score ``entries`` as one stream and commit every ``commit_every`` images: one commit of
    ``scoring_errors`` and one UPSERT into ``image_scores`` (each an atomic Iceberg commit).
    ``before_commit`` runs right before each commit and stops the run by raising (the nightly
    job's lock fencing: a run that lost its lock commits nothing more).
    ``stream_buffer_bytes``: Ray's object store per actor (None:
    :func:`stream_buffer_per_actor` of the environment).

    The stream (decode tasks -> scorer actors) keeps running while the driver commits the
    previous chunk, and the actors load the bundle once per segment, not once per commit.
    Only scored rows (no pixels) come back to the driver."""
    import ray.data
    from pyiceberg.catalog import load_catalog
    from ray.data import ActorPoolStrategy

    # keep the listing's order (sorted by path, so by year=/camera= folders) into the data
    # files: each file then spans few path-column values and a query on one year skips the
    # others by their Parquet statistics
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True
    ctx.execution_options.resource_limits = ctx.execution_options.resource_limits.copy(
        object_store_memory=actors * (stream_buffer_bytes or stream_buffer_per_actor())
    )
    remote: dict[str, Any] = {"num_cpus": cpus_per_actor}
    if gpus_per_actor:
        remote["num_gpus"] = gpus_per_actor
    segment = max(1, SEGMENT_IMAGES // commit_every) * commit_every
    kw = dict(catalog_kwargs)
    catalog = load_catalog(kw.pop("name"), **kw)  # this process's commits of scoring_errors
    pending: list[pa.Table] = []
    held = done = 0
    t_chunk = time.perf_counter()
    t_progress = t_chunk

    def commit(rows: pa.Table) -> None:
        nonlocal t_chunk
        before_commit()
        t_commit = time.perf_counter()
        try:
            scored, failed = _commit(
                rows, cfg, scores_schema, errors_schema, catalog, catalog_kwargs
            )
        except Exception as e:
            lost = find_in_chain(e, LockLost)  # the commit's own fence (JobLock.fencing)
            if lost is not None and lost is not e:
                raise lost from None
            raise
        now = time.perf_counter()
        on_commit(ChunkResult(scored, failed, now - t_chunk, now - t_commit))
        t_chunk = now

    for s0 in range(0, len(entries), segment):
        part = entries[s0 : s0 + segment]
        ds: Any = ray.data.from_items(
            _entry_rows(part, path_columns),
            override_num_blocks=max(1, -(-len(part) // cfg.batch_size)),
        )
        # decode in separate CPU tasks, overlapped with scoring. Declaring the decode tasks'
        # memory also keeps Ray from fusing them into the scorer actors (it fuses a task map
        # into an actor map whose resources are the same): fused, each actor decoded and
        # scored in turn, 11 images/s against 17+ for grain-full on 2 cores
        ds = ds.map_batches(
            decode_task,
            fn_kwargs={"max_pixels": cfg.max_pixels, "max_bytes": cfg.max_bytes},
            batch_size=cfg.batch_size,
            batch_format="pyarrow",
            num_cpus=1,
            memory=DECODE_TASK_MEMORY,
        )
        ds = ds.map_batches(
            ScorerActor,
            fn_constructor_kwargs={"cfg": cfg},
            compute=ActorPoolStrategy(size=actors),
            batch_size=cfg.batch_size,
            batch_format="pyarrow",
            **remote,
        )
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            assert isinstance(batch, pa.Table)
            pending.append(batch)
            held += batch.num_rows
            done += batch.num_rows
            while held >= commit_every:
                rows = pa.concat_tables(pending)
                commit(rows.slice(0, commit_every))
                rest = rows.slice(commit_every)
                pending, held = ([rest] if rest.num_rows else []), rest.num_rows
            now = time.perf_counter()
            if now - t_progress >= PROGRESS_EVERY_S:
                t_progress = now
                on_progress(done)
    if held:
        commit(pa.concat_tables(pending))


def _commit(
    rows: pa.Table,
    cfg: ScoreConfig,
    scores_schema: pa.Schema,
    errors_schema: pa.Schema,
    catalog: Any,
    catalog_kwargs: dict[str, Any],
) -> tuple[int, int]:
    """The chunk's ``scoring_errors`` commit (its new error rows; the error rows of every key
    it settled removed), then one UPSERT of its scored rows; (scored, failed)."""
    from .tables import settle_errors

    scores = _select(rows, scores_schema, errors=False, run_id=cfg.run_id)
    errors = _select(rows, errors_schema, errors=True, run_id=cfg.run_id)
    settled = list(
        zip(rows.column("image_uri").to_pylist(), rows.column("etag").to_pylist(), strict=True)
    )
    # idempotent (it deletes the rows of every settled key, new ones included, before it
    # appends), so a commit retried through an S3 outage never doubles a row
    retry_transient(
        lambda: settle_errors(catalog, cfg.model_version, settled, errors),
        "commit scoring_errors to",
        str(catalog_kwargs.get("warehouse", "")),
    )
    upsert_scores(scores, catalog_kwargs)
    return scores.num_rows, errors.num_rows


def upsert_scores(scores: pa.Table, catalog_kwargs: dict[str, Any]) -> None:
    """One atomic UPSERT of ``image_scores`` rows on their key, through Ray Data's
    ``write_iceberg`` (files of at most ``FILE_IMAGES`` rows)."""
    import ray.data
    from ray.data import SaveMode

    if not scores.num_rows:
        return
    files = [scores.slice(k, FILE_IMAGES) for k in range(0, scores.num_rows, FILE_IMAGES)]
    ray.data.from_arrow(files).write_iceberg(
        "flowscore.image_scores",
        catalog_kwargs=catalog_kwargs,
        mode=SaveMode.UPSERT,
        upsert_kwargs={"join_cols": _KEY_SCORES},
    )
