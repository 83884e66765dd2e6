"""Texture categories with exact masks: real texture photographs with drawn defects, in MVTec AD layout.

The normal images are crops of texture photographs that ship with scikit-image (brick wall,
grass, gravel). Defects are drawn, not blended: every pixel inside a defect's mask is pushed by
a large, fixed amount in every channel (brighter where the texture is dark, darker where it is
bright), and no pixel outside it is touched, so the mask is exactly the set of altered pixels
and pixel metrics mean what they say.

Training crops come from the upper part of each photograph and test crops from the disjoint
lower part, so a test image is never a shifted copy of a training image. Every image draws from
its own random stream (seed, category, split, index), so the first images of a small set equal
those of a large one made with the same seed and sizes. :func:`render_normal` and
:func:`render_defective` give those images in memory, at any size, without writing a folder.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from skimage import data as skimage_data

from anomalib_contnet.data.layout import DatasetPrepareError, category_folder, check_names

__all__ = [
    "DEFECT_TYPES",
    "TEXTURE_CATEGORIES",
    "load_texture",
    "make_tiny_mvtec",
    "prepare_textures",
    "render_defective",
    "render_normal",
    "texture_bands",
]

TEXTURE_CATEGORIES: tuple[str, ...] = ("brick", "grass", "gravel")
"""Texture photographs in ``skimage.data`` (512x512 grayscale) used as categories."""
DEFECT_TYPES: tuple[str, ...] = ("scratch", "stain", "spots")
"""Defect kinds; each becomes a ``test/<type>`` folder, as MVTec AD has one folder per defect kind."""
TRAIN_BAND_FRACTION = 0.625
"""Rows ``[0, 0.625 H)`` of a texture feed training crops, the rest test crops."""

_MIN_SHIFT, _MAX_SHIFT = 70, 127
"""Every defect pixel moves by at least 70 grey levels per channel: obvious to any detector, and never clipped."""


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
) -> list[Path]:
    """Write texture categories under ``root`` (``MVTecAD(root=...)``) and return their folders.

    ``crop_size`` is the side of the square cut from the photograph before resizing to
    ``image_size`` (at most 192, the height of the test band; smaller crops show coarser
    texture). The ``n_test_defect`` defective images are shared round-robin among
    ``defect_types``, one ``test/<type>`` folder each. The same arguments give the same files.
    """
    check_names(categories, TEXTURE_CATEGORIES, "texture categories")
    check_names(defect_types, DEFECT_TYPES, "defect types")
    if min(n_train, n_test_good, n_test_defect) < 1:
        msg = f"every split needs at least one image, got {n_train=}, {n_test_good=}, {n_test_defect=}"
        raise DatasetPrepareError(msg)
    root = Path(root).expanduser()
    width = max(3, len(str(max(n_train, n_test_good, n_test_defect) - 1)))
    description = {
        "kind": "textures",
        "seed": seed,
        "options": {"image_size": image_size, "crop_size": crop_size, "defect_types": list(defect_types)},
        "sizes": [n_train, n_test_good, n_test_defect],
        "source": f"scikit-image {metadata.version('scikit-image')}",
        "pixel_labels": "exact",
    }
    for category in categories:
        bands = texture_bands(load_texture(category))
        normal = (
            ("train/good", "train", bands["train"], n_train),
            ("test/good", "test/good", bands["test"], n_test_good),
        )
        with category_folder(root / category, description) as staging:
            for folder, stream, band, count in normal:
                for index in range(count):
                    crop = render_normal(band, seed, category, stream, index, crop_size, image_size)
                    _save_png(staging / folder / f"{index:0{width}d}.png", crop)
            for index in range(n_test_defect):  # round-robin over the defect types
                kind, name = defect_types[index % len(defect_types)], f"{index // len(defect_types):0{width}d}"
                _, defective, mask = render_defective(bands["test"], seed, category, index, kind, crop_size, image_size)
                _save_png(staging / "test" / kind / f"{name}.png", defective)
                _save_png(staging / "ground_truth" / kind / f"{name}_mask.png", mask.astype(np.uint8) * 255)
    return [root / category for category in categories]


def make_tiny_mvtec(
    root: Path | str,
    category: str = "brick",
    n_train: int = 8,
    n_test_good: int = 4,
    n_test_defect: int = 4,
    image_size: int = 64,
    seed: int = 0,
) -> Path:
    """Write a tiny texture category and return ``root`` (the value for ``MVTecAD(root=...)``).

    For a first try of the plugin, a smoke run or a test: the defaults make 16 images of
    64x64 px in well under a second, whose ``stain`` defects (large colour-cast blobs) any
    working detector separates from the normal images.
    """
    sizes = {"n_train": n_train, "n_test_good": n_test_good, "n_test_defect": n_test_defect}
    prepare_textures(root, seed=seed, categories=(category,), image_size=image_size, defect_types=("stain",), **sizes)
    return Path(root).expanduser()


def load_texture(name: str) -> np.ndarray:
    """Return the texture photograph ``name`` from ``skimage.data`` as a 2-D uint8 array."""
    return np.asarray(getattr(skimage_data, name)())


def texture_bands(texture: np.ndarray) -> dict[str, np.ndarray]:
    """Split a texture into the disjoint row bands that training and test crops come from."""
    split_row = int(texture.shape[0] * TRAIN_BAND_FRACTION)
    return {"train": texture[:split_row], "test": texture[split_row:]}


def _image_rng(seed: int, category: str, stream: str, index: int) -> np.random.Generator:
    """Independent random stream for one image, so no image depends on how many others are made."""
    words = [int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little") for text in (category, stream)]
    return np.random.default_rng([seed, *words, index])


def _sample_crop(band: np.ndarray, crop_size: int, image_size: int, rng: np.random.Generator) -> np.ndarray:
    """Cut a random square from ``band``, apply a random flip/rotation, resize to ``image_size``; return RGB uint8."""
    height, width = band.shape
    if crop_size > min(height, width):
        msg = f"crop size {crop_size} does not fit a {height}x{width} texture band; choose at most {min(height, width)}"
        raise DatasetPrepareError(msg)
    top = int(rng.integers(0, height - crop_size + 1))
    left = int(rng.integers(0, width - crop_size + 1))
    crop = band[top : top + crop_size, left : left + crop_size]
    crop = np.rot90(crop, k=int(rng.integers(0, 4)))
    if rng.integers(0, 2):
        crop = crop[:, ::-1]
    if crop_size != image_size:
        resized = Image.fromarray(np.ascontiguousarray(crop)).resize((image_size, image_size), Image.Resampling.BICUBIC)
        crop = np.asarray(resized)
    return np.repeat(np.ascontiguousarray(crop)[:, :, None], 3, axis=2)


def _draw_defect(image: np.ndarray, defect_type: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(defective copy of image, boolean mask of exactly the altered pixels)``.

    The shape is drawn with sizes relative to the image side, so defects stay
    visible on small test images too; a shape that falls outside the image is
    redrawn (from the same stream, so the result stays deterministic).
    """
    side = image.shape[0]
    for _attempt in range(10):
        canvas = Image.new("1", (side, side), 0)
        _draw_shape(ImageDraw.Draw(canvas), defect_type, side, rng)
        mask = np.asarray(canvas, dtype=bool)
        if mask.sum() >= max(4, side * side // 2000):
            break
    else:
        msg = f"could not draw a visible {defect_type} on a {side}px image"
        raise RuntimeError(msg)
    if defect_type == "stain":
        shift = rng.integers(_MIN_SHIFT, _MAX_SHIFT + 1, size=3)  # a colour cast: each channel its own amount
    else:
        shift = np.full(3, rng.integers(_MIN_SHIFT, _MAX_SHIFT + 1))
    pixels = image.astype(np.int16)
    moved = np.where(pixels < 128, pixels + shift, pixels - shift)
    defective = np.where(mask[:, :, None], moved, pixels).astype(np.uint8)
    return defective, mask


def render_normal(
    band: np.ndarray, seed: int, category: str, stream: str, index: int, crop_size: int, image_size: int
) -> np.ndarray:
    """The ``index``-th normal image of ``stream`` (``"train"`` or ``"test/good"``) of a category."""
    return _sample_crop(band, crop_size, image_size, _image_rng(seed, category, stream, index))


def render_defective(
    band: np.ndarray, seed: int, category: str, index: int, defect_type: str, crop_size: int, image_size: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The ``index``-th defective test image of a category: ``(normal crop, defective image, mask)``."""
    rng = _image_rng(seed, category, "test/defect", index)
    normal = _sample_crop(band, crop_size, image_size, rng)
    defective, mask = _draw_defect(normal, defect_type, rng)
    return normal, defective, mask


def _save_png(path: Path, pixels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


def _draw_shape(draw: ImageDraw.ImageDraw, defect_type: str, side: int, rng: np.random.Generator) -> None:
    """Draw one defect's shape, with sizes relative to the image side."""
    if defect_type == "scratch":  # one or two thin wandering polylines, like tool marks
        for _ in range(int(rng.integers(1, 3))):
            x, y = rng.uniform(0.2 * side, 0.8 * side, size=2)
            angle = rng.uniform(0, 2 * math.pi)
            points = [(float(x), float(y))]
            for _ in range(int(rng.integers(2, 5))):
                angle += rng.uniform(-0.5, 0.5)
                step = rng.uniform(0.12, 0.25) * side
                x, y = x + step * math.cos(angle), y + step * math.sin(angle)
                points.append((float(x), float(y)))
            draw.line(points, fill=1, width=max(1, round(rng.uniform(0.012, 0.03) * side)))
    elif defect_type == "stain":  # an irregular blob: a few overlapping ellipses around one centre
        centre = rng.uniform(0.3 * side, 0.7 * side, size=2)
        for _ in range(int(rng.integers(3, 7))):
            cx, cy = centre + rng.normal(0, 0.06 * side, size=2)
            rx, ry = rng.uniform(0.05, 0.14, size=2) * side
            draw.ellipse([float(cx - rx), float(cy - ry), float(cx + rx), float(cy + ry)], fill=1)
    else:  # spots: a cluster of small round spots, like splashes or pits
        centre = rng.uniform(0.25 * side, 0.75 * side, size=2)
        for _ in range(int(rng.integers(4, 10))):
            cx, cy = centre + rng.uniform(-0.18 * side, 0.18 * side, size=2)
            r = max(1.5, rng.uniform(0.015, 0.04) * side)
            draw.ellipse([float(cx - r), float(cy - r), float(cx + r), float(cy + r)], fill=1)
