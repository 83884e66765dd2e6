"""Reading checkpoint files and comparing their tensors with a model: one place for backbone and model checkpoints.

Both the ConTNet ImageNet files and fitted ConTNetPaDiM checkpoints are read
here, safely (``weights_only``, so a file cannot run code) and with an error that
names the file and says what to do. A state dict is compared with the model it
is meant for before anything loads, so a wrong file is refused whole with the
keys that differ instead of half-loading or failing deep inside torch.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

__all__ = ["StateDictMismatch", "compare_state_dict", "non_finite_counts", "read_checkpoint"]

SHOWN_KEYS = 5
"""Keys quoted per kind of difference in one message; the rest are counted."""


def read_checkpoint(path: str | os.PathLike[str], remedy: str) -> dict[str, Any]:
    """Read a checkpoint on CPU with ``weights_only`` (memory-mapped when its format allows); return its top level.

    Objects beyond tensors and plain containers need ``torch.serialization.safe_globals``
    (anomalib's ``anomalib_safe_globals``) around the call.

    Args:
        path: the file.
        remedy: what the user should do with a damaged file, ending the message (e.g. "fetch it again").

    Raises:
        FileNotFoundError: when ``path`` is not a file.
        ValueError: naming ``path`` when the file is truncated, refused by safe loading, or not a mapping.
    """
    path = Path(path)
    if not path.is_file():
        msg = f"checkpoint {path} does not exist"
        raise FileNotFoundError(msg)
    error: Exception | None = None
    for memory_map in (True, False):  # memory mapping needs the zip format that torch.save writes since 1.6
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=memory_map)
        except Exception as failure:  # noqa: BLE001 (any failure means the file cannot be used; reported below)
            error = failure
            continue
        if not isinstance(checkpoint, Mapping):
            msg = f"{path} holds a {type(checkpoint).__name__}, not a checkpoint (a mapping of names to tensors)"
            raise ValueError(msg)
        return dict(checkpoint)
    detail = _load_failure_detail(error)
    if "Unsupported global" in detail:
        msg = (
            f"{path} holds Python objects that safe loading refuses ({detail}). Checkpoints of this package hold "
            "none, so other code wrote this file: load it with that code, and only if you trust its source."
        )
    else:
        msg = (
            f"{path} is not a readable PyTorch checkpoint ({type(error).__name__}: {detail}). It is probably "
            f"truncated (an interrupted copy, save or download) or not a checkpoint at all: {remedy}."
        )
    raise ValueError(msg) from error


def _load_failure_detail(error: Exception | None) -> str:
    """The informative line of a torch.load failure.

    For ``weights_only`` refusals that is the line after "WeightsUnpickler error:".
    torch's first line suggests ``weights_only=False``, which would run code from
    the file and is not the fix for a damaged one.
    """
    text = str(error)
    marker = "WeightsUnpickler error:"
    if marker in text:
        text = text.split(marker, 1)[1]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return (lines[0] if lines else "")[:200]


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


def compare_state_dict(
    expected: Mapping[str, torch.Tensor], given: Mapping[str, torch.Tensor], *, empty_takes_any_shape: bool = False
) -> StateDictMismatch:
    """Missing, unexpected and wrong-shape keys of ``given`` against the model state ``expected``.

    A floating-point tensor where the model has an integer one (or the reverse)
    counts as a wrong shape: it would load, converted, and mean something else.

    Args:
        expected: the model's ``state_dict()``.
        given: the state to load.
        empty_takes_any_shape: model tensors that are still empty (parameters that
            fitting sizes, such as the Gaussians') accept whatever shape ``given`` brings.
    """
    mismatch = StateDictMismatch(
        missing=[key for key in expected if key not in given],
        unexpected=[key for key in given if key not in expected],
    )
    for key, value in expected.items():
        if key not in given:
            continue
        if given[key].shape != value.shape and not (empty_takes_any_shape and value.numel() == 0):
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
        if key.startswith(prefix) and value.is_floating_point() and not bool(torch.isfinite(value).all())
    }
