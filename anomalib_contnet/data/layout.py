"""Publishing one MVTec AD category folder: filled beside its target, marked as ours, renamed into place.

Users point training runs at these folders, so a half-written or silently overwritten one costs
hours. A category is filled in a staging folder (:func:`~anomalib_contnet.atomic_files.staged_folder`)
that replaces its target only once complete. Its marker file names this tool, the settings and
the SHA-256 of every file written; an existing folder is replaced only when its marker says this
tool wrote it and every file in it is still one the tool wrote, unchanged (hashing a category's
images takes well under a second beside writing them).
"""

from __future__ import annotations

import contextlib
import hashlib
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


def _file_hashes(folder: Path) -> dict[str, str]:
    """{relative path: SHA-256} of every file under ``folder`` but the marker."""
    return {
        path.relative_to(folder).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file() and path.name != MANIFEST_NAME
    }


def _check_replaceable(target: Path) -> None:
    """Refuse ``target`` unless it is absent, holds no file, or holds only files this tool wrote, unchanged."""
    if not any(path.is_file() for path in target.rglob("*")):
        return
    try:
        marker = json.loads((target / MANIFEST_NAME).read_text(encoding="utf-8"))
        listed = dict(marker["files"]) if marker["generator"] == GENERATOR else None
    except (OSError, ValueError, KeyError, TypeError):
        listed = None
    if listed is None:
        msg = (
            f"{target} holds data that anomalib-contnet did not write (no readable {MANIFEST_NAME} of this "
            "version); refusing to overwrite it. Choose another --root, or move that folder away yourself."
        )
        raise DatasetPrepareError(msg)
    foreign = sorted(name for name, digest in _file_hashes(target).items() if listed.get(name) != digest)
    if foreign:
        msg = (
            f"{target} holds {len(foreign)} file(s) that anomalib-contnet did not write or that were changed since "
            f"(e.g. {foreign[:3]}); refusing to overwrite it. Move them elsewhere, or choose another --root."
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
        marker = {"generator": GENERATOR, "description": description, "files": _file_hashes(staging)}
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
