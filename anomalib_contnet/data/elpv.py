"""ELPV solar cells (electroluminescence images) as one-class anomaly detection categories.

The ``elpv-dataset`` wheel holds 2,624 real 300x300 grayscale cell images with a defect
probability per cell (0, 1/3, 2/3 or 1, from expert votes) and the module type. Only the
certain labels make a clean benchmark: functional cells (p = 0) are normal, defective cells
(p = 1) anomalous, the uncertain ones are left out. Mono- and polycrystalline cells look very
different (poly cells carry a grain texture), so each type is its own category.

ELPV labels whole cells, yet anomalib 2.7's ``MVTecAD`` needs a mask file per anomalous test
image (without the ``ground_truth`` folder ``make_mvtec_ad_dataset`` fails). Each defective cell
therefore gets a mask covering the whole image: image metrics are exact, pixel metrics only
repeat the image label (the marker says ``"pixel_labels": "whole image"``) and mean nothing.
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path

from PIL import Image

from anomalib_contnet.data.layout import DatasetPrepareError, category_folder, check_names
from anomalib_contnet.data.order import seeded_order

__all__ = ["ELPV_CATEGORIES", "prepare_elpv"]

ELPV_CATEGORIES: dict[str, str] = {"elpv_mono": "mono", "elpv_poly": "poly"}
"""Category folder name -> ELPV module type."""
TRAIN_FRACTION = 0.8
"""Share of the functional cells that trains: most, as in MVTec AD, still leaving 118 mono / 184 poly to test."""


def prepare_elpv(
    root: Path | str,
    *,
    seed: int = 0,
    max_per_split: int | None = None,
    categories: Sequence[str] = tuple(ELPV_CATEGORIES),
) -> list[Path]:
    """Write ``elpv_mono`` / ``elpv_poly`` under ``root`` (``MVTecAD(root=...)``) and return their folders.

    ``seed`` picks which functional cells train (``floor(0.8 n)`` of them); the rest are
    ``test/good``, the defective cells ``test/defective``. ``max_per_split`` keeps the first
    cells of each split in seeded order (a random subset, for quick runs). Images are copied
    byte for byte.
    """
    check_names(categories, ELPV_CATEGORIES, "ELPV categories")
    if max_per_split is not None and max_per_split < 1:
        msg = f"max_per_split must be a positive number of images (or None for all), got {max_per_split}"
        raise DatasetPrepareError(msg)
    root = Path(root).expanduser()
    cells = _labelled_cells()
    files = {file.name: file for file, _, _ in cells}
    for category in categories:
        of_type = [(file.name, probability) for file, probability, kind in cells if kind == ELPV_CATEGORIES[category]]
        functional = seeded_order([name for name, probability in of_type if probability == 0.0], seed)
        n_train = math.floor(TRAIN_FRACTION * len(functional))
        splits = {
            "train/good": functional[:n_train],
            "test/good": functional[n_train:],
            "test/defective": seeded_order([name for name, probability in of_type if probability == 1.0], seed),
        }
        description = {
            "kind": "elpv",
            "seed": seed,
            "max_per_split": max_per_split,
            "source": f"elpv-dataset {metadata.version('elpv-dataset')}",
            "pixel_labels": "whole image",
        }
        with category_folder(root / category, description) as staging:
            for folder, names in splits.items():
                (staging / folder).mkdir(parents=True)
                for name in names[:max_per_split]:
                    shutil.copyfile(files[name], staging / folder / name)
            masks = staging / "ground_truth" / "defective"
            masks.mkdir(parents=True)
            for image in (staging / "test" / "defective").iterdir():
                with Image.open(image) as opened:
                    Image.new("L", opened.size, 255).save(masks / f"{image.stem}_mask.png")
    return [root / category for category in categories]


def _labelled_cells() -> list[tuple[Path, float, str]]:
    """(image file, defect probability, module type) of every cell in the installed ``elpv-dataset``."""
    try:
        import elpv_dataset  # noqa: PLC0415  (optional dependency: the 'tools' extra)
    except ImportError as error:
        msg = "the package 'elpv-dataset' is not installed; install it with 'pip install elpv-dataset'"
        raise DatasetPrepareError(msg) from error
    data = Path(elpv_dataset.__file__).parent / "data"
    rows = [line.split() for line in (data / "labels.csv").read_text(encoding="utf-8").splitlines() if line.strip()]
    return [(data / path, float(probability), kind) for path, probability, kind in rows]
