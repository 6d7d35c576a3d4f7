"""The model bundle: a directory with ``flowscore.json`` (configs, statistics, threshold,
versions) and ``weights.safetensors`` (every tensor). Loading never unpickles anything: the
JSON is parsed with ``json``, the tensors with safetensors, and every tensor's name, shape and
dtype is checked against the model the JSON describes before any weight is used.

Featurizers: ``windows`` (PCA mean, basis, scale), ``encoder`` (the autoencoder's encoder and
decoder weights, the codes' standardisation and the reconstruction term's σ² and weight, under
``featurizer.*``; the JSON holds its ``EncoderConfig``) and ``cnn`` (the backbone's weights and
BatchNorm statistics, the ImageNet normalisation and the fitted standardisation, all in
``weights.safetensors`` under ``featurizer.*``; the JSON holds its ``CNNConfig``). The JSON of
a ``windows`` bundle is unchanged since format version 1.

A ``distilled`` bundle (:mod:`flowcore.distill`) holds a student network in the featurizer slot
and no flow: its JSON has ``"kind": "distilled"``, ``"flow": null``, the student's
``DistilledConfig`` as the featurizer and ``"teacher"``, what it records of the model it was
distilled from (URI, name, version, preset, featurizer, SHA-256 of the teacher's tensors)."""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .cnn import CNNFeaturizer
from .distill import TEACHER_KEYS, DistilledConfig, DistilledFeaturizer
from .encoder import EncoderConfig, EncoderFeaturizer
from .flows import build_flow, flow_config_from_dict, flow_config_to_dict
from .flows.config import flow_elements
from .globalscore import GlobalScore
from .multiscale import MultiScaleConfig, MultiScaleFeaturizer
from .scorer import (
    LEGACY_IMAGE_SCORE,
    PRECISIONS,
    TRANSFORMS,
    Calibration,
    FeaturizerModule,
    ImageScore,
    Scorer,
)
from .spec import ConfigError, _build, featurizer_config_from_dict, featurizer_config_to_dict
from .windows import WindowConfig, WindowFeaturizer

__all__ = ["FORMAT", "FORMAT_VERSION", "BundleError", "save_bundle", "load_bundle", "read_meta"]

FORMAT = "flowscore-bundle"
FORMAT_VERSION = 1
META_FILE = "flowscore.json"
MAX_META_BYTES = 16 << 20  # a bundle's JSON is a few kB
WEIGHTS_FILE = "weights.safetensors"
DISTILLED = "distilled"
_PICKLE_SUFFIXES = (".pkl", ".pickle", ".pt", ".pth", ".bin", ".ckpt", ".joblib", ".npy")


class BundleError(ValueError):
    """A bundle that cannot be loaded; the message names the file and what to do."""


def _versions() -> dict[str, str]:
    from importlib import metadata

    out: dict[str, str] = {"torch": str(torch.__version__)}
    for dist in ("flowscore", "safetensors", "numpy"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "unknown"
    return out


def _featurizer_from_meta(d: dict[str, Any], where: str) -> FeaturizerModule:
    """An empty featurizer of the configuration ``d`` (its tensors are loaded next)."""
    if d.get("type") == DISTILLED:
        try:
            student = {k: v for k, v in d.items() if k != "type"}
            return DistilledFeaturizer(_build(DistilledConfig, student, f"{where}: featurizer"))
        except ConfigError as e:
            raise BundleError(str(e)) from e
    try:
        cfg = featurizer_config_from_dict(d, where=f"{where}: featurizer")
    except ConfigError as e:
        raise BundleError(str(e)) from e
    try:
        if isinstance(cfg, WindowConfig):
            return WindowFeaturizer(cfg)
        if isinstance(cfg, MultiScaleConfig):
            return MultiScaleFeaturizer(cfg)
        if isinstance(cfg, EncoderConfig):
            return EncoderFeaturizer(cfg)
        # allocated, not initialised: the strict check below guarantees every tensor is loaded
        return CNNFeaturizer(cfg, init=False)
    except (TypeError, ValueError, RuntimeError, MemoryError) as e:
        raise BundleError(f"{where}: featurizer: {e}") from e


def save_bundle(scorer: Scorer, path: str | Path, training: dict[str, Any] | None = None) -> Path:
    """Write the bundle directory (created if missing; files replaced atomically)."""
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    feat = scorer.featurizer
    distilled: dict[str, Any] = {}
    if isinstance(feat, DistilledFeaturizer):
        featurizer: dict[str, Any] = {"type": DISTILLED, **asdict(feat.cfg)}
        flow: dict[str, Any] | None = None
        distilled = {"kind": DISTILLED, "teacher": dict(feat.teacher)}
    else:
        featurizer = featurizer_config_to_dict(feat.cfg)
        if scorer.flow is None:
            raise ValueError("only a distilled scorer has no flow")
        flow = {"features": scorer.flow.features, **flow_config_to_dict(scorer.flow_config)}
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        **distilled,
        "featurizer": featurizer,
        "flow": flow,
        "threshold": scorer.threshold if math.isfinite(scorer.threshold) else None,
        "heatmap_clip": list(scorer.heatmap_clip) if scorer.heatmap_clip else None,
        "image_score": scorer.image_score.as_dict(),
        "calibration": scorer.calibration.as_dict() if scorer.calibration else None,
        **({"global_score": scorer.global_score.as_dict()} if scorer.global_score else {}),
        "validated_precisions": list(scorer.validated_precisions),
        "test_transforms": scorer.transforms,
        "training": training or {},
        "versions": _versions(),
    }
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in scorer.state_dict().items()}
    for name, data in ((WEIGHTS_FILE, None), (META_FILE, meta)):
        fd, tmp = tempfile.mkstemp(dir=out, prefix=f".{name}.")
        os.close(fd)
        if data is None:
            save_file(tensors, tmp, metadata={"format": FORMAT})
        else:
            Path(tmp).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, out / name)
    return out


def read_meta(path: str | Path) -> dict[str, Any]:
    """Parse and check ``flowscore.json`` of a bundle directory."""
    meta_path = Path(path) / META_FILE
    if not meta_path.is_file():
        raise BundleError(
            f"{meta_path}: not found; a bundle is a directory with {META_FILE} and {WEIGHTS_FILE}"
        )
    if meta_path.stat().st_size > MAX_META_BYTES:
        raise BundleError(f"{meta_path}: larger than {MAX_META_BYTES} bytes; not a bundle")
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise BundleError(f"{meta_path}: not valid JSON ({str(e)[:200]})") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise BundleError(f"{meta_path}: not a flowscore bundle (format != {FORMAT!r})")
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise BundleError(
            f"{meta_path}: bundle format version {version!r} is not supported by this "
            f"flowscore (it reads version {FORMAT_VERSION}); use a matching flowscore release"
        )
    if not isinstance(meta.get("featurizer"), dict):
        raise BundleError(f"{meta_path}: missing or invalid key 'featurizer'")
    kind = meta.get("kind", "flow")
    is_student = meta["featurizer"].get("type") == DISTILLED
    if kind not in ("flow", DISTILLED) or (kind == DISTILLED) != is_student:
        raise BundleError(
            f"{meta_path}: kind {kind!r} does not match featurizer type "
            f"{meta['featurizer'].get('type')!r} (a distilled model has both 'distilled')"
        )
    if is_student:
        if meta.get("flow") is not None:
            raise BundleError(f"{meta_path}: a distilled model has no flow ('flow': null)")
        _teacher_from_meta(meta.get("teacher"), str(meta_path))
    elif not isinstance(meta.get("flow"), dict):
        raise BundleError(f"{meta_path}: missing or invalid key 'flow'")
    return meta


def _teacher_from_meta(d: Any, where: str) -> dict[str, str | None]:
    """A distilled bundle's record of its teacher: a table of :data:`TEACHER_KEYS`, each a
    string (at most 2000 characters) or null."""
    if (
        not isinstance(d, dict)
        or set(d) - set(TEACHER_KEYS)
        or any(v is not None and (not isinstance(v, str) or len(v) > 2000) for v in d.values())
    ):
        raise BundleError(
            f"{where}: teacher must be a table of {', '.join(TEACHER_KEYS)}, each a string "
            f"or null; got {str(d)[:80]}"
        )
    return {k: d.get(k) for k in TEACHER_KEYS}


def _finite(v: Any) -> float | None:
    """``v`` as a finite float, or None (bools, strings, NaN and infinities are not)."""
    if isinstance(v, bool) or not isinstance(v, int | float):
        return None
    f = float(v)
    return f if math.isfinite(f) else None


def _threshold_and_clip(
    meta: dict[str, Any], where: str
) -> tuple[float, tuple[float, float] | None]:
    """The threshold (null: none, i.e. never anomalous) and heatmap clip (null, or two finite
    numbers low < high); anything else, NaN and infinities included, is a BundleError."""
    thr = meta.get("threshold")
    threshold = math.inf
    if thr is not None:
        t = _finite(thr)
        if t is None:
            raise BundleError(f"{where}: threshold must be a finite number or null, got {thr!r}")
        threshold = t
    clip = meta.get("heatmap_clip")
    if clip is None:
        return threshold, None
    lo_hi = [_finite(v) for v in clip] if isinstance(clip, list) and len(clip) == 2 else None
    if lo_hi is None or lo_hi[0] is None or lo_hi[1] is None or not lo_hi[0] < lo_hi[1]:
        raise BundleError(
            f"{where}: heatmap_clip must be null or [low, high], finite, low < high; got "
            f"{str(clip)[:80]}"
        )
    return threshold, (lo_hi[0], lo_hi[1])


def _image_score_from_meta(d: Any, where: str) -> ImageScore:
    """The stored image statistic; bundles from before it existed (no key) score ``-p05``."""
    if d is None:
        return LEGACY_IMAGE_SCORE
    keys = {"statistic", "k", "defect_fraction", "two_sided", "centre", "spread"}
    if not isinstance(d, dict) or set(d) - keys:
        raise BundleError(f"{where}: image_score must be a table of {', '.join(sorted(keys))}")
    try:
        k, centre, spread = d.get("k"), d.get("centre"), d.get("spread")
        two_sided = d.get("two_sided", False)
        if not isinstance(two_sided, bool):
            raise ValueError("two_sided must be true or false")
        return ImageScore(
            statistic=d.get("statistic", "neg_mean_k_lowest"),
            k=None if k is None else int(k),
            defect_fraction=float(d.get("defect_fraction", 0.001)),
            two_sided=two_sided,
            centre=None if centre is None else float(centre),
            spread=None if spread is None else float(spread),
        )
    except (TypeError, ValueError, OverflowError) as e:  # OverflowError: int(inf)
        raise BundleError(f"{where}: image_score: {e}") from e


def _global_score_from_meta(d: Any, scorer: Scorer, where: str) -> GlobalScore | None:
    """The global score's settings (its tensors come with the weights); bundles without one
    (all from before it existed) score the tail statistic alone."""
    if d is None:
        return None
    keys = {"features", "components", "tail_centre", "tail_spread", "centre", "spread"}
    if not isinstance(d, dict) or set(d) != keys:
        raise BundleError(f"{where}: global_score must be a table of {', '.join(sorted(keys))}")
    if isinstance(scorer.featurizer, DistilledFeaturizer):
        raise BundleError(f"{where}: a distilled model cannot have a global_score")
    want = int(scorer.featurizer.cfg.features)
    try:
        if any(isinstance(d[k], bool) for k in keys):
            raise ValueError("numbers expected, not true/false")
        features, components = int(d["features"]), int(d["components"])
        if features != want:
            raise ValueError(f"features={features} does not match the featurizer's {want}")
        return GlobalScore(
            features,
            components,
            tail_centre=float(d["tail_centre"]),
            tail_spread=float(d["tail_spread"]),
            centre=float(d["centre"]),
            spread=float(d["spread"]),
        )
    except (TypeError, ValueError, OverflowError) as e:
        raise BundleError(f"{where}: global_score: {e}") from e


def _precisions_from_meta(d: Any, where: str) -> tuple[str, ...]:
    """The precisions the model passed the accuracy gates in; bundles from before the check
    existed (no key) are fp32 only."""
    if d is None:
        return ("fp32",)
    if (
        not isinstance(d, list)
        or "fp32" not in d
        or any(p not in PRECISIONS for p in d)
        or len(set(d)) != len(d)
    ):
        raise BundleError(
            f"{where}: validated_precisions must be a list of {', '.join(PRECISIONS)} that "
            f"includes fp32; got {str(d)[:80]}"
        )
    return tuple(d)


def _transforms_from_meta(d: Any, where: str) -> int:
    """How many test-time transforms the threshold was calibrated with (1: none; bundles
    from before them have no key)."""
    if not isinstance(d, int) or isinstance(d, bool) or not 1 <= d <= len(TRANSFORMS):
        raise BundleError(
            f"{where}: test_transforms must be an integer in [1, {len(TRANSFORMS)}], got {d!r}"
        )
    return d


def _calibration_from_meta(d: Any, where: str) -> Calibration | None:
    if d is None:
        return None
    try:
        if not isinstance(d, dict) or set(d) != {"by", "thresholds", "offsets"}:
            raise ValueError("must be a table of by, thresholds, offsets")
        by, thr, off = d["by"], d["thresholds"], d["offsets"]
        if not isinstance(by, str) or not isinstance(thr, dict) or not isinstance(off, dict):
            raise ValueError("by must be a string, thresholds and offsets tables")
        return Calibration(
            by=by,
            thresholds={str(k): float(v) for k, v in thr.items()},
            offsets={str(k): float(v) for k, v in off.items()},
        )
    except (TypeError, ValueError, OverflowError) as e:
        raise BundleError(f"{where}: calibration: {e}") from e


_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def _header(weights_path: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """Name -> (shape, safetensors dtype) of every tensor, from the file's header only."""
    from safetensors import safe_open

    try:
        with safe_open(str(weights_path), framework="pt") as f:
            out = {}
            for k in f.keys():
                sl = f.get_slice(k)
                out[k] = (tuple(int(n) for n in sl.get_shape()), str(sl.get_dtype()))
            return out
    except (SafetensorError, OSError, ValueError) as e:
        raise BundleError(f"{weights_path}: not a readable safetensors file ({e})") from e


def load_bundle(path: str | Path, device: str | torch.device = "cpu") -> Scorer:
    """Load a scorer from a bundle directory, refusing anything that does not match."""
    root = Path(path)
    if not root.is_dir():
        raise BundleError(f"{root}: bundle directory not found")
    for f in root.rglob("*"):
        if f.suffix.lower() in _PICKLE_SUFFIXES:
            raise BundleError(
                f"{f}: refusing a bundle that contains a pickle-capable file; flowscore "
                f"loads only {META_FILE} and {WEIGHTS_FILE}"
            )
    meta = read_meta(root)
    meta_path = root / META_FILE
    featurizer = _featurizer_from_meta(meta["featurizer"], str(meta_path))
    if isinstance(featurizer, DistilledFeaturizer):
        featurizer.teacher = _teacher_from_meta(meta.get("teacher"), str(meta_path))
        return _finish(root, meta, Scorer(featurizer, None), device)
    n_features = featurizer.cfg.features
    flow_d = dict(meta["flow"])
    features = flow_d.pop("features", None)
    if features != n_features:
        raise BundleError(
            f"{meta_path}: flow.features={features!r} does not match the featurizer's "
            f"{n_features} output features"
        )
    try:
        flow_cfg = flow_config_from_dict(flow_d, where=f"{meta_path}: flow")
    except (TypeError, ValueError, OverflowError) as e:
        msg = str(e) if str(meta_path) in str(e) else f"{meta_path}: flow: {e}"
        raise BundleError(msg) from e
    _threshold_and_clip(meta, str(meta_path))  # checked before any tensor is sized
    weights_path = root / WEIGHTS_FILE
    if not weights_path.is_file():
        raise BundleError(f"{weights_path}: not found")
    # the flow the JSON describes must fit in the weights file that holds its tensors: a JSON
    # that asks for a huge model is refused before it is built
    need = 4 * flow_elements(n_features, flow_cfg)
    if isinstance(featurizer, EncoderFeaturizer):  # its weights are in the same file
        need += 4 * featurizer.cfg.elements
    have = weights_path.stat().st_size
    if need > 4 * have + (16 << 20):
        raise BundleError(
            f"{meta_path}: flow: the flow described needs about {need / 2**20:,.0f} MB of "
            f"tensors, but {WEIGHTS_FILE} holds {have / 2**20:,.1f} MB"
        )
    try:
        flow = build_flow(n_features, flow_cfg)
    except (TypeError, ValueError, RuntimeError, MemoryError) as e:
        raise BundleError(f"{meta_path}: flow: {e}") from e
    return _finish(root, meta, Scorer(featurizer, flow, flow_config=flow_cfg), device)


def _finish(root: Path, meta: dict[str, Any], scorer: Scorer, device: str | torch.device) -> Scorer:
    """The scorer's threshold, clip, statistics and settings from ``meta``, and its tensors
    from the weights file, each checked against the model the JSON describes."""
    meta_path = root / META_FILE
    weights_path = root / WEIGHTS_FILE
    if not weights_path.is_file():
        raise BundleError(f"{weights_path}: not found")
    scorer.threshold, scorer.heatmap_clip = _threshold_and_clip(meta, str(meta_path))
    scorer.image_score = _image_score_from_meta(meta.get("image_score"), str(meta_path))
    scorer.calibration = _calibration_from_meta(meta.get("calibration"), str(meta_path))
    scorer.validated_precisions = _precisions_from_meta(
        meta.get("validated_precisions"), str(meta_path)
    )
    scorer.transforms = _transforms_from_meta(meta.get("test_transforms", 1), str(meta_path))
    scorer.global_score = _global_score_from_meta(meta.get("global_score"), scorer, str(meta_path))
    # names, shapes and dtypes from the safetensors header (no tensor data read yet)
    expected = scorer.state_dict()
    header = _header(weights_path)
    for name, ref in expected.items():
        if name not in header:
            raise BundleError(f"{weights_path}: tensor {name!r} is missing")
        shape, dtype = header[name]
        if shape != tuple(ref.shape):
            raise BundleError(
                f"{weights_path}: tensor {name!r} has shape {shape}, the model "
                f"described by {META_FILE} needs {tuple(ref.shape)}"
            )
        if _DTYPES.get(dtype) != ref.dtype:
            raise BundleError(
                f"{weights_path}: tensor {name!r} has dtype {dtype}, expected {ref.dtype}"
            )
    extra = sorted(set(header) - set(expected))
    if extra:
        raise BundleError(f"{weights_path}: unexpected tensor(s) {extra[:5]}")
    try:
        tensors = load_file(str(weights_path))
    except (SafetensorError, OSError, ValueError) as e:
        raise BundleError(f"{weights_path}: not a readable safetensors file ({e})") from e
    scorer.load_state_dict(tensors, strict=True)
    scorer.training_stats = dict(meta.get("training") or {})
    return scorer.to(device).eval()
