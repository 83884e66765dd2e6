"""Small file helpers shared by the weights cache, dataset manifests, exports and converted weights."""

from __future__ import annotations

import hashlib
from pathlib import Path

__all__ = ["file_sha256"]

HASH_CHUNK_BYTES = 1 << 20


def file_sha256(path: Path | str) -> str:
    """Hex SHA-256 of a file, read in chunks so that multi-gigabyte weight files need little memory."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as stream:
        while chunk := stream.read(HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()
