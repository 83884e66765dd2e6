"""The choices the paper leaves open, and the one-at-a-time grid around its setting.

The paper fixes ConTNet-B, "the third and fourth blocks", 224x224 input and a
bilinear upsampling plus Gaussian blur, but not which stages those blocks are,
whether images are centre-cropped, the covariance regulariser epsilon, or at which
resolution pixel AUROC is computed. Each :class:`Variant` changes exactly one of
these from :data:`PAPER_VARIANT`; the grid is never their full product.

Layer choices are written with ConTNet's stage names. Backbones with other names
map them through :data:`STAGE_EQUIVALENTS`, so the same choice ("the two deepest
stages", "one stage finer", "all three") can be asked of every ConTNetPaDiM backbone.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Literal

from anomalib_contnet.models.contnet_padim.feature_extractor import is_contnet
from anomalib_contnet.models.contnet_padim.lightning_model import ConTNetPaDiM

__all__ = [
    "PAPER_VARIANT",
    "STAGE_EQUIVALENTS",
    "Variant",
    "ablation_variants",
    "backbone_layers",
]

PixelEval = Literal["input", "native"]

PAPER_EPSILON: float = inspect.signature(ConTNetPaDiM).parameters["epsilon"].default
"""The paper does not state epsilon; ConTNetPaDiM's default (PaDiM's 0.01) stands for it."""
PAPER_LAYERS: tuple[str, ...] = ("layer3", "layer4")
ABLATION_EPSILONS = (1e-3, 1e-2, 1e-1, 1.0)
CROP_RATIO = 256 / 224
"""Resize side over crop side of the usual ImageNet centre crop (256 -> 224)."""

STAGE_EQUIVALENTS: dict[str, dict[str, str]] = {
    # timm exposes blocks.0, .1, .2, .4, .6 (strides 2, 4, 8, 16, 32): the deepest three stand for layer2-4.
    "efficientnet_lite0": {"layer2": "blocks.2", "layer3": "blocks.4", "layer4": "blocks.6"},
}


@dataclass(frozen=True)
class Variant:
    """One setting of the open choices; :data:`PAPER_VARIANT` is the paper's, every other differs in one field."""

    name: str
    """Short label for tables and job folders (``paper``, ``input=448``, ...)."""
    layers: tuple[str, ...] = PAPER_LAYERS
    """In ConTNet stage names; see :func:`backbone_layers`."""
    input_scale: int = 1
    """Input side as a multiple of the run's ``--image-size`` (the paper's 224)."""
    centre_crop: bool = False
    """Resize to ``CROP_RATIO`` times the input side, then cut the centre (masks alike)."""
    epsilon: float = PAPER_EPSILON
    pixel_eval: PixelEval = "input"
    """Pixel AUROC at the model's input size (masks resized, nearest) or at each mask's own size."""

    def crop_resize_side(self, image_size: int) -> int | None:
        """The side images are resized to before the centre crop, or None without a crop."""
        return round(image_size * self.input_scale * CROP_RATIO) if self.centre_crop else None


PAPER_VARIANT = Variant("paper")


def ablation_variants(image_size: int, pixel_labels: bool) -> list[Variant]:
    """The paper's setting, then each open choice changed alone (pixel evaluation only where masks locate defects)."""
    crop_side = round(image_size * CROP_RATIO)
    variants = [
        PAPER_VARIANT,
        Variant("layers=layer2+layer3", layers=("layer2", "layer3")),
        Variant("layers=layer2+layer3+layer4", layers=("layer2", "layer3", "layer4")),
        Variant(f"input={2 * image_size}", input_scale=2),
        Variant(f"crop={crop_side}->{image_size}", centre_crop=True),
        *(
            Variant(f"epsilon={epsilon:g}", epsilon=epsilon)
            for epsilon in ABLATION_EPSILONS
            if epsilon != PAPER_EPSILON  # the paper's value is the paper row
        ),
    ]
    if pixel_labels:
        variants.append(Variant("pixel=native", pixel_eval="native"))
    return variants


def backbone_layers(backbone: str, layers: tuple[str, ...]) -> tuple[str, ...]:
    """ConTNet stage names translated to ``backbone``'s own (unchanged for ConTNet variants).

    Raises:
        ValueError: for a backbone with no entry in :data:`STAGE_EQUIVALENTS` that is not a ConTNet.
    """
    if is_contnet(backbone):
        return layers
    if backbone not in STAGE_EQUIVALENTS:
        msg = f"the layer ablation knows no stage names of {backbone!r}; known: ConTNet, {', '.join(STAGE_EQUIVALENTS)}"
        raise ValueError(msg)
    return tuple(STAGE_EQUIVALENTS[backbone][layer] for layer in layers)
