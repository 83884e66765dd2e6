"""The NaN/Inf check of a state dict, for a backbone file and a fitted ConTNetPaDiM checkpoint alike.

A tensor holding NaN/Inf loads silently (strict loading checks names and shapes only)
and then makes every score NaN, so both kinds of file are checked before they load.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

__all__ = ["non_finite_counts"]


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
