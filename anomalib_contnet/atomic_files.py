"""Writing files and folders so that a reader sees the old version or the new one, never half of one.

The files this package writes for a user (converted weights, datasets, exports, benchmark
results, the demo's report) are written under a temporary name beside their target and
renamed into place (one file system, so the rename is atomic); a replaced folder is deleted
only once the new one is in place. The two mechanisms are :func:`staged_file` for one file
and :func:`staged_folder` for a folder; write one through them rather than renaming by hand.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

__all__ = [
    "replace_folder",
    "staged_file",
    "staged_folder",
    "write_bytes_atomically",
    "write_text_atomically",
]

READABLE_FILE_MODE = 0o644
"""Mode of published files: ``mkstemp`` creates 0600, but weights, datasets and results are meant to be shared."""
READABLE_FOLDER_MODE = 0o755
"""Mode of published folders (``mkdtemp`` creates 0700)."""


@contextlib.contextmanager
def staged_file(target: Path) -> Iterator[Path]:
    """Yield a new, empty file beside ``target`` to fill; on success it replaces ``target``, on failure it vanishes."""
    target.parent.mkdir(parents=True, exist_ok=True)
    descriptor, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
    os.close(descriptor)
    temporary = Path(name)
    try:
        yield temporary
        os.chmod(temporary, READABLE_FILE_MODE)
        os.replace(temporary, target)
    finally:
        temporary.unlink(missing_ok=True)


def write_bytes_atomically(target: Path, payload: bytes) -> None:
    """Write ``payload`` to ``target`` through :func:`staged_file`."""
    with staged_file(target) as temporary:
        temporary.write_bytes(payload)


def write_text_atomically(target: Path, text: str) -> None:
    """UTF-8 text variant of :func:`write_bytes_atomically`."""
    write_bytes_atomically(target, text.encode("utf-8"))


def replace_folder(produced: Path, target: Path) -> None:
    """Rename the finished folder ``produced`` to ``target``, which may exist: the older folder is swapped out whole.

    The older ``target`` is renamed into a temporary folder beside it first and
    deleted only after ``produced`` is in place; if that second rename fails, the
    older folder is put back. Between the two renames ``target`` is briefly
    absent, never a mix of old and new files.
    """
    if not target.exists():
        os.rename(produced, target)
        return
    retired_root = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.replaced-"))
    retired = retired_root / target.name
    os.rename(target, retired)
    try:
        os.rename(produced, target)
    except OSError:
        os.rename(retired, target)
        raise
    finally:
        shutil.rmtree(retired_root, ignore_errors=True)


@contextlib.contextmanager
def staged_folder(target: Path) -> Iterator[Path]:
    """Yield an empty folder beside ``target``; on success it replaces ``target`` whole, on failure it vanishes."""
    target = target.expanduser()
    if target.exists() and not target.is_dir():
        msg = f"{target} exists and is not a folder; choose another output path"
        raise FileExistsError(msg)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.partial-"))
    os.chmod(staging, READABLE_FOLDER_MODE)
    try:
        yield staging
        replace_folder(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
