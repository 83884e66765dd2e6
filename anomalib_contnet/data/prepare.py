"""Prepare real, offline datasets in MVTec AD layout for anomalib's ``MVTecAD`` datamodule.

Two sources ship inside PyPI wheels, so they work where no dataset server is reachable:

* :func:`prepare_elpv` -- ELPV solar cells (real industrial images, image labels only);
  categories ``elpv_mono`` and ``elpv_poly``.
* :func:`prepare_textures` -- real texture photographs with drawn defects and exact
  masks; categories ``brick``, ``grass``, ``gravel``.
* :func:`make_tiny_mvtec` -- a few small texture images with obvious defects, for tests
  that train through the anomalib CLI.

Every category folder is written as ``root/<category>/{train/good, test/good,
test/<defect>, ground_truth/<defect>/<name>_mask.png}`` (PNG only), built in a staging
folder and renamed into place, with a manifest (``.anomalib_contnet_dataset.json``)
listing every file's sha256. The same arguments give byte-identical files; a folder
this tool did not write, or one edited since, is never overwritten.

About ELPV masks: anomalib 2.7's ``MVTecAD`` pairs every abnormal test image with a
mask file and fails when the ``ground_truth`` folder is missing (checked: pandas
raises a length mismatch in ``make_mvtec_ad_dataset``). ELPV labels whole cells, so
each defective cell gets a mask covering the whole image: image-level metrics are
exact, pixel-level metrics only repeat the image label and must be ignored on ELPV.
The manifest records this as ``"pixel_labels": "whole image"``. For image labels
without any masks, anomalib's ``Folder`` datamodule reads the same folders as a
classification task: ``Folder(name="elpv_mono", root=<root>/elpv_mono,
normal_dir="train/good", normal_test_dir="test/good", abnormal_dir="test/defective")``.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Iterable, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from anomalib_contnet.data.elpv import ELPV_CATEGORIES, elpv_data_dir, plan_elpv_split, read_elpv_labels
from anomalib_contnet.data.layout import CategoryWriter, DatasetPrepareError, PreparedCategory, check_replaceable
from anomalib_contnet.data.textures import (
    DEFECT_TYPES,
    TEXTURE_CATEGORIES,
    load_texture,
    render_defective,
    render_normal,
    texture_bands,
)

__all__ = [
    "DEFECT_TYPES",
    "ELPV_CATEGORIES",
    "TEXTURE_CATEGORIES",
    "DatasetPrepareError",
    "PreparedCategory",
    "make_tiny_mvtec",
    "prepare_elpv",
    "prepare_textures",
]

ELPV_DEFECT_FOLDER = "defective"
"""ELPV has one anomaly class: ``test/defective`` and ``ground_truth/defective``."""


def prepare_elpv(
    root: Path | str,
    *,
    seed: int = 0,
    train_fraction: float = 0.8,
    max_per_split: int | None = None,
    categories: Sequence[str] = tuple(ELPV_CATEGORIES),
) -> list[PreparedCategory]:
    """Write ELPV as ``elpv_mono`` / ``elpv_poly`` categories under ``root``.

    Functional cells (defect probability 0) are split by ``seed``: ``floor(train_fraction * n)``
    train, the rest are ``test/good``; defective cells (probability 1) are ``test/defective``.
    The uncertain cells (1/3, 2/3) are left out. Images are copied byte for byte (300x300
    grayscale PNG; anomalib converts them to RGB when reading).

    Args:
        root: dataset root (``MVTecAD(root=...)``); other folders in it are left alone.
        seed: selects which functional cells train (any non-negative integer).
        train_fraction: share of functional cells used for training. 0.8 keeps most
            normal cells for fitting (as MVTec AD does) and still leaves 118 mono /
            184 poly normal cells for testing.
        max_per_split: keep at most this many images per split (a random subset), for
            quick runs; ``None`` keeps all.
        categories: which of ``elpv_mono``, ``elpv_poly`` to write.
    """
    _check_seed(seed)
    chosen = _check_choice(categories, ELPV_CATEGORIES, "ELPV category")
    if not 0.0 < train_fraction < 1.0:
        msg = f"train fraction must be strictly between 0 and 1, got {train_fraction}"
        raise DatasetPrepareError(msg)
    if max_per_split is not None:
        _check_count(max_per_split, "max images per split")
    root = Path(root).expanduser()
    for category in chosen:
        check_replaceable(root / category)
    try:
        data_dir = elpv_data_dir()
        cells = read_elpv_labels(data_dir)
    except (FileNotFoundError, ValueError) as error:
        raise DatasetPrepareError(str(error)) from error
    source = {
        "package": "elpv-dataset",
        "version": metadata.version("elpv-dataset"),
        "labels_sha256": hashlib.sha256((data_dir / "labels.csv").read_bytes()).hexdigest(),
    }
    prepared = []
    for category in chosen:
        try:
            split = plan_elpv_split(
                cells,
                ELPV_CATEGORIES[category],
                train_fraction=train_fraction,
                seed=seed,
                max_per_split=max_per_split,
            )
        except ValueError as error:
            raise DatasetPrepareError(str(error)) from error
        description = {
            "kind": "elpv",
            "seed": seed,
            "options": {"train_fraction": train_fraction, "max_per_split": max_per_split},
            "source": source,
            "module_type": ELPV_CATEGORIES[category],
            "pixel_labels": "whole image",
        }
        whole_image_masks: dict[tuple[int, int], bytes] = {}
        with CategoryWriter(root, category) as writer:
            for folder, chosen_cells in (("train/good", split.train_good), ("test/good", split.test_good)):
                for cell in chosen_cells:
                    writer.write_bytes(f"{folder}/{cell.name}", cell.file.read_bytes())
            for cell in split.test_defective:
                writer.write_bytes(f"test/{ELPV_DEFECT_FOLDER}/{cell.name}", cell.file.read_bytes())
                with Image.open(cell.file) as image:
                    width, height = image.size
                if (width, height) not in whole_image_masks:
                    whole_image_masks[width, height] = _png_bytes(np.full((height, width), 255, dtype=np.uint8))
                mask = whole_image_masks[width, height]
                writer.write_bytes(f"ground_truth/{ELPV_DEFECT_FOLDER}/{cell.file.stem}_mask.png", mask)
            counts = {
                "train/good": len(split.train_good),
                "test/good": len(split.test_good),
                f"test/{ELPV_DEFECT_FOLDER}": len(split.test_defective),
            }
            prepared.append(writer.publish(description, counts))
    return prepared


def prepare_textures(
    root: Path | str,
    *,
    seed: int = 0,
    categories: Sequence[str] = TEXTURE_CATEGORIES,
    image_size: int = 256,
    crop_size: int = 160,
    n_train: int = 100,
    n_test_good: int = 30,
    n_test_defect: int = 30,
    defect_types: Sequence[str] = DEFECT_TYPES,
) -> list[PreparedCategory]:
    """Write texture categories with drawn defects and exact masks under ``root``.

    Args:
        root: dataset root (``MVTecAD(root=...)``); other folders in it are left alone.
        seed: selects crops and defects (any non-negative integer).
        categories: textures from ``skimage.data`` to use (``brick``, ``grass``, ``gravel``).
        image_size: side of the written square images, in pixels.
        crop_size: side of the square cut from the 512x512 photograph before resizing to
            ``image_size``; at most 192 (the height of the test band). Smaller crops show
            coarser texture.
        n_train: normal training images per category.
        n_test_good: normal test images per category.
        n_test_defect: defective test images per category, shared round-robin among
            ``defect_types`` (``test/<type>`` folders).
        defect_types: subset of ``scratch``, ``stain``, ``spots``.
    """
    _check_seed(seed)
    chosen = _check_choice(categories, TEXTURE_CATEGORIES, "texture category")
    kinds = _check_choice(defect_types, DEFECT_TYPES, "defect type")
    if not 32 <= image_size <= 2048:
        msg = f"image size must be between 32 and 2048 pixels, got {image_size}"
        raise DatasetPrepareError(msg)
    if crop_size < 16:
        msg = f"crop size must be at least 16 pixels, got {crop_size}"
        raise DatasetPrepareError(msg)
    for value, what in ((n_train, "training images"), (n_test_good, "normal test images")):
        _check_count(value, what)
    _check_count(n_test_defect, "defective test images")
    root = Path(root).expanduser()
    for category in chosen:
        check_replaceable(root / category)
    prepared = []
    for category in chosen:
        texture = load_texture(category)
        bands = texture_bands(texture)
        if crop_size > min(bands["test"].shape):
            msg = f"crop size {crop_size} does not fit the {bands['test'].shape} test band; use at most 192"
            raise DatasetPrepareError(msg)
        description = _texture_description(category, texture, seed, image_size, crop_size, kinds)
        with CategoryWriter(root, category) as writer:
            counts = _write_texture_category(
                writer, category, bands, seed, image_size, crop_size, (n_train, n_test_good, n_test_defect), kinds
            )
            prepared.append(writer.publish(description, counts))
    return prepared


def make_tiny_mvtec(
    root: Path | str,
    category: str = "brick",
    n_train: int = 8,
    n_test_good: int = 4,
    n_test_defect: int = 4,
    image_size: int = 64,
    seed: int = 0,
    defect_types: Sequence[str] = ("stain",),
) -> Path:
    """Write a tiny texture category for tests and return ``root`` (the value for ``MVTecAD(root=...)``).

    Same code path as :func:`prepare_textures`; the defaults make a category of 16 images
    of 64x64 px in well under a second, whose ``stain`` defects (large, colour-cast blobs)
    any working detector separates from the normal images.
    """
    prepare_textures(
        root,
        seed=seed,
        categories=(category,),
        image_size=image_size,
        n_train=n_train,
        n_test_good=n_test_good,
        n_test_defect=n_test_defect,
        defect_types=defect_types,
    )
    return Path(root).expanduser()


def _write_texture_category(
    writer: CategoryWriter,
    category: str,
    bands: dict[str, np.ndarray],
    seed: int,
    image_size: int,
    crop_size: int,
    sizes: tuple[int, int, int],
    kinds: Sequence[str],
) -> dict[str, int]:
    """Render and stage every image of one category; return the image count per folder."""
    n_train, n_test_good, n_test_defect = sizes
    width = max(3, len(str(max(sizes) - 1)))
    for index in range(n_train):
        crop = render_normal(bands["train"], seed, category, "train", index, crop_size, image_size)
        writer.write_bytes(f"train/good/{index:0{width}d}.png", _png_bytes(crop))
    for index in range(n_test_good):
        crop = render_normal(bands["test"], seed, category, "test/good", index, crop_size, image_size)
        writer.write_bytes(f"test/good/{index:0{width}d}.png", _png_bytes(crop))
    counts = {"train/good": n_train, "test/good": n_test_good} | {f"test/{kind}": 0 for kind in kinds}
    for index in range(n_test_defect):
        kind = kinds[index % len(kinds)]
        _, defective, mask = render_defective(bands["test"], seed, category, index, kind, crop_size, image_size)
        name = f"{counts[f'test/{kind}']:0{width}d}"
        writer.write_bytes(f"test/{kind}/{name}.png", _png_bytes(defective))
        writer.write_bytes(f"ground_truth/{kind}/{name}_mask.png", _png_bytes(mask.astype(np.uint8) * 255))
        counts[f"test/{kind}"] += 1
    return {folder: count for folder, count in counts.items() if count}


def _texture_description(
    category: str, texture: np.ndarray, seed: int, image_size: int, crop_size: int, kinds: Sequence[str]
) -> dict[str, Any]:
    """What produced a texture category; part of the manifest, so a change of any of it rewrites the folder."""
    return {
        "kind": "textures",
        "seed": seed,
        "options": {"image_size": image_size, "crop_size": crop_size, "defect_types": list(kinds)},
        "source": {
            "package": "scikit-image",
            "version": metadata.version("scikit-image"),
            "image": f"skimage.data.{category}",
            "pixels_sha256": hashlib.sha256(texture.tobytes()).hexdigest(),
            "numpy": np.__version__,
        },
        "pixel_labels": "exact",
    }


def _png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _check_seed(seed: int) -> None:
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        msg = f"seed must be a non-negative integer, got {seed!r}"
        raise DatasetPrepareError(msg)


def _check_count(value: int, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        msg = f"the number of {what} must be a positive integer, got {value!r}"
        raise DatasetPrepareError(msg)


def _check_choice(values: Iterable[str], known: Iterable[str], what: str) -> list[str]:
    """Return ``values`` without duplicates, in the given order; refuse an empty or unknown choice."""
    known_list = list(known)
    chosen = list(dict.fromkeys(values))
    unknown = [value for value in chosen if value not in known_list]
    if unknown or not chosen:
        msg = f"unknown or missing {what}(s) {unknown}; choose from {known_list}"
        raise DatasetPrepareError(msg)
    return chosen
