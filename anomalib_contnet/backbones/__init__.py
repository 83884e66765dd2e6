"""Backbones: a ConTNet implementation that loads the published checkpoints, and its weight management.

:mod:`anomalib_contnet.backbones.timm_contnet` registers the variants with timm; it is imported by
``import anomalib_contnet`` (not here, so the ``weights`` commands run without timm).
"""

from anomalib_contnet.backbones.contnet import (
    CONTNET_CFGS,
    STAGE_NAMES,
    ConTNet,
    ConTNetConfig,
    checkpoint_filter_fn,
    create_contnet,
    list_contnet_variants,
    shortcut_of_state_dict,
)

__all__ = [
    "CONTNET_CFGS",
    "STAGE_NAMES",
    "ConTNet",
    "ConTNetConfig",
    "checkpoint_filter_fn",
    "create_contnet",
    "list_contnet_variants",
    "shortcut_of_state_dict",
]
