"""MVTec AD's categories and the paper's own per-category results, for the table's comparison columns.

The numbers are transcribed from Dini & Rahtu (VISAPP 2023), column "Our Method" of
Table 2 (image-level AUROC) and Table 3 (pixel-level AUROC), in percent as printed.
They belong to ConTNet-B with ImageNet weights, ``layer3`` + ``layer4``, 224x224 input.
"""

from __future__ import annotations

__all__ = [
    "MVTEC_AD",
    "MVTEC_AD_OBJECTS",
    "MVTEC_AD_TEXTURES",
    "PAPER_AUROC_PERCENT",
    "expand_categories",
]

MVTEC_AD_TEXTURES: tuple[str, ...] = ("carpet", "grid", "leather", "tile", "wood")
MVTEC_AD_OBJECTS: tuple[str, ...] = (
    "bottle",
    "cable",
    "capsule",
    "hazelnut",
    "metal_nut",
    "pill",
    "screw",
    "toothbrush",
    "transistor",
    "zipper",
)
MVTEC_AD = "mvtec_ad"
"""``--categories`` shorthand for all 15 MVTec AD categories (objects first, as in the paper's tables)."""

PAPER_AUROC_PERCENT: dict[str, tuple[float, float]] = {
    # category: (image AUROC, Table 2; pixel AUROC, Table 3), "Our Method" column, percent.
    "bottle": (100.0, 96.7),
    "cable": (99.4, 97.5),
    "capsule": (95.9, 97.4),
    "hazelnut": (100.0, 97.8),
    "metal_nut": (99.8, 96.4),
    "pill": (95.6, 93.7),
    "screw": (92.2, 96.8),
    "toothbrush": (91.7, 97.6),
    "transistor": (99.8, 98.5),
    "zipper": (97.4, 96.2),
    "carpet": (100.0, 99.3),
    "grid": (98.3, 96.5),
    "leather": (100.0, 98.6),
    "tile": (99.9, 93.4),
    "wood": (99.1, 92.9),
}
"""Averages printed in the paper: image 97.2 objects / 99.4 textures / 97.9 all; pixel 96.9 / 96.1 / 96.6."""


def expand_categories(names: list[str]) -> list[str]:
    """Replace the shorthand ``mvtec_ad`` by its 15 categories; keep the order, drop repeats."""
    expanded: list[str] = []
    for name in names:
        expanded += [*MVTEC_AD_OBJECTS, *MVTEC_AD_TEXTURES] if name == MVTEC_AD else [name]
    return list(dict.fromkeys(expanded))
