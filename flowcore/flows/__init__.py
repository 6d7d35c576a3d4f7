"""Normalizing flows: one bijector contract (data -> latent), a standard-normal base."""

from .base import Bijector, Chain, Flow, Permutation, standard_normal_log_prob
from .bnaf import build_bnaf
from .config import (
    FLOW_TYPES,
    BNAFConfig,
    CouplingConfig,
    FlowConfig,
    MAFConfig,
    build_flow,
    flow_config_from_dict,
    flow_config_to_dict,
)
from .coupling import build_coupling, mlp_subnet, soft_clamp
from .maf import build_maf

__all__ = [
    "Bijector",
    "Chain",
    "Flow",
    "Permutation",
    "standard_normal_log_prob",
    "build_maf",
    "build_bnaf",
    "build_coupling",
    "mlp_subnet",
    "soft_clamp",
    "FLOW_TYPES",
    "FlowConfig",
    "MAFConfig",
    "BNAFConfig",
    "CouplingConfig",
    "build_flow",
    "flow_config_from_dict",
    "flow_config_to_dict",
]
