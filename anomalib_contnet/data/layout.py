"""Writing one MVTec AD category folder safely: staged, manifested, published in one rename.

A dataset folder is something users point training runs at, so a half-written or
silently overwritten one costs hours. Every category is therefore built in a
private staging folder next to the target (same file system, so the final
``os.rename`` is atomic), described by a manifest that lists every file with its
sha256, and only then moved into place. An existing folder is replaced only when
its manifest proves this tool wrote it and nobody added or edited files since;
anything else is refused with the reason.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from anomalib_contnet.atomic_files import file_sha256, replace_folder

__all__ = [
    "MANIFEST_NAME",
    "CategoryWriter",
    "DatasetPrepareError",
    "PreparedCategory",
    "check_replaceable",
]

MANIFEST_NAME = ".anomalib_contnet_dataset.json"
"""File in every category folder this tool writes; its presence is what allows a later run to replace the folder."""
GENERATOR = "anomalib_contnet.data"
FORMAT_VERSION = 1
"""Bumped whenever the same options would produce different files."""


class DatasetPrepareError(RuntimeError):
    """A dataset cannot be prepared as asked; the message says what to change."""


@dataclass(frozen=True)
class PreparedCategory:
    """One category folder in MVTec AD layout, as written (or found identical) by this tool."""

    root: Path
    """The dataset root: pass it as ``MVTecAD(root=...)``."""
    category: str
    """The category name: pass it as ``MVTecAD(category=...)``."""
    counts: dict[str, int] = field(default_factory=dict)
    """Images per ``<split>/<label>`` folder, e.g. ``{"train/good": 470, "test/defective": 313}``."""
    unchanged: bool = False
    """True when an identical folder (same manifest) was already there and nothing was rewritten."""

    @property
    def path(self) -> Path:
        """The category folder itself."""
        return self.root / self.category


def check_replaceable(target: Path) -> None:
    """Refuse ``target`` unless it is absent, empty, or an untouched folder written by this tool.

    Called before any work starts (so a refusal is instant) and again right before
    publishing (so files added in between are not lost).
    """
    if not target.exists() and not target.is_symlink():
        return
    if target.is_symlink() or not target.is_dir():
        msg = f"{target} exists and is not a folder; choose another --root or category, or remove it yourself"
        raise DatasetPrepareError(msg)
    on_disk = {path.relative_to(target).as_posix() for path in target.rglob("*") if not path.is_dir()}
    if not on_disk:
        return
    manifest_path = target / MANIFEST_NAME
    if MANIFEST_NAME not in on_disk:
        msg = (
            f"{target} already holds data that anomalib-contnet did not write (no {MANIFEST_NAME}); "
            "refusing to overwrite it. Choose another --root, or move that folder away yourself."
        )
        raise DatasetPrepareError(msg)
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        listed: dict[str, str] = manifest["files"]
        generator = manifest["generator"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        msg = f"{manifest_path} is unreadable or damaged ({error}); refusing to overwrite {target}. Remove it yourself."
        raise DatasetPrepareError(msg) from error
    if generator != GENERATOR:
        msg = f"{manifest_path} names generator {generator!r}, not {GENERATOR!r}; refusing to overwrite {target}"
        raise DatasetPrepareError(msg)
    foreign = sorted(on_disk - set(listed) - {MANIFEST_NAME})
    if foreign:
        msg = (
            f"{target} holds {len(foreign)} file(s) that this tool did not write (e.g. {foreign[:3]}); "
            "refusing to overwrite them. Move them elsewhere, or choose another --root."
        )
        raise DatasetPrepareError(msg)
    edited = sorted(name for name in on_disk & set(listed) if file_sha256(target / name) != listed[name])
    if edited:
        msg = (
            f"{len(edited)} file(s) in {target} changed since this tool wrote them (e.g. {edited[:3]}); "
            "refusing to overwrite edits. Move the folder away, or choose another --root."
        )
        raise DatasetPrepareError(msg)


class CategoryWriter:
    """Stage the files of ``root/category`` and publish them in one step.

    Use as a context manager: leaving the block with an exception deletes the
    staging folder, leaving the target exactly as it was.
    """

    def __init__(self, root: Path | str, category: str) -> None:
        if not category or category.startswith(".") or Path(category).name != category:
            msg = f"category must be a plain folder name, got {category!r}"
            raise DatasetPrepareError(msg)
        self.root = Path(root).expanduser()
        self.category = category
        self.target = self.root / category
        if self.root.exists() and not self.root.is_dir():
            msg = f"--root {self.root} is a file; give a folder"
            raise DatasetPrepareError(msg)
        check_replaceable(self.target)
        self.root.mkdir(parents=True, exist_ok=True)
        self._staging = Path(tempfile.mkdtemp(dir=self.root, prefix=f".{category}.partial-"))
        self._hashes: dict[str, str] = {}

    def __enter__(self) -> CategoryWriter:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        if self._staging.exists():
            shutil.rmtree(self._staging, ignore_errors=True)

    def write_bytes(self, relative: str, payload: bytes) -> None:
        """Add one file (``relative`` uses ``/``, e.g. ``"train/good/000.png"``)."""
        if relative in self._hashes or relative == MANIFEST_NAME:
            msg = f"internal error: {relative} written twice"
            raise AssertionError(msg)
        path = self._staging / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(payload)
        self._hashes[relative] = hashlib.sha256(payload).hexdigest()

    def publish(self, description: dict[str, Any], counts: dict[str, int]) -> PreparedCategory:
        """Write the manifest and move the staged folder into place; keep an identical existing folder as is."""
        manifest = {
            "generator": GENERATOR,
            "format_version": FORMAT_VERSION,
            "category": self.category,
            "description": description,
            "counts": counts,
            "files": dict(sorted(self._hashes.items())),
        }
        manifest_bytes = (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode()
        (self._staging / MANIFEST_NAME).write_bytes(manifest_bytes)
        check_replaceable(self.target)
        existing_manifest = self.target / MANIFEST_NAME
        if existing_manifest.is_file() and existing_manifest.read_bytes() == manifest_bytes and self._complete():
            shutil.rmtree(self._staging)
            return PreparedCategory(self.root, self.category, counts, unchanged=True)
        replace_folder(self._staging, self.target)
        return PreparedCategory(self.root, self.category, counts, unchanged=False)

    def _complete(self) -> bool:
        """Whether every file the manifest lists is present in the target (hashes were checked already)."""
        return all((self.target / name).is_file() for name in self._hashes)
