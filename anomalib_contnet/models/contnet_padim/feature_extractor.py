"""The frozen backbone: feature maps of chosen stages of any timm model, ConTNet included.

Every backbone is built by ``timm.create_model(..., features_only=True)``, so there is one
feature path to export, test and time. ``pre_trained`` loads the ImageNet weights when it is
built; an untrained one starts from seeded weights, and can take the pretrained ones later
(:meth:`FrozenFeatureExtractor.load_pretrained`: the Lightning model does so when a fit starts,
so that a trained checkpoint, which holds every backbone weight, never needs the ImageNet file).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import timm
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import nn

from anomalib_contnet.backbones import timm_contnet  # noqa: F401  (registers contnet_* with timm)
from anomalib_contnet.backbones.contnet_configs import is_contnet, shortcut_name, shortcut_of_state_dict

__all__ = ["FrozenFeatureExtractor", "build_feature_extractor"]


UNTRAINED_INIT_SEED = 0
"""Seed of the random initialisation of untrained backbones, so their features (and scores) are reproducible."""


class FrozenFeatureExtractor(nn.Module):
    """Features of a timm model's stages, selected by the module names timm reports in ``feature_info``.

    The backbone holds the stages up to the deepest requested one (timm drops the rest); it
    stays in eval mode for good, as a pretrained network's batch-norm statistics must not change.

    Attributes:
        name: the timm model name.
        layers: the requested layer names, in the order their channels are concatenated.
        out_channels: channels of each requested layer.
        normalization: (mean, std) the backbone was trained with (its ``pretrained_cfg``), for the pre-processor.
    """

    def __init__(self, name: str, layers: Sequence[str], pre_trained: bool, weights: str | None) -> None:
        super().__init__()
        self.name = name
        with torch.device("meta"):  # only to read the stages: costs neither memory nor random numbers
            info = timm.create_model(name, features_only=True).feature_info
        available = info.module_name()
        missing = [layer for layer in layers if layer not in available]
        if missing or not layers:
            msg = f"backbone {name!r} has no feature layer(s) {missing}; its feature layers are {available}"
            raise ValueError(msg)
        self.layers = tuple(layers)
        held = max(available.index(layer) for layer in self.layers) + 1
        self.out_indices = tuple(info.out_indices[:held])  # timm drops the stages after the deepest requested one
        self._positions = {layer: available.index(layer) for layer in self.layers}  # in the backbone's output list
        self.out_channels = {layer: info.channels()[position] for layer, position in self._positions.items()}
        self.min_input_side = max(info.reduction()[position] for position in self._positions.values())
        self.backbone = (
            self._create_pretrained(weights) if pre_trained or weights is not None else self._create_untrained()
        )
        config = self.backbone.pretrained_cfg
        self.normalization = (
            tuple(config.get("mean", IMAGENET_DEFAULT_MEAN)),
            tuple(config.get("std", IMAGENET_DEFAULT_STD)),
        )
        self.eval()

    def _create_untrained(self, **architecture: Any) -> nn.Module:
        """Build the feature network with initial weights; ``architecture`` reaches ConTNet's ``avg_down``."""
        return timm.create_model(
            self.name, features_only=True, out_indices=self.out_indices, exportable=True, **architecture
        )

    def _create_pretrained(self, weights: str | None) -> nn.Module:
        """Build the feature network with pretrained weights from ``weights`` or the default lookup.

        ``weights`` is a path (or a URL for ConTNet); None is the lookup (ConTNet: file
        variable, cache, published URL; other models: timm's own source).
        """
        overlay = {"file": str(weights)} if weights is not None else None
        try:
            return timm.create_model(
                self.name,
                features_only=True,
                out_indices=self.out_indices,
                exportable=True,
                pretrained=True,
                pretrained_cfg_overlay=overlay,
            )
        except OSError as error:
            if is_contnet(self.name):  # ConTNet's lookup says where to put the file already
                raise
            msg = (
                f"could not get the pretrained weights of {self.name} from timm's source ({error}). Offline, pass a "
                f"local copy with --model.weights FILE (a timm state dict of {self.name}), or use "
                "--model.pre_trained false for untrained features (useful only for tests)."
            )
            raise OSError(msg) from error

    def refuse_input_size(self, image_size: Sequence[int]) -> None:
        """Raise ValueError unless both sides of ``image_size`` leave room for one cell of the deepest layer."""
        if min(image_size) < self.min_input_side:
            msg = (
                f"image_size {tuple(image_size)} is too small for {self.name}: each side must be at least "
                f"{self.min_input_side} px (the stride of the deepest requested layer, which then gives one patch)"
            )
            raise ValueError(msg)

    def _replace_backbone(self, backbone: nn.Module) -> None:
        self.backbone = backbone.to(next(self.backbone.parameters()).device).eval()

    @property
    def shortcut(self) -> str | None:
        """ConTNet's down-sampling shortcut as built, ``"avg_down"`` or ``"strided"``, read from the held keys.

        None for other backbones, and for a ConTNet that holds no stride-2 block
        (``layer0`` only), where the two networks compute the same features.
        """
        if not is_contnet(self.name):
            return None
        avg_down = shortcut_of_state_dict(name for name, _ in self.backbone.named_parameters())
        return None if avg_down is None else shortcut_name(avg_down)

    def train(self, mode: bool = True) -> FrozenFeatureExtractor:  # noqa: ARG002 (frozen by design)
        """Stay in eval mode whatever Lightning asks: the backbone is a fixed, pretrained feature map."""
        return super().train(False)

    def load_pretrained(self, weights: str | None = None) -> None:
        """Replace the backbone by the pretrained one (from ``weights``, else the default lookup), same device.

        ConTNet's weights come from the package's lookup, whose
        :class:`~anomalib_contnet.backbones.weight_files.WeightsError` says what to do;
        the file's keys decide which shortcut network is built.
        """
        self._replace_backbone(self._create_pretrained(weights))

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
        if avg_down is not None and shortcut_name(avg_down) != self.shortcut:
            self._replace_backbone(self._create_untrained(avg_down=avg_down))

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Return {layer: (B, C, h, w)} for the requested layers."""
        maps = self.backbone(images)
        return {layer: maps[position] for layer, position in self._positions.items()}


def build_feature_extractor(
    backbone: str, layers: Sequence[str], pre_trained: bool, weights: str | None
) -> FrozenFeatureExtractor:
    """The one place that turns a backbone name into a frozen feature extractor.

    An untrained backbone is initialised from a fixed seed without touching the global
    random state: the same settings always give the same features, so runs with
    untrained features (``pre_trained=False`` and no ``weights``) are comparable.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(UNTRAINED_INIT_SEED)
        return FrozenFeatureExtractor(backbone, layers, pre_trained, weights)
