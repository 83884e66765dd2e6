"""The frozen backbone: feature maps of chosen stages of any timm model, ConTNet included.

Every backbone, ConTNet's ``contnet_*`` variants as much as resnets or
EfficientNets, is built by ``timm.create_model(..., features_only=True)``
(:mod:`anomalib_contnet.backbones.timm_contnet` registers ConTNet there), so
there is one feature path to export, test and time. The backbone is kept in
eval mode for good: batch-norm statistics and dropout of a pretrained network
must not change while Gaussians are fitted.

Extractors are always built with seeded untrained weights; the pretrained ones
are loaded by :meth:`FrozenFeatureExtractor.load_pretrained`, which the model
calls only when it is about to be fitted. A trained checkpoint holds every
backbone weight, so loading one (``load_from_checkpoint``, ``--ckpt_path``)
never looks for the ImageNet file: it works offline, after that file is gone.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import timm
import torch
from torch import nn

from anomalib_contnet.backbones import timm_contnet  # noqa: F401  (registers contnet_* with timm)
from anomalib_contnet.backbones.contnet_configs import list_contnet_variants, shortcut_of_state_dict
from anomalib_contnet.backbones.weight_files import WeightsError

__all__ = ["FrozenFeatureExtractor", "build_feature_extractor", "is_contnet"]

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

SHORTCUT_NAMES = {True: "avg_down", False: "strided"}
"""How :attr:`FrozenFeatureExtractor.shortcut` (and the checkpoint's ``shortcut`` hyper-parameter) names a shortcut."""


def is_contnet(backbone: str) -> bool:
    """Whether ``backbone`` names one of this package's ConTNet variants."""
    return backbone in list_contnet_variants()


class FrozenFeatureExtractor(nn.Module):
    """Features of a timm model's stages, selected by the module names timm reports in ``feature_info``.

    The backbone holds every stage up to the deepest requested one and nothing
    after it (timm drops the rest), and returns all of their maps, so that
    :meth:`stage_outputs` can show where NaN/Inf first appear without a second
    network; :meth:`forward` keeps the requested ones. ConTNet's stages are
    named ``layer0`` .. ``layer4``.

    Attributes:
        name: the timm model name.
        layers: the requested layer names, in the order their channels are concatenated.
        out_channels: channels of each requested layer.
        normalization: (mean, std) the backbone was trained with (its ``pretrained_cfg``), for the pre-processor.
        weights: explicit checkpoint (path, or URL for ConTNet) of the pretrained weights, or None for the
            default lookup (ConTNet: file variable, cache, published URL; other models: the Hugging Face Hub).
        wants_pretrained: whether fitting needs pretrained weights (False: the seeded untrained features are used).
    """

    def __init__(self, name: str, layers: Sequence[str], pre_trained: bool, weights: str | None) -> None:
        super().__init__()
        self.name = name
        self.weights = weights
        self.wants_pretrained = pre_trained or weights is not None
        self.out_indices: tuple[int, ...] | None = None  # None: timm's default, the first five feature stages
        init_state = torch.random.get_rng_state()
        self.backbone = self._create(pretrained=False)
        available = self.backbone.feature_info.module_name()
        missing = [layer for layer in layers if layer not in available]
        if missing:
            msg = f"backbone {name!r} has no feature layer(s) {missing}; its feature layers are {available}"
            raise ValueError(msg)
        self.layers = tuple(layers)
        held = max(available.index(layer) for layer in self.layers) + 1
        if held < len(available):  # drop the stages after the deepest requested one
            self.out_indices = tuple(self.backbone.feature_info.out_indices[:held])
            torch.random.set_rng_state(init_state)  # the same random state gives the held stages the same weights
            self.backbone = self._create(pretrained=False)
        self._positions = {layer: available.index(layer) for layer in self.layers}  # in the backbone's output list
        channels = self.backbone.feature_info.channels()
        self.out_channels = {layer: channels[position] for layer, position in self._positions.items()}
        config = self.backbone.pretrained_cfg
        self.normalization = (
            tuple(config.get("mean", IMAGENET_MEAN)),
            tuple(config.get("std", IMAGENET_STD)),
        )
        self.eval()

    def _create(self, pretrained: bool, **architecture: Any) -> nn.Module:
        """Build the feature network; ``architecture`` reaches the model's constructor (ConTNet: ``avg_down``)."""
        overlay = {"file": str(self.weights)} if pretrained and self.weights is not None else None
        indices = {} if self.out_indices is None else {"out_indices": self.out_indices}
        return timm.create_model(
            self.name,
            features_only=True,
            exportable=True,
            pretrained=pretrained,
            pretrained_cfg_overlay=overlay,
            **indices,
            **architecture,
        )

    def _device(self) -> torch.device:
        return next(self.backbone.parameters()).device

    @property
    def shortcut(self) -> str | None:
        """ConTNet's down-sampling shortcut as built, ``"avg_down"`` or ``"strided"``, read from the held keys.

        None for other backbones, and for a ConTNet that holds no stride-2 block
        (``layer0`` only), where the two networks compute the same features.
        """
        if not is_contnet(self.name):
            return None
        avg_down = shortcut_of_state_dict(name for name, _ in self.backbone.named_parameters())
        return None if avg_down is None else SHORTCUT_NAMES[avg_down]

    def train(self, mode: bool = True) -> FrozenFeatureExtractor:  # noqa: ARG002 (frozen by design)
        """Stay in eval mode whatever Lightning asks: the backbone is a fixed, pretrained feature map."""
        return super().train(False)

    def load_pretrained(self) -> None:
        """Replace the untrained backbone by the pretrained one, on the same device.

        ConTNet's weights come from ``weights`` or the package's lookup, and the
        file's shortcut spelling decides which network is built; its errors
        (:class:`~anomalib_contnet.backbones.weight_files.WeightsError`) already
        say what to do. Other models load ``weights`` when given, else timm's own source (the Hub).
        """
        try:
            backbone = self._create(pretrained=True)
        except WeightsError:
            raise
        except Exception as error:
            msg = (
                f"could not load pretrained weights for timm model {self.name!r} ({error}). Pass weights=<local file> "
                "(a timm state_dict), make the Hugging Face Hub reachable, or pass pre_trained=False for untrained "
                "features."
            )
            raise RuntimeError(msg) from error
        self.backbone = backbone.to(self._device()).eval()

    def match_saved_architecture(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Rebuild the backbone when ``state_dict`` (keys relative to the backbone) is another architecture.

        Only ConTNet has two architectures for one name (its shortcut): a model
        fitted on avg-down ImageNet weights saves avg-down keys, while a model
        constructed from command-line arguments before its checkpoint is loaded
        starts from the variant's default architecture, so it must follow the
        checkpoint here rather than rename keys into another computation.
        """
        if not is_contnet(self.name):
            return
        avg_down = shortcut_of_state_dict(state_dict)
        if avg_down is None or SHORTCUT_NAMES[avg_down] == self.shortcut:
            return
        self.backbone = self._create(pretrained=False, avg_down=avg_down).to(self._device()).eval()

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Return {layer: (B, C, h, w)} for the requested layers."""
        maps = self.backbone(images)
        return {layer: maps[position] for layer, position in self._positions.items()}

    def stage_outputs(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Outputs of every feature stage up to the deepest requested one, in execution order.

        Used only to locate the stage where NaN/Inf first appear, after a check found some.
        """
        return dict(zip(self.backbone.feature_info.module_name(), self.backbone(images), strict=True))


UNTRAINED_INIT_SEED = 0
"""Seed of the random initialisation of untrained backbones, so their features (and scores) are reproducible."""


def build_feature_extractor(
    backbone: str, layers: Sequence[str], pre_trained: bool, weights: str | None
) -> FrozenFeatureExtractor:
    """The one place that turns a backbone name into a frozen feature extractor.

    The backbone starts untrained, initialised from a fixed seed without touching
    the global random state: the same settings always give the same features, so
    runs with untrained features (``pre_trained=False`` and no ``weights``) are
    comparable. Pretrained weights come later, from :meth:`FrozenFeatureExtractor.load_pretrained`.
    """
    if not layers:
        msg = "layers must name at least one backbone stage"
        raise ValueError(msg)
    source, _ = timm.models.parse_model_name(backbone)
    if source is None and not timm.is_model(backbone):  # hf-hub:/local-dir: names go to timm as they are
        msg = (
            f"unknown backbone {backbone!r}: neither a ConTNet variant ({', '.join(list_contnet_variants())}) "
            "nor a timm model name (see timm.list_models())"
        )
        raise ValueError(msg)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(UNTRAINED_INIT_SEED)
        return FrozenFeatureExtractor(backbone, layers, pre_trained, weights)
