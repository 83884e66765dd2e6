"""The image files a fit, test or prediction is about to read: finding them in anomalib's datasets, checking them.

A damaged file is worth an error before a stage runs rather than in the middle of
it: PNGs are checked by their chunk checksums, other formats by decoding them, and
the error names every offending file. ``docs/reliability.md`` lists the bad inputs
these checks answer and the tests that prove it.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping, Sequence

from PIL import Image

__all__ = [
    "check_image_files",
    "dataset_image_paths",
    "listed",
    "loader_datasets",
    "require_training_images",
]

HIGH_BIT_DEPTH_MODES = frozenset({"I", "I;16", "I;16B", "I;16L", "I;16N", "F"})
"""Pillow modes of one-channel images with more than 8 bits (16-bit PNG/TIFF, 32-bit integer or float).

anomalib reads every image with ``Image.convert("RGB")``, which clips these values
at 255 instead of scaling them: a 16-bit image becomes almost uniformly white, and
the model would score that. 16-bit colour PNGs are not affected (Pillow reduces
them to 8 bits per channel correctly).
"""

_SHOWN = 5
"""Offending files or keys quoted in one message; the rest are counted."""


def listed(items: Sequence[str]) -> str:
    """First few items, one per line, and how many more there are (for the model's error messages)."""
    lines = [f"  - {item}" for item in items[:_SHOWN]]
    if len(items) > _SHOWN:
        lines.append(f"  ... and {len(items) - _SHOWN} more")
    return "\n".join(lines)


def check_image_files(paths: Iterable[str | os.PathLike[str]], purpose: str) -> None:
    """Raise ValueError naming every file in ``paths`` that anomalib would fail on or silently misread.

    A PNG is checked with Pillow's ``verify``, which checks every chunk's checksum
    (a truncated or damaged PNG fails) without decoding pixels: about a millisecond
    per file. Other formats have no checksums (a truncated JPEG opens and verifies
    fine, then fails mid-run with Pillow's "image file is truncated" and no file
    name), so they are decoded with the decoder anomalib's reader uses; JPEGs at
    reduced scale (libjpeg's scaled decoding still reads the whole entropy-coded
    stream, so cuts are found), a few milliseconds per 1024 px photograph (docs/reliability.md,
    rows 11 and 12).

    Args:
        paths: image files a stage is about to read.
        purpose: what the images are for (``"training"``, ``"prediction"``...), for the message.
    """
    unreadable: list[str] = []
    high_bit_depth: list[str] = []
    for path in paths:
        try:
            with Image.open(path) as image:
                mode = image.mode
                if image.format == "PNG":
                    image.verify()
                else:
                    image.draft("RGB", (max(1, image.width // 8), max(1, image.height // 8)))
                    image.load()
        except Exception as error:  # noqa: BLE001 (Pillow raises many types; every one means the file is unusable)
            unreadable.append(f"{path} ({type(error).__name__}: {error})")
            continue
        if mode in HIGH_BIT_DEPTH_MODES:
            high_bit_depth.append(f"{path} (mode {mode})")
    problems = []
    if unreadable:
        problems.append(
            f"{len(unreadable)} file(s) are not readable images (damaged, truncated, or not an image at all); "
            f"replace or remove them:\n{listed(unreadable)}"
        )
    if high_bit_depth:
        problems.append(
            f"{len(high_bit_depth)} file(s) are one-channel images with more than 8 bits per pixel. anomalib reads "
            "images with Pillow's convert('RGB'), which clips such values at 255 instead of scaling them, so the "
            "model would see an almost white image. Convert them to 8 bits first (16-bit: divide by 257; "
            f"float: scale to 0..255):\n{listed(high_bit_depth)}"
        )
    if problems:
        msg = f"cannot use the {purpose} images:\n" + "\n".join(problems)
        raise ValueError(msg)


def dataset_image_paths(dataset: object) -> list[str]:
    """Image files an anomalib dataset will read: its images and masks (``samples``), or a PredictDataset's files.

    Other datasets (user-made tensors, custom classes) give an empty list: there
    are no files to check.
    """
    try:
        samples = getattr(dataset, "samples", None)
    except RuntimeError:  # an AnomalibDataset whose samples were never set
        samples = None
    columns = getattr(samples, "columns", ())
    if samples is not None and "image_path" in columns:
        paths = [str(path) for path in samples["image_path"]]
        if "mask_path" in columns:  # empty (or NaN) for normal images
            paths += [str(path) for path in samples["mask_path"] if isinstance(path, str | os.PathLike) and path]
        return paths
    file_names = getattr(dataset, "image_filenames", None)
    if isinstance(file_names, Iterable) and not isinstance(file_names, str | bytes):
        return [str(path) for path in file_names]
    return []


def loader_datasets(loaders: object) -> Iterator[object]:
    """Datasets of a Lightning dataloader attribute: one DataLoader, or a list, tuple or dict of them."""
    if loaders is None:
        return
    if isinstance(loaders, Mapping):
        loaders = list(loaders.values())
    if isinstance(loaders, list | tuple):
        for loader in loaders:
            yield from loader_datasets(loader)
        return
    dataset = getattr(loaders, "dataset", None)
    if dataset is not None:
        yield dataset


def require_training_images(datamodule: object) -> None:
    """Raise ValueError when an anomalib datamodule found no training images.

    Without this, an empty training folder surfaces as torch's
    "num_samples should be a positive integer value" from the data loader.
    """
    train_data = getattr(datamodule, "train_data", None)
    if train_data is None or len(train_data) > 0:
        return
    where = ", ".join(
        f"{name}={getattr(datamodule, name)}"
        for name in ("root", "category", "normal_dir")
        if getattr(datamodule, name, None) is not None
    )
    msg = (
        f"{type(datamodule).__name__} found no training images ({where}). ConTNetPaDiM fits its Gaussians on "
        "normal training images and needs at least 2: put them in the training folder (MVTec AD layout: "
        "<root>/<category>/train/good) or point the datamodule to the right folder."
    )
    raise ValueError(msg)
