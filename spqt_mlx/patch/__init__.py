"""The mlx-lm patch layer: ZigzagLinear, ZigzagSwitchLinear and the functions that put them into a model."""

from .blocks import FAMILIES, fuse_blocks
from .experts import ZigzagSwitchLinear
from .fused import fuse_shared_inputs, shared_input_groups
from .linear import CRITERIA, ZigzagLinear
from .model import (
    achieved_sparsity,
    choose_quantizer,
    get_criterion,
    get_thresholds,
    is_projection,
    patch_model,
    projections,
    record_stats,
    routers,
    set_criterion,
    set_thresholds,
    zigzag_layers,
)

__all__ = [
    "CRITERIA",
    "FAMILIES",
    "ZigzagLinear",
    "ZigzagSwitchLinear",
    "achieved_sparsity",
    "choose_quantizer",
    "fuse_blocks",
    "fuse_shared_inputs",
    "get_criterion",
    "get_thresholds",
    "is_projection",
    "patch_model",
    "projections",
    "record_stats",
    "routers",
    "set_criterion",
    "set_thresholds",
    "shared_input_groups",
    "zigzag_layers",
]
