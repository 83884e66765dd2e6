"""Publishing one MVTec AD category folder: filled beside its target, marked as ours, renamed into place.

Users point training runs at these folders, so a half-written or silently overwritten one costs
hours. A category is filled in a staging folder (:func:`~anomalib_contnet.atomic_files.staged_folder`)
that replaces its target only once complete. Its marker file names this tool, the settings and
the files written; an existing folder is replaced only when its marker says this tool wrote it and
no file was added since. Our own files edited in place are not detected (that would take a hash of
every file): edit a copy.
"""

from __future__ import annotations

import contextlib
import json
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from anomalib_contnet.atomic_files import staged_folder

__all__ = ["MANIFEST_NAME", "DatasetPrepareError", "category_folder", "image_counts"]

MANIFEST_NAME = ".anomalib_contnet_dataset.json"
"""The marker file in every category folder this tool writes: generator, ``description`` (settings), file names."""
GENERATOR = "anomalib_contnet.data"


class DatasetPrepareError(RuntimeError):
    """A dataset cannot be prepared as asked; the message says what to change."""


def _check_replaceable(target: Path) -> None:
    """Refuse ``target`` unless it is absent, holds no file, or was written by this tool with no file added since."""
    on_disk = {path.relative_to(target).as_posix() for path in target.rglob("*") if path.is_file()}
    if not on_disk:
        return
    try:
        marker = json.loads((target / MANIFEST_NAME).read_text(encoding="utf-8"))
        listed = set(marker["files"]) if marker["generator"] == GENERATOR else None
    except (OSError, ValueError, KeyError, TypeError):
        listed = None
    if listed is None:
        msg = (
            f"{target} holds data that anomalib-contnet did not write (no readable {MANIFEST_NAME}); refusing to "
            "overwrite it. Choose another --root, or move that folder away yourself."
        )
        raise DatasetPrepareError(msg)
    added = sorted(on_disk - listed - {MANIFEST_NAME})
    if added:
        msg = (
            f"{target} holds {len(added)} file(s) that anomalib-contnet did not write (e.g. {added[:3]}); refusing "
            "to overwrite it. Move them elsewhere, or choose another --root."
        )
        raise DatasetPrepareError(msg)


@contextlib.contextmanager
def category_folder(target: Path, description: dict[str, Any]) -> Iterator[Path]:
    """Yield an empty staging folder; on success it gets the marker and replaces ``target`` whole.

    ``target`` is checked before anything is written (a refusal is instant) and again right
    before the rename (so files added to it in between are not lost).
    """
    _check_replaceable(target)
    with staged_folder(target) as staging:
        yield staging
        files = sorted(path.relative_to(staging).as_posix() for path in staging.rglob("*") if path.is_file())
        marker = {"generator": GENERATOR, "description": description, "files": files}
        (staging / MANIFEST_NAME).write_text(json.dumps(marker, indent=1, sort_keys=True) + "\n", encoding="utf-8")
        _check_replaceable(target)


def image_counts(category: Path) -> dict[str, int]:
    """Images per ``<split>/<label>`` folder of a category, e.g. ``{"train/good": 470, "test/defective": 313}``."""
    images = [path for split in ("train", "test") for path in sorted((category / split).glob("*/*")) if path.is_file()]
    return dict(Counter(path.parent.relative_to(category).as_posix() for path in images))


def check_names(chosen: Sequence[str], known: Iterable[str], what: str) -> None:
    """Refuse an empty choice or a name not in ``known`` (argparse checks the command line; this, Python callers)."""
    if not chosen or set(chosen) - set(known):
        msg = f"choose {what} from {list(known)}, got {list(chosen)}"
        raise DatasetPrepareError(msg)
