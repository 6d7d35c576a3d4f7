"""Flow configurations: frozen dataclasses validated on construction, JSON round-trippable."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from .base import Flow
from .bnaf import build_bnaf
from .coupling import build_coupling
from .maf import build_maf

__all__ = [
    "MAFConfig",
    "BNAFConfig",
    "CouplingConfig",
    "FlowConfig",
    "FLOW_TYPES",
    "build_flow",
    "flow_elements",
    "MAX_ELEMENTS",
]


MAX_WIDTH = 65_536
"""Largest hidden width (or hidden factor × D cap below) a flow may have: a config read from a
bundle must not be able to ask for terabytes before any tensor is checked."""
MAX_DEPTH = 1_024
"""Most blocks, flows or layers."""
MAX_ELEMENTS = 2**28
"""Most tensor elements (parameters, masks and buffers; 1 GiB in float32) a flow may hold:
each size is bounded above, but their product must be too (depth × width²)."""


def _positive(obj: object, *names: str, limit: int = MAX_DEPTH) -> None:
    for n in names:
        v = getattr(obj, n)
        if not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= limit:
            raise ValueError(
                f"{type(obj).__name__}.{n} must be an integer in [1, {limit}], got {v!r}"
            )


@dataclass(frozen=True)
class MAFConfig:
    """MAF: ``blocks`` MADEs × ``layers`` hidden layers of ``hidden`` ReLU units, batch norm
    between MADEs."""

    type: str = field(default="maf", init=False)
    blocks: int = 5
    hidden: int = 100
    layers: int = 1
    batch_norm: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        _positive(self, "blocks", "layers")
        _positive(self, "hidden", limit=MAX_WIDTH)


@dataclass(frozen=True)
class BNAFConfig:
    """BNAF: ``flows`` transforms of ``hidden_layers`` tanh layers of ``hidden_factor``·D units."""

    type: str = field(default="bnaf", init=False)
    flows: int = 6
    hidden_factor: int = 12
    hidden_layers: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        _positive(self, "flows", "hidden_factor", "hidden_layers")


@dataclass(frozen=True)
class CouplingConfig:
    """Affine coupling: ``blocks`` Glow-style blocks, subnet MLP ``hidden`` widths, soft clamp
    α = ``clamp``."""

    type: str = field(default="coupling", init=False)
    blocks: int = 8
    hidden: tuple[int, ...] = (256, 256)
    clamp: float = 3.0
    seed: int = 0

    def __post_init__(self) -> None:
        _positive(self, "blocks")
        object.__setattr__(self, "hidden", tuple(int(h) for h in self.hidden))
        if len(self.hidden) > MAX_DEPTH or any(not 1 <= h <= MAX_WIDTH for h in self.hidden):
            raise ValueError(
                f"CouplingConfig.hidden widths must be in [1, {MAX_WIDTH}], got {self.hidden}"
            )
        if not self.clamp > 0:
            raise ValueError(f"CouplingConfig.clamp must be > 0, got {self.clamp}")


FlowConfig = MAFConfig | BNAFConfig | CouplingConfig

FLOW_TYPES: dict[str, type[MAFConfig] | type[BNAFConfig] | type[CouplingConfig]] = {
    "maf": MAFConfig,
    "bnaf": BNAFConfig,
    "coupling": CouplingConfig,
}


def flow_config_to_dict(cfg: FlowConfig) -> dict[str, Any]:
    d = asdict(cfg)
    if "hidden" in d and isinstance(d["hidden"], tuple):
        d["hidden"] = list(d["hidden"])
    return d


def flow_config_from_dict(d: dict[str, Any], where: str = "flow") -> FlowConfig:
    """Parse a flow config; errors name ``where`` and the offending key."""
    d = dict(d)
    kind = d.pop("type", None)
    if not isinstance(kind, str) or kind not in FLOW_TYPES:
        raise ValueError(f"{where}.type must be one of {sorted(FLOW_TYPES)}, got {kind!r}")
    cls = FLOW_TYPES[kind]
    allowed = {f.name for f in fields(cls) if f.init}
    for key in d:
        if key not in allowed:
            raise ValueError(f"{where}: unknown key {key!r} for flow type {kind!r}")
    return cls(**d)


def flow_elements(features: int, cfg: FlowConfig) -> int:
    """An upper estimate of the tensor elements (weights, biases, masks, buffers) of the flow
    :func:`build_flow` builds, computed from the config alone (nothing allocated)."""
    d = features
    if isinstance(cfg, MAFConfig):
        h = cfg.hidden
        made = 2 * (d * h + (cfg.layers - 1) * h * h + 2 * d * h) + 2 * (cfg.layers * h + 2 * d)
        return cfg.blocks * (made + 4 * d + 2 * d)
    if isinstance(cfg, BNAFConfig):
        w = cfg.hidden_factor * d
        layer = 3 * (2 * d * w + (cfg.hidden_layers - 1) * w * w) + 4 * w * (cfg.hidden_layers + 1)
        return cfg.flows * (layer + 2 * d)
    widths = [d, *cfg.hidden, 2 * d]  # one subnet per half, generous
    net = sum(a * b + b for a, b in zip(widths[:-1], widths[1:], strict=True))
    return cfg.blocks * (2 * net + 4 * d)


def build_flow(features: int, cfg: FlowConfig) -> Flow:
    """Build the density model for D = ``features`` from a config. Refuses a config whose
    tensors would hold more than :data:`MAX_ELEMENTS` elements, before allocating any."""
    if features < 1:
        raise ValueError("features must be >= 1")
    n = flow_elements(features, cfg)
    if n > MAX_ELEMENTS:
        raise ValueError(
            f"this flow would hold about {n:,} tensor elements for D = {features}, more than "
            f"the {MAX_ELEMENTS:,} allowed; use fewer or narrower blocks"
        )
    if isinstance(cfg, BNAFConfig) and cfg.hidden_factor * features > MAX_WIDTH:
        raise ValueError(
            f"BNAF hidden width hidden_factor·D = {cfg.hidden_factor * features} exceeds "
            f"{MAX_WIDTH}"
        )
    if isinstance(cfg, MAFConfig):
        t = build_maf(
            features,
            blocks=cfg.blocks,
            hidden=cfg.hidden,
            layers=cfg.layers,
            batch_norm=cfg.batch_norm,
            seed=cfg.seed,
        )
    elif isinstance(cfg, BNAFConfig):
        t = build_bnaf(
            features,
            flows=cfg.flows,
            hidden_factor=cfg.hidden_factor,
            hidden_layers=cfg.hidden_layers,
            seed=cfg.seed,
        )
    else:
        t = build_coupling(
            features, blocks=cfg.blocks, hidden=cfg.hidden, clamp=cfg.clamp, seed=cfg.seed
        )
    flow = Flow(t, features)
    flow.config = cfg
    return flow
