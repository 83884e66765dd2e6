"""What makes a file a ConTNetPaDiM checkpoint this version can load: its format entry and a state that fits.

A checkpoint is inspected before anything is built from it: a file of another
model, of a newer format, of other settings, or holding NaN/Inf is refused with
what to do instead of loading into wrong scores.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from anomalib.utils.serialization import anomalib_safe_globals
from torch import nn

from anomalib_contnet.checkpoints import compare_state_dict, non_finite_counts, read_checkpoint
from anomalib_contnet.models.contnet_padim.input_checks import listed

__all__ = [
    "CHECKPOINT_FORMAT_VERSION",
    "FORMAT_KEY",
    "check_checkpoint_format",
    "check_checkpoint_state",
    "read_model_checkpoint",
]

CHECKPOINT_FORMAT_VERSION = 2
"""Bumped whenever saved state changes meaning; checkpoints from a newer format are refused on load.

Version 2 stores the precision factor packed (1-D); no release wrote another version.
"""

FORMAT_KEY = "anomalib_contnet_format_version"
"""Top-level checkpoint key holding the format version; only ConTNetPaDiM checkpoints have it."""

_HYPER_PARAMETERS_THAT_SHAPE_STATE = ("backbone", "layers", "n_features", "factor_dtype")


def read_model_checkpoint(path: str | os.PathLike[str], safe_globals: Sequence[Any] = ()) -> dict[str, Any]:
    """Read a Lightning checkpoint for inspection, with anomalib's safe globals and ``safe_globals`` allowed."""
    with anomalib_safe_globals(extra=list(safe_globals)):
        return read_checkpoint(path, "use a complete .ckpt written by anomalib/Lightning")


def check_checkpoint_format(checkpoint: Mapping[str, Any], source: str) -> None:
    """Raise ValueError unless ``checkpoint`` is a ConTNetPaDiM checkpoint of a format this version reads."""
    state_dict = checkpoint.get("state_dict")
    if not isinstance(state_dict, Mapping):
        msg = (
            f"{source} has no state_dict, so it is not a Lightning model checkpoint. ConTNet backbone weights are "
            "passed as weights=<file> instead; a trained model is the .ckpt that engine.fit or anomalib train writes."
        )
        raise ValueError(msg)
    if FORMAT_KEY not in checkpoint:
        hyper_parameters = checkpoint.get("hyper_parameters")
        written_with = (
            f" (its hyper-parameters: {dict(hyper_parameters)})" if isinstance(hyper_parameters, Mapping) else ""
        )
        msg = (
            f"{source} is not a ConTNetPaDiM checkpoint: it lacks the {FORMAT_KEY!r} entry every ConTNetPaDiM "
            f"checkpoint has{written_with}. It was written by another model (for example anomalib's Padim); load "
            "it with the class that wrote it."
        )
        raise ValueError(msg)
    version = checkpoint[FORMAT_KEY]
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        msg = f"{source} has an invalid {FORMAT_KEY} {version!r} (expected a positive integer); the file is damaged"
        raise ValueError(msg)
    if version > CHECKPOINT_FORMAT_VERSION:
        msg = (
            f"{source} was written by a newer anomalib-contnet (format {version}; this version reads up to "
            f"{CHECKPOINT_FORMAT_VERSION}). Upgrade anomalib-contnet: pip install -U anomalib-contnet"
        )
        raise ValueError(msg)


def _hyper_parameter_differences(checkpoint: Mapping[str, Any], model: nn.Module) -> list[str]:
    """``name: checkpoint value vs model value`` for the hyper-parameters that decide parameter shapes."""
    saved = checkpoint.get("hyper_parameters")
    current = getattr(model, "hparams", None)
    if not isinstance(saved, Mapping) or not isinstance(current, Mapping):
        return []
    return [
        f"{name}={saved[name]!r} in the checkpoint, {current[name]!r} in this model"
        for name in _HYPER_PARAMETERS_THAT_SHAPE_STATE
        if name in saved and name in current and _normalised(saved[name]) != _normalised(current[name])
    ]


def _normalised(value: object) -> object:
    """Lists and tuples compare equal when their items do (YAML and Python spell sequences differently)."""
    return tuple(value) if isinstance(value, list | tuple) else value


def check_checkpoint_state(
    checkpoint: Mapping[str, Any], model: nn.Module, source: str, finite_prefix: str = "model."
) -> None:
    """Raise ValueError unless the checkpoint's state_dict fits ``model`` exactly and its map-making tensors are finite.

    Model tensors that are still empty (the Gaussian's parameters before fitting)
    take whatever shape the checkpoint brings, so only their presence is checked.
    NaN/Inf under ``finite_prefix`` (backbone and Gaussians) are refused because
    they would load silently and give NaN anomaly maps and scores; elsewhere they
    can be meaningful (anomalib's post-processor keeps NaN thresholds until it has
    seen validation data).
    """
    state_dict = checkpoint["state_dict"]
    expected = model.state_dict()
    not_tensors = [f"{key} ({type(value).__name__})" for key, value in state_dict.items() if not torch.is_tensor(value)]
    if not_tensors:
        msg = f"{source} is damaged: its state_dict holds values that are not tensors:\n{listed(not_tensors)}"
        raise ValueError(msg)
    mismatch = compare_state_dict(expected, state_dict, empty_takes_any_shape=True)
    if mismatch:
        differences = _hyper_parameter_differences(checkpoint, model)
        cause = f" It was trained with other settings: {'; '.join(differences)}." if differences else ""
        msg = (
            f"{source} does not fit this ConTNetPaDiM: {mismatch.describe()}.{cause} Build the model with the "
            "checkpoint's settings, or let ConTNetPaDiM.load_from_checkpoint(path) rebuild it from the checkpoint."
        )
        raise ValueError(msg)
    non_finite = [
        f"{key} ({bad} of {state_dict[key].numel()} values)"
        for key, bad in non_finite_counts(state_dict, finite_prefix).items()
    ]
    if non_finite:
        msg = (
            f"{source} holds NaN/Inf values, which would give NaN anomaly maps and scores; the file is damaged or "
            f"was saved from a model that diverged. Use an intact checkpoint or refit:\n{listed(non_finite)}"
        )
        raise ValueError(msg)
