"""Checking a state dict before it loads: against the model it is meant for, and for NaN/Inf values.

timm loads pretrained weights non-strictly (it drops the classifier), and a tensor
holding NaN/Inf loads silently and then makes every score NaN; so a backbone file
and a fitted ConTNetPaDiM checkpoint are both checked here first, and a wrong file
is refused whole with the keys that differ.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

__all__ = ["StateDictMismatch", "compare_state_dict", "non_finite_counts"]

SHOWN_KEYS = 5
"""Keys quoted per kind of difference in one message; the rest are counted."""


@dataclass
class StateDictMismatch:
    """Differences between a state dict and the model it is meant for, for error messages."""

    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    wrong_shape: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        """True when anything differs."""
        return bool(self.missing or self.unexpected or self.wrong_shape)

    def describe(self) -> str:
        """Counts and the first :data:`SHOWN_KEYS` keys of each kind of difference."""
        parts = []
        for label, keys in (
            ("missing", self.missing),
            ("unexpected", self.unexpected),
            ("wrong shape", self.wrong_shape),
        ):
            if keys:
                more = f", ... ({len(keys) - SHOWN_KEYS} more)" if len(keys) > SHOWN_KEYS else ""
                parts.append(f"{len(keys)} {label}: {', '.join(keys[:SHOWN_KEYS])}{more}")
        return "; ".join(parts)


def compare_state_dict(expected: Mapping[str, torch.Tensor], given: Mapping[str, torch.Tensor]) -> StateDictMismatch:
    """Missing, unexpected and wrong-shape keys of ``given`` against the model state ``expected``.

    A floating-point tensor where the model has an integer one (or the reverse)
    counts as a wrong shape: it would load, converted, and mean something else.
    """
    mismatch = StateDictMismatch(
        missing=[key for key in expected if key not in given],
        unexpected=[key for key in given if key not in expected],
    )
    for key, value in expected.items():
        if key not in given:
            continue
        if given[key].shape != value.shape:
            mismatch.wrong_shape.append(f"{key} {tuple(given[key].shape)} vs {tuple(value.shape)}")
        elif given[key].is_floating_point() != value.is_floating_point():
            mismatch.wrong_shape.append(f"{key} dtype {given[key].dtype} vs {value.dtype}")
    return mismatch


def non_finite_counts(state_dict: Mapping[str, torch.Tensor], prefix: str = "") -> dict[str, int]:
    """{key: how many NaN/Inf values} for the floating-point tensors under ``prefix`` that hold any, in key order.

    Such tensors load silently and then make every feature, distance and score NaN.
    """
    return {
        key: int((~torch.isfinite(value)).sum())
        for key, value in state_dict.items()
        if key.startswith(prefix)
        and torch.is_tensor(value)  # a damaged file may hold anything; loading then fails with its own error
        and value.is_floating_point()
        and not bool(torch.isfinite(value).all())
    }
