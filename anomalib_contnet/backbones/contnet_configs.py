"""The table of ConTNet variants and the rule that tells their two shortcut networks apart, without torch.

One row per variant (timm's habit); :mod:`anomalib_contnet.backbones.contnet` builds
networks from these rows. No torch here, so ``anomalib-contnet weights list`` stays instant.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = [
    "CONTNET_CFGS",
    "STAGE_STRIDES",
    "ConTNetConfig",
    "is_contnet",
    "list_contnet_variants",
    "shortcut_name",
    "shortcut_of_state_dict",
]

STAGE_STRIDES: tuple[int, ...] = (2, 2, 2, 1)
"""Stride of the last (widening) block of stages 1..4; only stride-2 blocks differ between the two shortcuts.

The one statement of the strides: :mod:`~anomalib_contnet.backbones.contnet` builds the
blocks and derives each stage's reduction (timm's ``feature_info``) from it.
"""


def shortcut_name(avg_down: bool) -> str:
    """``"avg_down"`` or ``"strided"``: the down-sampling shortcut's name in messages, listings and checkpoints."""
    return "avg_down" if avg_down else "strided"


@dataclass(frozen=True)
class ConTNetConfig:
    """Architecture hyper-parameters of one ConTNet variant, named as in the authors' constructor.

    ``avg_down`` picks the shortcut of the stride-2 blocks (last block of stages
    1-3): False is a 1x1 convolution with stride 2 (keys ``downsample.conv.weight``),
    True is 2x2 average pooling followed by a stride-1 1x1 convolution (keys
    ``downsample.conv.conv.weight``). Same parameter shapes, different features.
    """

    inplanes: int
    layers: tuple[int, ...]
    mlp_dim: tuple[int, ...]
    head_num: tuple[int, ...]
    dropout: tuple[float, ...] = (0.0, 0.0, 0.0, 0.0)
    last_dropout: float = 0.0
    num_classes: int = 1000
    avg_down: bool = False


CONTNET_CFGS: dict[str, ConTNetConfig] = {
    "contnet_ti": ConTNetConfig(inplanes=48, layers=(1, 1, 1, 1), mlp_dim=(196, 392, 768, 768), head_num=(1, 2, 4, 8)),
    "contnet_s": ConTNetConfig(inplanes=64, layers=(1, 1, 1, 1), mlp_dim=(256, 512, 1024, 1024), head_num=(1, 2, 4, 8)),
    "contnet_m": ConTNetConfig(inplanes=64, layers=(2, 2, 2, 2), mlp_dim=(256, 512, 1024, 1024), head_num=(1, 2, 4, 8)),
    "contnet_b": ConTNetConfig(
        inplanes=64,
        layers=(3, 4, 6, 3),
        mlp_dim=(256, 512, 1024, 1024),
        head_num=(1, 2, 4, 8),
        dropout=(0.0, 0.0, 0.1, 0.1),
        last_dropout=0.2,
        avg_down=True,
    ),
}
"""The four published variants, as in the ConTNet paper and code.

``avg_down`` is the network of the variant's published download, built when no
checkpoint says otherwise: ``contnet_b.pth`` is spelled ``downsample.conv.conv``
(avg-down), ``contnet_m.pth`` ``downsample.conv`` (strided); Ti and S have no
stable download and keep the authors' default (strided). A loaded checkpoint's own spelling decides.
"""


def list_contnet_variants() -> list[str]:
    """The variant names, as ``timm.create_model`` accepts them once :mod:`.timm_contnet` is imported."""
    return sorted(CONTNET_CFGS)


def is_contnet(backbone: str) -> bool:
    """Whether ``backbone`` names one of the ConTNet variants (the backbones with two shortcut networks)."""
    return backbone in CONTNET_CFGS


_SHORTCUT_KEY = re.compile(r"^layer(?P<stage>[1-4])\.ConTBlock\d+\.downsample\.conv\.(?P<pooled>conv\.)?weight$")


def shortcut_of_state_dict(state_dict: Iterable[str]) -> bool | None:
    """Which shortcut network a state_dict (or its keys) belongs to: the ``avg_down`` to build.

    True for the avg-down spelling (``downsample.conv.conv.weight``), False for
    the strided one (``downsample.conv.weight`` in a stride-2 block), None when
    no such key is present (a partial dict). Stage 4's stride-1 shortcut is
    spelled ``downsample.conv.weight`` in both networks and says nothing.

    Raises:
        ValueError: when both spellings occur, which no ConTNet can hold.
    """
    spelled: dict[bool, list[str]] = {True: [], False: []}
    for key in state_dict:
        match = _SHORTCUT_KEY.match(key)
        if match and (match["pooled"] or STAGE_STRIDES[int(match["stage"]) - 1] > 1):
            spelled[match["pooled"] is not None].append(key)
    if spelled[True] and spelled[False]:
        msg = (
            f"the checkpoint mixes both shortcut spellings ({spelled[True][0]}: avg_down, "
            f"{spelled[False][0]}: strided); they belong to two different networks, so no ConTNet can load it. "
            f"The file was edited or assembled from two models: use an original checkpoint."
        )
        raise ValueError(msg)
    if not (spelled[True] or spelled[False]):
        return None
    return bool(spelled[True])
