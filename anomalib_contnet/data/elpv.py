"""ELPV (electroluminescence images of solar cells) as one-class anomaly detection splits.

The ``elpv-dataset`` wheel holds 2,624 real 300x300 8-bit grayscale cell images with
a defect probability per cell (0, 1/3, 2/3 or 1, from expert votes) and the module
type (mono- or polycrystalline). Only the certain labels make a clean benchmark:
functional cells (p = 0) are the normal class, defective cells (p = 1) the anomalies;
the uncertain 1/3 and 2/3 cells are left out. Mono and poly cells look very different
(poly cells carry a grain texture), so each type is its own category, as MVTec AD
keeps one object per category.

This module only plans splits; :mod:`anomalib_contnet.data.prepare` writes them.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "ELPV_CATEGORIES",
    "elpv_data_dir",
    "plan_elpv_split",
    "read_elpv_labels",
    "seeded_order",
]

ELPV_CATEGORIES: dict[str, str] = {"elpv_mono": "mono", "elpv_poly": "poly"}
"""Category folder name -> ELPV module type."""

_KNOWN_PROBABILITIES = (0.0, 1 / 3, 2 / 3, 1.0)


@dataclass(frozen=True)
class ElpvCell:
    """One labelled cell image of the ELPV wheel."""

    file: Path
    defect_probability: float
    module_type: str

    @property
    def name(self) -> str:
        """The published file name (``cell0001.png``); kept so results trace back to the source."""
        return self.file.name


@dataclass(frozen=True)
class ElpvSplit:
    """The cells of one category, split as MVTec AD splits an object."""

    train_good: tuple[ElpvCell, ...]
    test_good: tuple[ElpvCell, ...]
    test_defective: tuple[ElpvCell, ...]


def elpv_data_dir() -> Path:
    """Return the ``data`` folder of the installed ``elpv_dataset`` package (``labels.csv`` and ``images/``)."""
    try:
        import elpv_dataset  # noqa: PLC0415  (optional dependency: the 'data' extra)
    except ImportError as error:
        msg = (
            "the package 'elpv-dataset' is not installed; install it with 'pip install elpv-dataset' "
            "(or 'pip install anomalib-contnet[tools]')"
        )
        raise FileNotFoundError(msg) from error
    data_dir = Path(elpv_dataset.__file__).parent / "data"
    if not (data_dir / "labels.csv").is_file():
        msg = f"{data_dir / 'labels.csv'} is missing: the elpv-dataset installation is incomplete, reinstall it"
        raise FileNotFoundError(msg)
    return data_dir


def read_elpv_labels(data_dir: Path) -> list[ElpvCell]:
    """Parse ``labels.csv`` (whitespace-separated: image path, defect probability, module type).

    Rejects probabilities other than 0, 1/3, 2/3, 1 and unknown module types: a
    changed label file must not silently shift cells between normal and defective.
    """
    cells = []
    for line_number, line in enumerate((data_dir / "labels.csv").read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        fields = line.split()
        if len(fields) != 3:
            msg = f"labels.csv line {line_number}: expected 'path probability type', got {line!r}"
            raise ValueError(msg)
        relative, probability_text, module_type = fields
        probability = float(probability_text)
        if not any(math.isclose(probability, known, abs_tol=1e-6) for known in _KNOWN_PROBABILITIES):
            msg = f"labels.csv line {line_number}: unknown defect probability {probability_text}"
            raise ValueError(msg)
        if module_type not in ELPV_CATEGORIES.values():
            msg = f"labels.csv line {line_number}: unknown module type {module_type!r}"
            raise ValueError(msg)
        file = data_dir / relative
        if not file.is_file():
            msg = f"labels.csv line {line_number}: {file} is missing; reinstall elpv-dataset"
            raise FileNotFoundError(msg)
        cells.append(ElpvCell(file=file, defect_probability=probability, module_type=module_type))
    return cells


def seeded_order(names: list[str], seed: int) -> list[str]:
    """Shuffle ``names`` by the sha256 of ``"<seed>:<name>"``.

    Unlike a NumPy permutation, this order depends on nothing but the seed and the
    names, so it is the same on every platform and library version, and adding a
    name never reorders the others.
    """
    return sorted(names, key=lambda name: hashlib.sha256(f"{seed}:{name}".encode()).hexdigest())


def plan_elpv_split(
    cells: list[ElpvCell], module_type: str, *, train_fraction: float, seed: int, max_per_split: int | None
) -> ElpvSplit:
    """Split one module type: a seeded ``train_fraction`` of the functional cells trains, the rest tests.

    The number of training cells is ``floor(train_fraction * n_functional)``; both
    parts must be non-empty. ``max_per_split`` then keeps the first cells (in seeded
    order) of each split, for quick subsets whose cells are still a random sample.
    """
    by_name = {cell.name: cell for cell in cells if cell.module_type == module_type}
    functional = [name for name, cell in by_name.items() if cell.defect_probability == 0.0]
    defective = [name for name, cell in by_name.items() if cell.defect_probability == 1.0]
    n_train = math.floor(train_fraction * len(functional))
    if not 1 <= n_train < len(functional):
        msg = (
            f"train fraction {train_fraction} leaves {n_train} of {len(functional)} functional {module_type} cells "
            "for training; choose a fraction that keeps at least one cell on each side"
        )
        raise ValueError(msg)
    ordered = seeded_order(functional, seed)
    train, test_good = ordered[:n_train], ordered[n_train:]
    test_defective = seeded_order(defective, seed)
    if max_per_split is not None:
        train, test_good, test_defective = (part[:max_per_split] for part in (train, test_good, test_defective))
    return ElpvSplit(
        train_good=tuple(by_name[name] for name in sorted(train)),
        test_good=tuple(by_name[name] for name in sorted(test_good)),
        test_defective=tuple(by_name[name] for name in sorted(test_defective)),
    )
