"""The reference for stage outputs: a ConTNet's stages run one after the other, by hand.

The package takes stage maps only from timm's ``features_only`` networks; tests
compare those (and the extractor built on them) with this plain loop, and use it
to look at every stage of a bare :class:`~anomalib_contnet.backbones.contnet.ConTNet`.
"""

from __future__ import annotations

import torch

from anomalib_contnet.backbones.contnet import STAGE_NAMES, ConTNet


def stage_maps(model: ConTNet, image: torch.Tensor) -> dict[str, torch.Tensor]:
    """{``layer0`` .. ``layer4``: map} of ``image``, computed without gradients."""
    maps: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for name in STAGE_NAMES:
            image = maps[name] = getattr(model, name)(image)
    return maps
