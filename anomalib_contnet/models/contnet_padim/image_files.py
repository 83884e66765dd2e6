"""The users' image files: refused when anomalib would misread them, named when they are damaged.

anomalib's datasets read each file with Pillow; a truncated PNG or JPEG then fails with
Pillow's ``OSError: image file is truncated``, which names no file. Nothing here decodes
a file on the normal path: a dataset's ``__getitems__`` (which torch's DataLoader calls,
when present, with the indices of a batch) only looks for the damaged files once a batch
has failed, and raises an error that names them.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from PIL import Image

__all__ = ["DamagedImageError", "name_damaged_files", "refuse_high_bit_depth"]

HIGH_BIT_DEPTH_MODES = frozenset({"I", "I;16", "I;16B", "I;16L", "I;16N", "F"})
"""Pillow modes of one-channel images with more than 8 bits (16-bit PNG/TIFF, 32-bit integer or float).

anomalib reads every image with ``Image.convert("RGB")``, which clips these values at 255
instead of scaling them: a 16-bit image becomes almost uniformly white. 16-bit colour PNGs
are not affected (Pillow reduces them to 8 bits per channel correctly).
"""


class DamagedImageError(OSError):
    """An image or mask file of a dataset cannot be decoded; the message names every such file of the batch."""


def refuse_high_bit_depth(paths: Iterable[str] | None) -> None:
    """Raise ValueError naming the files that anomalib would clip to white (reads their headers only)."""
    clipped = []
    for path in paths or ():  # None: a batch built from tensors, not files
        with Image.open(path) as image:
            if image.mode in HIGH_BIT_DEPTH_MODES:
                clipped.append(f"{path} (mode {image.mode})")
    if clipped:
        msg = (
            "one-channel images with more than 8 bits per pixel: anomalib reads images with Pillow's "
            "convert('RGB'), which clips such values at 255 instead of scaling them, so the model would see an "
            "almost white image. Convert them to 8 bits first (16-bit: divide by 257; float: scale to 0..255): "
            + ", ".join(clipped)
        )
        raise ValueError(msg)


def name_damaged_files(dataset: Any) -> None:
    """Make a batch of ``dataset`` that fails on a damaged file raise :class:`DamagedImageError` naming it.

    Set as an attribute of the dataset object (not its class), so it travels to DataLoader
    workers with the dataset and leaves the user's dataset class alone.
    """
    if dataset is not None and "__getitems__" not in vars(dataset):
        dataset.__getitems__ = functools.partial(_items_naming_damaged_files, dataset)


def _items_naming_damaged_files(dataset: Any, indices: Sequence[int]) -> list[Any]:
    """``[dataset[i] for i in indices]``, as torch's fetcher does; on failure, the damaged files found are named."""
    try:
        return [dataset[index] for index in indices]
    except Exception as error:
        damaged = [file for index in indices for file in _sample_files(dataset, index) if not _decodes(file)]
        if not damaged:
            raise  # not a damaged file: the original error says what went wrong
        msg = (
            f"cannot decode {', '.join(damaged)} ({error}): the file is damaged (for example truncated by an "
            "interrupted copy) or not an image. Replace it with an intact copy or remove it from the dataset folder."
        )
        raise DamagedImageError(msg) from error


def _sample_files(dataset: Any, index: int) -> list[str]:
    """The image (and mask) files of one sample (``samples`` of anomalib's datasets, or PredictDataset's list)."""
    samples = getattr(dataset, "samples", None)
    if samples is None:
        return [str(dataset.image_filenames[index])]
    row = samples.iloc[index]
    masks = row.get("mask_path", "")
    masks = masks if isinstance(masks, list | tuple) else [masks]
    return [str(row.image_path), *(str(mask) for mask in masks if isinstance(mask, str) and mask)]


def _decodes(path: str) -> bool:
    """Whether Pillow decodes the whole file (what anomalib's reader does); only called once a batch failed.

    A missing file counts as decodable: anomalib's own ``FileNotFoundError`` already names it.
    """
    if not Path(path).is_file():
        return True
    try:
        with Image.open(path) as image:
            image.load()
    except (OSError, SyntaxError, ValueError):  # what Pillow raises for truncated, garbled or unknown files
        return False
    return True
