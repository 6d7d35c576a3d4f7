"""What defines a scorer, as data: :class:`ScorerSpec`, the presets, and their plain
(JSON/TOML) form with checked parsing. Loading a bundle needs this module, not the fitting
code of :mod:`flowcore.fit` (which re-exports every name here)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from .cnn import CNNConfig
from .encoder import EncoderConfig
from .flows import (
    CouplingConfig,
    FlowConfig,
    MAFConfig,
    flow_config_from_dict,
    flow_config_to_dict,
)
from .multiscale import MultiScaleConfig
from .scorer import STATISTICS, TRANSFORMS, ImageScore
from .training import FitConfig
from .windows import WindowConfig

__all__ = [
    "FeaturizerConfig",
    "AUTO_STATISTIC",
    "ScorerSpec",
    "PRESETS",
    "ConfigError",
    "FEATURIZER_TYPES",
    "featurizer_config_to_dict",
    "featurizer_config_from_dict",
    "spec_to_dict",
    "spec_from_dict",
    "apply_overrides",
]


FeaturizerConfig = WindowConfig | CNNConfig | MultiScaleConfig | EncoderConfig
"""The featurizer slot's configurations."""

AUTO_STATISTIC = "auto"
"""``image_statistic`` value that has :func:`flowcore.fit.choose_image_score` pick the
statistic."""


@dataclass(frozen=True)
class ScorerSpec:
    """Everything that defines how a scorer is fitted.

    ``windows_per_image`` feature rows are drawn from each training image per epoch (random
    positions); ``basis_rows`` rows in all fit the featurizer (the PCA basis of the window
    featurizer); ``val_fraction`` of the images are held out whole for early stopping and the
    threshold."""

    featurizer: FeaturizerConfig
    flow: FlowConfig = field(default_factory=MAFConfig)
    fit: FitConfig = field(default_factory=FitConfig)
    windows_per_image: int = 256
    basis_rows: int = 20_000
    threshold_quantile: float = 0.99
    val_fraction: float = 0.1
    dequantize: bool = False
    seed: int = 0
    image_statistic: str = "neg_mean_k_lowest"
    """One of :data:`flowcore.scorer.STATISTICS`, or ``"auto"``: chosen after the fit on
    held-out normal images and synthetic anomalies made from them
    (:func:`choose_image_score`), never on labels."""
    image_k: int = 0
    defect_fraction: float = 0.001
    image_two_sided: bool = False
    image_global: bool = False
    """Join the tail statistic with the image's global distance (:mod:`flowcore.globalscore`):
    catches changes over the whole image (rotation, zoom, contrast) that move no window's
    log-likelihood much. Replaces ``image_two_sided``, which it subsumes."""
    calibrate_by: str = ""
    test_transforms: int = 1
    """Score every image under this many test-time transforms and average the window
    log-likelihoods (:data:`flowcore.scorer.TRANSFORMS`, DifferNet); the threshold is
    calibrated with them. N times the scoring cost."""

    def __post_init__(self) -> None:
        if self.windows_per_image < 1 or self.basis_rows < 2:
            raise ValueError("windows_per_image must be >= 1 and basis_rows >= 2")
        if not 0 < self.threshold_quantile < 1:
            raise ValueError("threshold_quantile must be in (0, 1)")
        if not 0 < self.val_fraction < 1:
            raise ValueError("val_fraction must be in (0, 1)")
        if self.image_statistic not in (*STATISTICS, AUTO_STATISTIC):
            raise ValueError(
                f"image_statistic must be one of {', '.join(STATISTICS)} or {AUTO_STATISTIC}"
            )
        if not 1 <= self.test_transforms <= len(TRANSFORMS):
            raise ValueError(f"test_transforms must be in [1, {len(TRANSFORMS)}]")
        if self.image_global and self.image_two_sided:
            raise ValueError(
                "image_global and image_two_sided cannot both be set: the global score already "
                "catches images smoother or flatter than normal (set image_two_sided = false)"
            )
        if self.image_k < 0:
            raise ValueError("image_k must be >= 0 (0: from the geometry and defect_fraction)")
        _ = self.image_score  # validates k and defect_fraction

    @property
    def features(self) -> int:
        """Length of the feature vectors the flow models."""
        return self.featurizer.features

    @property
    def image_score(self) -> ImageScore:
        """The image statistic the fitted scorer stores."""
        return ImageScore(
            statistic=(
                STATISTICS[0] if self.image_statistic == AUTO_STATISTIC else self.image_statistic
            ),
            k=self.image_k or None,
            defect_fraction=self.defect_fraction,
            two_sided=self.image_two_sided,
        )


PRESETS: dict[str, ScorerSpec] = {
    # full resolution, 46×46×3 windows, stride 8, top 100 principal components and the
    # residual energy beyond them (101 features)
    "grain-full": ScorerSpec(
        featurizer=WindowConfig(
            window=46, stride=8, scale=1.0, components=100, residual_feature=True
        )
    ),
    # 25 % scale, 11×11×3 = 363 dims, stride 2, no reduction. Trained on dequantised windows
    # (uniform noise of one grey level): a grey camera's images are RGB with R = G = B, so 242
    # of the 363 dimensions never vary, and a flow trained on exact windows shrinks them to
    # nothing and then scores float rounding (11×11 windows at full resolution on gravel:
    # spots at image AUROC 0.485 without the noise, 0.972 with it; README, Evaluation)
    "grain-quarter": ScorerSpec(
        featurizer=WindowConfig(window=11, stride=2, scale=0.25, components=None),
        dequantize=True,
    ),
    # grain-quarter's windows at full resolution: 11×11×3 at stride 4, no reduction,
    # dequantised. For fine textures whose defects are a few pixels wide (gravel spots 0.972,
    # brick spots 1.000, where grain-full finds 0.367 and 0.820; README, Evaluation). Costly on
    # large images: 24.2 GFLOP on a 460×640 image against grain-full's 6.1 (the flow on 363
    # dimensions at 17,854 windows), 2.37 against 27.2 images/s in process (bench, 2 threads)
    # With the global score (image_global): a texture turned, zoomed or washed out moves no
    # window's log-likelihood down, but moves the image's texture statistics (in process on
    # gravel: rotation 0.663 -> 0.917, zoom 0.403 -> 1.000, contrast 0.000 -> 0.973; spots
    # 0.972 -> 0.966)
    "grain-fine": ScorerSpec(
        featurizer=WindowConfig(window=11, stride=4, scale=1.0, components=None),
        dequantize=True,
        image_global=True,
    ),
    # 11×11 windows at stride 4 in the context of the 46×46 window around each (one flow on
    # 32 + 100 components and the residual energy of each): small defects, heatmap on the
    # fine grid
    "grain-multiscale": ScorerSpec(featurizer=MultiScaleConfig()),
    # resnet18 layer2 + layer3 (128 + 256 = 384 channels) at 50 % scale: a 29×40 grid of
    # 8-pixel cells on a 460×640 image; affine coupling (DifferNet-style soft clamp α = 3).
    # Meant for ImageNet weights (``--backbone-weights``); without them the backbone keeps its
    # random initialisation, a much weaker random-feature extractor (the CLI warns).
    "cnn": ScorerSpec(
        featurizer=CNNConfig(backbone="resnet18", layers=("layer2", "layer3"), scale=0.5),
        flow=CouplingConfig(blocks=6, hidden=(256,), clamp=3.0),
        fit=FitConfig(batch_size=256, lr=5e-4, max_epochs=40, patience=5),
        windows_per_image=256,
        basis_rows=10_000,
    ),
    # ImageNet MobileNetV2 (train with --backbone-weights pkg:mobilenet_v2, offline) at 50 %
    # scale: features.6 + features.13 (32 + 96 channels) on a stride-8 grid, affine coupling
    "cnn-mobilenet": ScorerSpec(
        featurizer=CNNConfig(
            backbone="mobilenet_v2", layers=("features.6", "features.13"), scale=0.5
        ),
        flow=CouplingConfig(blocks=6, hidden=(256,), clamp=3.0),
        fit=FitConfig(batch_size=256, lr=5e-4, max_epochs=40, patience=5),
        windows_per_image=256,
        basis_rows=10_000,
    ),
    # small whole images (28×28 grey, Fashion-MNIST): a convolutional autoencoder trained on
    # the normal images, its 32-dim code of each image modelled by an affine-coupling flow
    # (DifferNet-style soft clamp): the score is -log p(z). One cell per image, so one row per
    # image. The reconstruction term (recon = "balanced" or "density") is off: on the
    # Fashion-MNIST development set (unused training images, never t10k) it lowered the mean
    # one-vs-rest AUROC from 0.926 to 0.922 (scripts/fashion_mnist.py study --dev).
    "ae-flow": ScorerSpec(
        featurizer=EncoderConfig(recon="off"),
        flow=CouplingConfig(blocks=8, hidden=(128,), clamp=3.0),
        fit=FitConfig(batch_size=128, lr=1e-3, max_epochs=100, patience=10),
        windows_per_image=1,
        basis_rows=20_000,
    ),
}


class ConfigError(ValueError):
    """A configuration that cannot be used; the message names where and which key."""


FEATURIZER_TYPES: dict[
    str, type[WindowConfig] | type[CNNConfig] | type[MultiScaleConfig] | type[EncoderConfig]
] = {
    "windows": WindowConfig,
    "cnn": CNNConfig,
    "multiscale": MultiScaleConfig,
    "encoder": EncoderConfig,
}
_FEATURIZER_NAMES = {cls: name for name, cls in FEATURIZER_TYPES.items()}
_SCALARS = (
    "windows_per_image",
    "basis_rows",
    "threshold_quantile",
    "val_fraction",
    "dequantize",
    "seed",
    "image_statistic",
    "image_k",
    "defect_fraction",
    "image_two_sided",
    "image_global",
    "calibrate_by",
    "test_transforms",
)


_OMITTED_AT_DEFAULT = {(CNNConfig, "input_scales")}
"""Fields written only when they differ from their default, so that bundles which do not
use them stay loadable by releases from before the field existed."""


def featurizer_config_to_dict(cfg: FeaturizerConfig) -> dict[str, Any]:
    d: dict[str, Any] = {"type": _FEATURIZER_NAMES[type(cfg)]}
    for f in fields(cfg):
        v = getattr(cfg, f.name)
        if (type(cfg), f.name) in _OMITTED_AT_DEFAULT and v == f.default:
            continue
        d[f.name] = list(v) if isinstance(v, tuple) else v
    return d


_SCALAR_TYPES: dict[str, tuple[type, ...]] = {
    "int": (int,),
    "float": (int, float),
    "bool": (bool,),
    "str": (str,),
    "int | None": (int, type(None)),
}


def _check_types(cls: type, d: dict[str, Any], where: str) -> None:
    """Scalar fields must hold their annotated type (a bool is not an int here): values from
    TOML or a bundle's JSON are checked before any dataclass computes with them."""
    for f in fields(cls):
        want = _SCALAR_TYPES.get(str(f.type))
        if want is None or f.name not in d:
            continue
        v = d[f.name]
        if not isinstance(v, want) or (isinstance(v, bool) and bool not in want):
            raise ConfigError(f"{where}: {f.name} must be of type {f.type}, got {v!r}")


def _build(cls: type, d: dict[str, Any], where: str) -> Any:
    allowed = {f.name for f in fields(cls) if f.init}
    for key in d:
        if key not in allowed:
            raise ConfigError(f"{where}: unknown key {key!r} (known: {', '.join(sorted(allowed))})")
    _check_types(cls, d, where)
    try:
        return cls(**d)
    except (TypeError, ValueError, OverflowError) as e:
        raise ConfigError(f"{where}: {e}") from e


def featurizer_config_from_dict(d: dict[str, Any], where: str = "featurizer") -> FeaturizerConfig:
    d = dict(d)
    kind = d.pop("type", None)
    if not isinstance(kind, str) or kind not in FEATURIZER_TYPES:
        raise ConfigError(f"{where}.type must be one of {sorted(FEATURIZER_TYPES)}, got {kind!r}")
    cfg: FeaturizerConfig = _build(FEATURIZER_TYPES[kind], d, where)
    return cfg


def spec_to_dict(spec: ScorerSpec) -> dict[str, Any]:
    """Plain JSON/TOML-able form of a spec (the bundle, MLflow parameters, Ray workers)."""
    return {
        "featurizer": featurizer_config_to_dict(spec.featurizer),
        "flow": flow_config_to_dict(spec.flow),
        "fit": asdict(spec.fit),
        **{k: getattr(spec, k) for k in _SCALARS},
    }


def spec_from_dict(d: dict[str, Any], where: str = "spec") -> ScorerSpec:
    """Inverse of :func:`spec_to_dict`; unknown keys are errors naming ``where`` and the key."""
    return apply_overrides(None, d, where)


def apply_overrides(base: ScorerSpec | None, d: dict[str, Any], where: str) -> ScorerSpec:
    """``base`` with the fields of ``d`` replaced: sections ``featurizer``, ``flow``, ``fit``
    (tables of fields) and the scalar fields. A section that changes ``type`` starts from that
    type's defaults. Unknown keys raise :class:`ConfigError` naming ``where`` and the key."""
    if not isinstance(d, dict):
        raise ConfigError(f"{where}: expected a table of settings")
    known = {"featurizer", "flow", "fit", *_SCALARS}
    for key in d:
        if key not in known:
            raise ConfigError(f"{where}: unknown key {key!r} (known: {', '.join(sorted(known))})")
    for section in ("featurizer", "flow", "fit"):
        if section in d and not isinstance(d[section], dict):
            raise ConfigError(f"{where}: {section!r} must be a table, e.g. [{section}]")
    if base is None:
        for section in ("featurizer",):
            if section not in d:
                raise ConfigError(f"{where}: missing section {section!r}")
        base_d: dict[str, Any] = {"fit": {}, "flow": {"type": "maf"}}
    else:
        base_d = spec_to_dict(base)

    def merged(section: str) -> dict[str, Any]:
        cur = dict(base_d.get(section) or {})
        new = dict(d.get(section) or {})
        if "type" in new and new["type"] != cur.get("type"):
            cur = {}
        cur.update(new)
        return cur

    feat = featurizer_config_from_dict(merged("featurizer"), f"{where}: featurizer")
    flow_d = merged("flow")
    try:
        flow = flow_config_from_dict(flow_d, where=f"{where}: flow")
    except (TypeError, ValueError, OverflowError) as e:
        raise ConfigError(str(e)) from e
    fit_cfg = _build(FitConfig, merged("fit"), f"{where}: fit")
    scalars: dict[str, Any] = {
        k: d.get(k, base_d.get(k)) for k in _SCALARS if k in d or k in base_d
    }
    try:
        return ScorerSpec(featurizer=feat, flow=flow, fit=fit_cfg, **scalars)
    except (TypeError, ValueError, OverflowError) as e:
        raise ConfigError(f"{where}: {e}") from e
