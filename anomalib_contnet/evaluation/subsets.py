"""The data every benchmark job (and the demo) sees: a fixed, seeded subset of one MVTec AD-layout category.

Two steps, both reproducible:

1. :func:`ensure_category` makes sure ``data_root/<category>`` exists. A folder that
   is already there is used as it is (a real MVTec AD category, or one prepared
   earlier with other options), so running a benchmark never rewrites a user's
   data; a missing offline category (ELPV, textures) is prepared with the package
   defaults, so two machines that start empty get the same images.
2. :func:`materialise_subset` copies at most ``max_train`` training images and
   ``max_test`` test images (half normal, half anomalous where there are enough) into
   a folder of its own, picked by a seeded hash order of the file names. Every job
   then reads exactly the same files, and the subset can be inspected afterwards.

Whether pixel metrics mean anything is decided here too: ELPV labels whole cells,
so its masks (which cover the whole image) carry no localisation information.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from anomalib_contnet.data import (
    ELPV_CATEGORIES,
    MANIFEST_NAME,
    TEXTURE_CATEGORIES,
    DatasetPrepareError,
    prepare_elpv,
    prepare_textures,
)
from anomalib_contnet.data.elpv import seeded_order
from anomalib_contnet.data.layout import CategoryWriter
from anomalib_contnet.evaluation.paper import MVTEC_AD_OBJECTS, MVTEC_AD_TEXTURES

__all__ = [
    "CategorySubset",
    "ensure_category",
    "materialise_subset",
    "offline_categories",
    "whole_category",
]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
"""File types anomalib's MVTecAD datamodule reads as images."""
WHOLE_IMAGE_LABELS = "whole image"
"""The manifest's ``pixel_labels`` value of categories whose masks only repeat the image label (ELPV)."""


def offline_categories() -> list[str]:
    """Categories this package can prepare with no network: ELPV solar cells and the texture photographs."""
    return [*ELPV_CATEGORIES, *TEXTURE_CATEGORIES]


@dataclass(frozen=True)
class CategorySubset:
    """A subset written by :func:`materialise_subset`: where it is and what it holds."""

    root: Path
    """Pass as ``MVTecAD(root=...)``."""
    category: str
    source: Path
    """The full category folder the images were copied from."""
    counts: dict[str, int]
    """Images per ``<split>/<label>`` folder of the subset."""
    pixel_labels: bool
    """Whether the masks locate the defects (False for whole-image masks such as ELPV's)."""

    @property
    def n_train(self) -> int:
        """Number of training images."""
        return self.counts.get("train/good", 0)

    @property
    def n_test_normal(self) -> int:
        """Number of normal test images."""
        return self.counts.get("test/good", 0)

    @property
    def n_test_anomalous(self) -> int:
        """Number of anomalous test images (all defect folders together)."""
        return sum(
            count for folder, count in self.counts.items() if folder.startswith("test/") and folder != "test/good"
        )


def ensure_category(data_root: Path | str, category: str) -> Path:
    """Return ``data_root/category``, preparing an offline category with the package defaults if it is missing.

    Raises:
        DatasetPrepareError: when the folder is missing and this package cannot make it offline.
    """
    data_root = Path(data_root).expanduser()
    folder = data_root / category
    if folder.is_dir() and any(folder.iterdir()):
        return folder
    if category in ELPV_CATEGORIES:
        prepare_elpv(data_root, categories=[category])
    elif category in TEXTURE_CATEGORIES:
        prepare_textures(data_root, categories=[category])
    else:
        msg = (
            f"{folder} does not exist, and {category!r} is not a category this tool can prepare offline "
            f"({', '.join(offline_categories())}). Put an MVTec AD-layout folder there "
            "(train/good, test/<defect>, ground_truth/<defect>/<name>_mask.png) or choose an offline category."
        )
        if category in (*MVTEC_AD_TEXTURES, *MVTEC_AD_OBJECTS):
            msg += (
                f" {category!r} is an MVTec AD category: download MVTec AD "
                "(https://www.mvtec.com/company/research/datasets/mvtec-ad) and extract it so that "
                f"{folder}/train/good exists."
            )
        raise DatasetPrepareError(msg)
    return folder


def materialise_subset(
    source: Path | str,
    subset_root: Path | str,
    *,
    max_train: int,
    max_test: int,
    seed: int = 0,
    train_seed: int | None = None,
) -> CategorySubset:
    """Copy a seeded subset of the category folder ``source`` to ``subset_root/<same name>``.

    The test part takes ``max_test // 2`` normal images and fills the rest with anomalous
    ones (drawn across all defect folders), each capped by what exists, so image AUROC is
    measured on a balanced set whenever the source allows it. Masks follow their images.
    A size of 0 means every image of that split (the full protocol). ``train_seed`` (default
    ``seed``) draws the training images alone, so that several draws share one test set.

    Raises:
        DatasetPrepareError: for a folder that is not in MVTec AD layout, or negative sizes.
    """
    source = Path(source).expanduser()
    for value, what in ((max_train, "max_train"), (max_test, "max_test")):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            msg = f"{what} must be a non-negative integer (0 = every image), got {value!r}"
            raise DatasetPrepareError(msg)
    if max_test == 1:
        msg = "max_test must be 0 (every image) or at least 2 (one normal and one anomalous image), got 1"
        raise DatasetPrepareError(msg)
    train, test_normal, test_anomalous = _split_images(source)
    chosen_train = _seeded_pick(train, source, max_train or len(train), seed if train_seed is None else train_seed)
    n_normal = len(test_normal) if max_test == 0 else min(len(test_normal), max_test // 2)
    n_anomalous = len(test_anomalous) if max_test == 0 else min(len(test_anomalous), max_test - n_normal)
    chosen_normal = _seeded_pick(test_normal, source, n_normal, seed)
    chosen_anomalous = _seeded_pick(test_anomalous, source, n_anomalous, seed)

    pixel_labels = _has_pixel_labels(source)
    counts: dict[str, int] = {}
    with CategoryWriter(subset_root, source.name) as writer:
        for image in [*chosen_train, *chosen_normal, *chosen_anomalous]:
            relative = image.relative_to(source).as_posix()
            writer.write_bytes(relative, image.read_bytes())
            folder = relative.rsplit("/", 1)[0]
            counts[folder] = counts.get(folder, 0) + 1
        for image in chosen_anomalous:
            mask = _mask_of(source, image)
            writer.write_bytes(mask.relative_to(source).as_posix(), mask.read_bytes())
        description = {
            "kind": "subset",
            "source": str(source.resolve()),
            "seed": seed,
            "options": {"max_train": max_train, "max_test": max_test, "train_seed": train_seed},
            "pixel_labels": "from masks" if pixel_labels else WHOLE_IMAGE_LABELS,
        }
        writer.publish(description, dict(sorted(counts.items())))
    return CategorySubset(
        root=Path(subset_root).expanduser(),
        category=source.name,
        source=source,
        counts=dict(sorted(counts.items())),
        pixel_labels=pixel_labels,
    )


def whole_category(source: Path | str) -> CategorySubset:
    """The category folder ``source`` as it is, every image, nothing copied (the full protocol).

    Raises:
        DatasetPrepareError: for a folder that is not in MVTec AD layout or lacks a mask.
    """
    source = Path(source).expanduser()
    train, test_normal, test_anomalous = _split_images(source)
    for image in test_anomalous:
        _mask_of(source, image)
    counts: dict[str, int] = {}
    for image in [*train, *test_normal, *test_anomalous]:
        folder = image.parent.relative_to(source).as_posix()
        counts[folder] = counts.get(folder, 0) + 1
    return CategorySubset(
        root=source.parent,
        category=source.name,
        source=source,
        counts=dict(sorted(counts.items())),
        pixel_labels=_has_pixel_labels(source),
    )


def _split_images(source: Path) -> tuple[list[Path], list[Path], list[Path]]:
    """Training, normal test and anomalous test images of an MVTec AD-layout category, each non-empty."""
    train = _images(source / "train" / "good")
    test_normal = _images(source / "test" / "good")
    test_anomalous = [
        path
        for folder in sorted((source / "test").iterdir() if (source / "test").is_dir() else [])
        if folder.is_dir() and folder.name != "good"
        for path in _images(folder)
    ]
    for what, found in (("train/good", train), ("test/good", test_normal), ("test/<defect>", test_anomalous)):
        if not found:
            msg = (
                f"{source} has no images in {what}; it is not an MVTec AD-layout category with normal and defect images"
            )
            raise DatasetPrepareError(msg)
    return train, test_normal, test_anomalous


def _images(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(path for path in folder.iterdir() if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES)


def _seeded_pick(paths: list[Path], source: Path, count: int, seed: int) -> list[Path]:
    """The first ``count`` paths in the seeded hash order of their names relative to ``source``."""
    by_name = {path.relative_to(source).as_posix(): path for path in paths}
    return [by_name[name] for name in seeded_order(list(by_name), seed)[:count]]


def _mask_of(source: Path, image: Path) -> Path:
    """``ground_truth/<defect>/<stem>_mask.png``, the MVTec AD convention anomalib's MVTecAD datamodule expects."""
    mask = source / "ground_truth" / image.parent.name / f"{image.stem}_mask.png"
    if not mask.is_file():
        msg = f"{image} has no mask {mask}; MVTec AD layout needs one mask per anomalous test image"
        raise DatasetPrepareError(msg)
    return mask


def _has_pixel_labels(source: Path) -> bool:
    """False when the category's manifest says its masks only repeat the image label (ELPV)."""
    manifest = source / MANIFEST_NAME
    if not manifest.is_file():
        return True  # a real MVTec AD folder: its masks locate the defects
    try:
        description = json.loads(manifest.read_text(encoding="utf-8")).get("description", {})
    except (OSError, ValueError) as error:
        msg = f"{manifest} is unreadable ({error}); re-prepare {source} or remove the manifest"
        raise DatasetPrepareError(msg) from error
    return description.get("pixel_labels") != WHOLE_IMAGE_LABELS
