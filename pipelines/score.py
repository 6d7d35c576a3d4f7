"""Scoring an archive on Ray Data into the Iceberg tables.

    listing (driver) ──chunks of commit_every images──▶ from_items
        ──map_batches(decode_task)  CPU tasks: read bytes, decode to RGB, captured_at
        ──map_batches(ScorerActor)  actor pool: the bundle loaded once per actor, one
                                    flowcore call per batch of same-size images
        ──materialize──▶ image_scores rows  ─write_iceberg(UPSERT on the key)─▶ one commit
                         scoring_errors rows ─write_iceberg(UPSERT)────────────▶ one commit

A bad file never fails a block: reading and decoding errors become rows (stage, type,
message) that travel beside the images and land in ``scoring_errors``. Each chunk is
committed atomically, so a crash loses at most one chunk of work and a rerun (UPSERT on
``image_uri, etag, model_version``) never doubles a row.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from .archive import ArchiveEntry, DecodeError, captured_at, decode_image, read_bytes

__all__ = [
    "ScoreConfig",
    "ChunkResult",
    "decode_task",
    "ScorerActor",
    "score_chunk",
    "path_column_name",
]

Log = Callable[[str], None]
ERROR_COLUMNS = ("stage", "error_type", "message")
_KEY_SCORES = ["image_uri", "etag", "model_version"]
# one error row per file version: a rerun that fails the same file again replaces it
_KEY_ERRORS = ["image_uri", "etag"]


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
    pid_dir: str | None = None  # test hook: each actor leaves a file named by its pid


@dataclass
class ChunkResult:
    scored: int
    failed: int
    seconds: float


def _entry_rows(entries: Sequence[ArchiveEntry], path_columns: Sequence[str]) -> list[dict]:
    rows = []
    for e in entries:
        row: dict[str, Any] = {
            "image_uri": e.image_uri,
            "etag": e.etag,
            "path": e.path,
            "mtime": e.mtime.isoformat() if e.mtime else None,
        }
        for k in path_columns:
            row[k] = e.columns.get(k)
        rows.append(row)
    return rows


def decode_task(batch: pa.Table, max_pixels: int = 100_000_000) -> pa.Table:
    """Read and decode each image of a batch (CPU task). Adds ``rgb`` (raw H·W·3 bytes),
    ``width``, ``height``, ``captured_at`` and, for a file that cannot be read or decoded,
    ``stage``/``error_type``/``message`` (then ``rgb`` is null). Never raises for a bad file."""
    n = batch.num_rows
    uris = batch.column("image_uri").to_pylist()
    paths = batch.column("path").to_pylist()
    mtimes = batch.column("mtime").to_pylist()
    rgb: list[bytes | None] = [None] * n
    width: list[int | None] = [None] * n
    height: list[int | None] = [None] * n
    when: list[datetime | None] = [None] * n
    stage: list[str | None] = [None] * n
    etype: list[str | None] = [None] * n
    msg: list[str | None] = [None] * n
    for i in range(n):
        mtime = datetime.fromisoformat(mtimes[i]) if mtimes[i] else None
        try:
            img = decode_image(read_bytes(uris[i]), max_pixels=max_pixels)
        except DecodeError as e:
            stage[i], etype[i], msg[i] = e.stage, e.error_type, e.message
            when[i] = captured_at(None, paths[i], mtime)
            continue
        except Exception as e:  # noqa: BLE001 - network and the like: one error row each
            stage[i], etype[i], msg[i] = "read", type(e).__name__, f"{uris[i]}: {e}"[:500]
            continue
        rgb[i] = img.rgb.tobytes()
        width[i], height[i] = img.width, img.height
        when[i] = captured_at(img, paths[i], mtime)
    out = batch.drop_columns(["mtime"])
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
        self.geometry = self.scorer.geometry
        if cfg.pid_dir:
            import os

            Path(cfg.pid_dir, str(os.getpid())).write_text("scorer actor\n")

    def __call__(self, batch: pa.Table) -> pa.Table:
        from flowcore.scorer import SUMMARY_COLUMNS

        cfg = self.cfg
        n = batch.num_rows
        blobs = batch.column("rgb").to_pylist()
        widths = batch.column("width").to_pylist()
        heights = batch.column("height").to_pylist()
        stage = batch.column("stage").to_pylist()
        etype = batch.column("error_type").to_pylist()
        msg = batch.column("message").to_pylist()
        summary: dict[str, list[float | None]] = {c: [None] * n for c in SUMMARY_COLUMNS}
        flag: list[bool | None] = [None] * n
        heat: list[list[float] | None] = [None] * n
        grid_h: list[int | None] = [None] * n
        grid_w: list[int | None] = [None] * n
        groups: dict[tuple[int, int], list[int]] = {}
        for i in range(n):
            if stage[i] is None:
                groups.setdefault((heights[i], widths[i]), []).append(i)
        for (h, w), idx in groups.items():
            for start in range(0, len(idx), cfg.batch_size):
                part = idx[start : start + cfg.batch_size]
                imgs = np.stack([np.frombuffer(blobs[i], np.uint8).reshape(h, w, 3) for i in part])
                try:
                    sb = self.scorer.score(imgs)
                except Exception as e:  # noqa: BLE001 - one bad image must not fail the block
                    for i in part:
                        stage[i], etype[i], msg[i] = "score", type(e).__name__, str(e)[:500]
                    continue
                for k, i in enumerate(part):
                    for c in SUMMARY_COLUMNS:
                        v = float(sb.summary[c][k])
                        summary[c][i] = v if math.isfinite(v) else None
                    flag[i] = bool(sb.is_anomaly[k])
                    grid_h[i], grid_w[i] = int(sb.grid.shape[1]), int(sb.grid.shape[2])
                    if cfg.heatmaps:
                        heat[i] = sb.grid[k].reshape(-1).tolist()
        geo = self.geometry
        scored = [s is None for s in stage]
        now = datetime.now(UTC).replace(tzinfo=None)
        out = batch.drop_columns(["rgb", "stage", "error_type", "message"])

        def const(value: Any, typ: pa.DataType) -> pa.Array:
            return pa.array([value if ok else None for ok in scored], type=typ)

        cols: list[tuple[str, pa.Array]] = [
            ("model_name", pa.array([cfg.model_name] * n, pa.string())),
            ("model_version", pa.array([cfg.model_version] * n, pa.string())),
            ("run_id", pa.array([cfg.run_id] * n, pa.string())),
            ("scored_at", pa.array([now] * n, pa.timestamp("us"))),
            ("grid_h", pa.array(grid_h, pa.int32())),
            ("grid_w", pa.array(grid_w, pa.int32())),
            ("window", const(geo.window, pa.int32())),
            ("stride", const(geo.stride, pa.int32())),
            ("scale", const(geo.scale, pa.float32())),
            *((c, pa.array(summary[c], pa.float32())) for c in SUMMARY_COLUMNS),
            ("is_anomaly", pa.array(flag, pa.bool_())),
            ("heatmap", pa.array(heat, pa.list_(pa.float32()))),
            ("stage", pa.array(stage, pa.string())),
            ("error_type", pa.array(etype, pa.string())),
            ("message", pa.array(msg, pa.string())),
        ]
        for name, arr in cols:
            out = out.append_column(name, arr)
        return out


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
        else:
            cols.append(pa.nulls(rows.num_rows, f.type))
    return pa.Table.from_arrays(cols, schema=schema)


def score_chunk(
    entries: Sequence[ArchiveEntry],
    path_columns: Sequence[str],
    cfg: ScoreConfig,
    *,
    actors: int,
    cpus_per_actor: float,
    gpus_per_actor: float,
    scores_schema: pa.Schema,
    errors_schema: pa.Schema,
    catalog_kwargs: dict[str, Any],
) -> ChunkResult:
    """Score one chunk of the listing and commit it: one UPSERT into ``image_scores`` and
    one into ``scoring_errors`` (each an atomic Iceberg commit)."""
    import ray.data
    from ray.data import ActorPoolStrategy, SaveMode

    t0 = time.perf_counter()
    n = len(entries)
    # keep the listing's order (sorted by path, so by year=/camera= folders) into the data
    # files: each file then spans few path-column values and a query on one year skips the
    # others by their Parquet statistics
    ray.data.DataContext.get_current().execution_options.preserve_order = True
    ds = ray.data.from_items(
        _entry_rows(entries, path_columns), override_num_blocks=max(1, -(-n // 32))
    )
    ds = ds.map_batches(
        decode_task,
        fn_kwargs={"max_pixels": cfg.max_pixels},
        batch_size=cfg.batch_size,
        batch_format="pyarrow",
    )
    remote: dict[str, Any] = {"num_cpus": cpus_per_actor}
    if gpus_per_actor:
        remote["num_gpus"] = gpus_per_actor
    ds = ds.map_batches(
        ScorerActor,
        fn_constructor_kwargs={"cfg": cfg},
        compute=ActorPoolStrategy(size=actors),
        batch_size=cfg.batch_size,
        batch_format="pyarrow",
        **remote,
    ).materialize()
    blocks = max(1, -(-n // 2000))  # data files of up to ~2000 images each
    scores = ds.map_batches(
        _select,
        fn_kwargs={"schema": scores_schema, "errors": False, "run_id": cfg.run_id},
        batch_format="pyarrow",
        batch_size=None,
    ).repartition(blocks)
    errors = ds.map_batches(
        _select,
        fn_kwargs={"schema": errors_schema, "errors": True, "run_id": cfg.run_id},
        batch_format="pyarrow",
        batch_size=None,
    ).repartition(1)
    n_scored = scores.count()
    n_failed = errors.count()
    if n_scored:
        scores.write_iceberg(
            "flowscore.image_scores",
            catalog_kwargs=catalog_kwargs,
            mode=SaveMode.UPSERT,
            upsert_kwargs={"join_cols": _KEY_SCORES},
        )
    if n_failed:
        errors.write_iceberg(
            "flowscore.scoring_errors",
            catalog_kwargs=catalog_kwargs,
            mode=SaveMode.UPSERT,
            upsert_kwargs={"join_cols": _KEY_ERRORS},
        )
    return ChunkResult(n_scored, n_failed, time.perf_counter() - t0)
