"""Frozen backbones that return the feature maps of chosen stages.

ConTNet variants (``contnet_*``) come from :mod:`anomalib_contnet.backbones`;
any other name is a timm model, so the same Gaussian pipeline can compare
backbones. Both are kept in eval mode for good: batch-norm statistics and
dropout of a pretrained network must not change while Gaussians are fitted.

Extractors are always built with seeded untrained weights; the pretrained ones
are loaded by :meth:`FrozenFeatureExtractor.load_pretrained`, which the model
calls only when it is about to be fitted. A trained checkpoint holds every
backbone weight, so loading one (``load_from_checkpoint``, ``--ckpt_path``)
never looks for the ImageNet file: it works offline, after that file is gone.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import timm
import torch
from torch import nn

from anomalib_contnet.backbones.contnet import STAGE_NAMES, create_contnet
from anomalib_contnet.backbones.contnet_configs import list_contnet_variants, shortcut_of_state_dict

__all__ = ["FrozenFeatureExtractor", "build_feature_extractor", "is_contnet"]

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def is_contnet(backbone: str) -> bool:
    """Whether ``backbone`` names one of this package's ConTNet variants."""
    return backbone in list_contnet_variants()


class FrozenFeatureExtractor(nn.Module):
    """Base for feature extractors: always in eval mode, features in a dict keyed by layer name.

    Attributes:
        layers: the requested layer names, in the order their channels are concatenated.
        out_channels: channels of each requested layer.
        normalization: (mean, std) the backbone was trained with, for the pre-processor.
        weights: explicit checkpoint (path or URL) of the pretrained weights, or None for the default lookup.
        wants_pretrained: whether fitting needs pretrained weights (False: the seeded untrained features are used).
    """

    layers: tuple[str, ...]
    out_channels: dict[str, int]
    normalization: tuple[tuple[float, ...], tuple[float, ...]]
    backbone: nn.Module

    def __init__(self, pre_trained: bool, weights: str | None) -> None:
        super().__init__()
        self.weights = weights
        self.wants_pretrained = pre_trained or weights is not None

    def load_pretrained(self) -> None:
        """Replace the untrained backbone by the pretrained one (on the same device); subclasses say how."""
        raise NotImplementedError

    def match_saved_architecture(self, state_dict: Mapping[str, torch.Tensor]) -> None:  # noqa: ARG002
        """Rebuild the backbone when a saved state (keys relative to the backbone) needs another architecture.

        Only ConTNet has two architectures for one variant; timm backbones need nothing.
        """
        return

    def _device(self) -> torch.device:
        return next(self.backbone.parameters()).device

    def train(self, mode: bool = True) -> FrozenFeatureExtractor:  # noqa: ARG002 (frozen by design)
        """Stay in eval mode whatever Lightning asks: the backbone is a fixed, pretrained feature map."""
        return super().train(False)

    def stage_outputs(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Outputs of every stage up to the deepest requested one, in execution order.

        Used only to locate the stage where NaN/Inf first appear, after a check
        found some; this base version can only show the requested layers.
        """
        return self(images)


class ConTNetFeatures(FrozenFeatureExtractor):
    """Features of chosen ConTNet stages; stages after the deepest requested one are never run."""

    def __init__(self, variant: str, layers: Sequence[str], pre_trained: bool, weights: str | None) -> None:
        super().__init__(pre_trained, weights)
        unknown = [layer for layer in layers if layer not in STAGE_NAMES]
        if unknown:
            msg = f"unknown ConTNet layer(s) {unknown}; choose from {list(STAGE_NAMES)}"
            raise ValueError(msg)
        self.variant = variant
        self.layers = tuple(layers)
        self.backbone = create_contnet(variant, num_classes=0)
        self.out_channels = {layer: self.backbone.stage_channels[layer] for layer in self.layers}
        self.normalization = (IMAGENET_MEAN, IMAGENET_STD)
        self.eval()

    @property
    def shortcut(self) -> str:
        """Shortcut of the down-sampling blocks the backbone was built with: ``"avg_down"`` or ``"strided"``."""
        return "avg_down" if self.backbone.config.avg_down else "strided"

    def load_pretrained(self) -> None:
        """Build the backbone the checkpoint file was trained as (its shortcut spelling decides) and load it."""
        backbone = create_contnet(self.variant, pretrained=True, weights=self.weights, num_classes=0)
        self.backbone = backbone.to(self._device()).eval()

    def match_saved_architecture(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Rebuild the backbone with the shortcut that ``state_dict`` was saved with, if it differs.

        A model fitted on avg-down ImageNet weights saves avg-down keys; a model
        constructed from command-line arguments before its checkpoint is loaded
        starts from the variant's default architecture, so it must follow the
        checkpoint here rather than rename keys into another computation.
        """
        avg_down = shortcut_of_state_dict(state_dict)
        if avg_down is None or avg_down == self.backbone.config.avg_down:
            return
        backbone = create_contnet(self.variant, avg_down=avg_down, num_classes=0)
        self.backbone = backbone.to(self._device()).eval()

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Return {layer: (B, C, h, w)} for the requested layers."""
        return self.backbone.forward_stages(images, self.layers)

    def stage_outputs(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every ConTNet stage from the stem to the deepest requested one, in execution order."""
        deepest = max(STAGE_NAMES.index(layer) for layer in self.layers)
        return self.backbone.forward_stages(images, STAGE_NAMES[: deepest + 1])


class TimmFeatures(FrozenFeatureExtractor):
    """Features of a timm model, selected by the module names timm reports in ``feature_info``.

    ``weights`` is a local checkpoint file for offline use (timm's
    ``pretrained_cfg_overlay=dict(file=...)``); without it timm downloads from
    the Hugging Face Hub.
    """

    def __init__(self, name: str, layers: Sequence[str], pre_trained: bool, weights: str | None) -> None:
        super().__init__(pre_trained, weights)
        available = timm.create_model(name, features_only=True, pretrained=False).feature_info.module_name()
        missing = [layer for layer in layers if layer not in available]
        if missing:
            msg = f"timm model {name!r} has no feature layer(s) {missing}; its feature layers are {available}"
            raise ValueError(msg)
        self.name = name
        self.layers = tuple(layers)
        self.out_indices = tuple(available.index(layer) for layer in layers)
        self.backbone = self._create(pretrained=False)
        names = self.backbone.feature_info.module_name()
        self.out_channels = dict(zip(names, self.backbone.feature_info.channels(), strict=True))
        config = self.backbone.pretrained_cfg
        self.normalization = (
            tuple(config.get("mean", IMAGENET_MEAN)),
            tuple(config.get("std", IMAGENET_STD)),
        )
        self.eval()

    def _create(self, pretrained: bool) -> nn.Module:
        overlay = {"file": str(self.weights)} if pretrained and self.weights is not None else None
        return timm.create_model(
            self.name,
            features_only=True,
            exportable=True,
            pretrained=pretrained,
            pretrained_cfg_overlay=overlay,
            out_indices=self.out_indices,
        )

    def load_pretrained(self) -> None:
        """Load the timm model's pretrained weights: ``weights`` when given, else timm's own source (the Hub)."""
        try:
            backbone = self._create(pretrained=True)
        except Exception as error:
            msg = (
                f"could not load pretrained weights for timm model {self.name!r} ({error}). Pass weights=<local file> "
                "(a timm state_dict), make the Hugging Face Hub reachable, or pass pre_trained=False for untrained "
                "features."
            )
            raise RuntimeError(msg) from error
        self.backbone = backbone.to(self._device()).eval()

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Return {layer: (B, C, h, w)} for the requested layers."""
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
    if source is None and not is_contnet(backbone) and not timm.is_model(backbone):  # hf-hub:/local-dir: go to timm
        msg = (
            f"unknown backbone {backbone!r}: neither a ConTNet variant ({', '.join(list_contnet_variants())}) "
            "nor a timm model name (see timm.list_models())"
        )
        raise ValueError(msg)
    extractor_class = ConTNetFeatures if is_contnet(backbone) else TimmFeatures
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(UNTRAINED_INIT_SEED)
        return extractor_class(backbone, layers, pre_trained, weights)
