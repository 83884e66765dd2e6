"""The data every benchmark job (and the demo) sees: one MVTec AD-layout category, whole or a seeded subset.

A category folder that exists is used as it is, so a benchmark never rewrites a user's data; a missing
offline one (ELPV, textures) is prepared with the package defaults, so two machines that start empty
get the same images. A subset is a copy of at most ``max_train`` training and ``max_test`` test images
(half normal where there are enough), picked in a seeded hash order of the file names, so every job
reads the same files and they can be inspected afterwards. ELPV labels whole cells: its masks carry no
localisation information, so its categories get no pixel metrics.
"""

from __future__ import annotations

import json
import shutil
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
from anomalib_contnet.data.order import seeded_order
from anomalib_contnet.evaluation.paper import MVTEC_AD_OBJECTS, MVTEC_AD_TEXTURES

__all__ = ["CategorySubset", "ensure_category", "select_images"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
"""File types anomalib's MVTecAD datamodule reads as images."""


@dataclass(frozen=True)
class CategorySubset:
    """The images a job reads: ``MVTecAD(root=root, category=source.name)``."""

    root: Path
    source: Path
    """The full category folder (the same as ``root / category`` for the full protocol)."""
    n_train: int
    n_test_normal: int
    n_test_anomalous: int
    pixel_labels: bool
    """Whether the masks locate the defects (False for whole-image masks such as ELPV's)."""

    @property
    def category(self) -> str:
        """The category folder's name."""
        return self.source.name


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
            f"({', '.join([*ELPV_CATEGORIES, *TEXTURE_CATEGORIES])}). Put an MVTec AD-layout folder there "
            "(train/good, test/<defect>, ground_truth/<defect>/<name>_mask.png) or choose an offline category."
        )
        if category in (*MVTEC_AD_TEXTURES, *MVTEC_AD_OBJECTS):
            msg += (
                " It is an MVTec AD category: download MVTec AD (https://www.mvtec.com/company/research/datasets/"
                f"mvtec-ad) and extract it so that {folder}/train/good exists."
            )
        raise DatasetPrepareError(msg)
    return folder


def select_images(
    source: Path, subset_root: Path, *, max_train: int, max_test: int, seed: int, train_seed: int | None = None
) -> CategorySubset:
    """Every image of ``source`` in place (``max_train == max_test == 0``), else a seeded copy under ``subset_root``.

    A size of 0 means every image of that split. The test part takes ``max_test // 2`` normal images
    and fills the rest with anomalous ones across all defect folders; masks follow their images.
    ``train_seed`` (default ``seed``) draws the training images alone, so several draws share one test set.

    Raises:
        DatasetPrepareError: for a folder that is not in MVTec AD layout, a missing mask, or bad sizes.
    """
    if min(max_train, max_test) < 0 or max_test == 1:
        msg = f"need max_train >= 0 and max_test = 0 (all) or >= 2; got {max_train} and {max_test}"
        raise DatasetPrepareError(msg)
    train = _images(source / "train" / "good")
    normal = _images(source / "test" / "good")
    defect_folders = sorted(path for path in (source / "test").glob("*") if path.is_dir() and path.name != "good")
    anomalous = [image for folder in defect_folders for image in _images(folder)]
    if not (train and normal and anomalous):
        msg = f"{source} has no images in train/good, test/good or test/<defect>; it is not an MVTec AD-layout category"
        raise DatasetPrepareError(msg)
    masks = {image: source / "ground_truth" / image.parent.name / f"{image.stem}_mask.png" for image in anomalous}
    if missing := [str(mask) for mask in masks.values() if not mask.is_file()]:
        msg = f"{source}: MVTec AD layout needs one mask per anomalous test image; missing {missing[:3]}"
        raise DatasetPrepareError(msg)
    if max_train or max_test:
        n_normal = min(len(normal), max_test // 2) if max_test else len(normal)
        n_anomalous = min(len(anomalous), max_test - n_normal) if max_test else len(anomalous)
        train = _seeded_pick(train, source, max_train or len(train), seed if train_seed is None else train_seed)
        normal = _seeded_pick(normal, source, n_normal, seed)
        anomalous = _seeded_pick(anomalous, source, n_anomalous, seed)
        target = subset_root / source.name
        shutil.rmtree(target, ignore_errors=True)  # a fresh copy: the job key covers what the folder holds
        for path in [*train, *normal, *anomalous, *(masks[image] for image in anomalous)]:
            destination = target / path.relative_to(source)
            destination.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, destination)
    root = subset_root if max_train or max_test else source.parent
    return CategorySubset(root, source, len(train), len(normal), len(anomalous), _has_pixel_labels(source))


def _images(folder: Path) -> list[Path]:
    return sorted(path for path in folder.glob("*") if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES)


def _seeded_pick(paths: list[Path], source: Path, count: int, seed: int) -> list[Path]:
    """The first ``count`` paths in the seeded hash order of their names relative to ``source``."""
    by_name = {path.relative_to(source).as_posix(): path for path in paths}
    return [by_name[name] for name in seeded_order(list(by_name), seed)[:count]]


def _has_pixel_labels(source: Path) -> bool:
    """False when the category's manifest says its masks only repeat the image label (ELPV)."""
    manifest = source / MANIFEST_NAME
    if not manifest.is_file():
        return True  # a real MVTec AD folder: its masks locate the defects
    description = json.loads(manifest.read_text(encoding="utf-8")).get("description", {})
    return description.get("pixel_labels") != "whole image"
