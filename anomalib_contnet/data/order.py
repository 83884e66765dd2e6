"""The one seeded order of file names: ELPV's splits, the benchmark's subsets and the demo's samples all use it."""

from __future__ import annotations

import hashlib

__all__ = ["seeded_order"]


def seeded_order(names: list[str], seed: int) -> list[str]:
    """Shuffle ``names`` by the sha256 of ``"<seed>:<name>"``.

    Unlike a NumPy permutation, this order depends on nothing but the seed and the names,
    so it is the same on every platform and library version, and adding a name never
    reorders the others.
    """
    return sorted(names, key=lambda name: hashlib.sha256(f"{seed}:{name}".encode()).hexdigest())
