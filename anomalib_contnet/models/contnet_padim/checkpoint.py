"""What a ConTNetPaDiM checkpoint is checked for before it loads, so that it always defines the model it holds.

A fitted checkpoint's Gaussians describe the features of one backbone, layer choice,
channel subset and input size. ``anomalib test/predict --ckpt_path`` first builds a model
from the command line, then loads the checkpoint into it: the arguments left at their
defaults take the checkpoint's values, and one that was set to something else is refused,
instead of loading the Gaussians under another model's features.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from anomalib_contnet.checkpoints import non_finite_counts
from anomalib_contnet.models.contnet_padim.pre_processor import DEFAULT_IMAGE_SIZE

__all__ = ["arguments_to_adopt", "record_arguments", "refuse_unreadable"]

FORMAT_KEY = "anomalib_contnet_format_version"
"""Top-level checkpoint entry that only ConTNetPaDiM checkpoints have: another model's checkpoint is refused by name."""
FORMAT_VERSION = 3
"""What the saved state means (3: mean, principal directions, variances, count); other versions are refused."""

ARGUMENTS_KEY = "anomalib_contnet_model_arguments"
"""Top-level entry holding the :data:`MODEL_ARGUMENTS` the model was fitted with.

Lightning's ``load_from_checkpoint(path, **overrides)`` writes the overrides into the
checkpoint's ``hyper_parameters`` before the model sees it, so only an entry of the
plugin's own says what was fitted (``hyper_parameters`` serve older checkpoints).
"""
MODEL_ARGUMENTS = (
    "backbone",
    "layers",
    "n_features",
    "feature_seed",
    "epsilon",
    "sigma",
    "image_size",
    "neighbourhood",
    "shift_tolerance",
    "shared_covariance",
    "patch_context",
)
"""Constructor arguments that change the scores of a fitted model (the others, ``pre_trained``, ``weights`` and
``incremental``, only matter while fitting: a checkpoint holds every backbone weight)."""


def refuse_unreadable(checkpoint: Mapping[str, Any]) -> None:
    """Raise ValueError for another model's checkpoint, another format, or damaged (NaN/Inf, non-tensor) entries."""
    version = checkpoint.get(FORMAT_KEY)
    if version is None:
        msg = (
            f"not a ConTNetPaDiM checkpoint: it lacks the {FORMAT_KEY!r} entry every ConTNetPaDiM checkpoint "
            "has. It was written by another model (for example anomalib's Padim, or a backbone weights file, "
            "which is passed as weights=<file>); load it with the class that wrote it."
        )
        raise ValueError(msg)
    if version != FORMAT_VERSION:
        msg = (
            f"this checkpoint has {FORMAT_KEY}={version!r}; this anomalib-contnet reads format {FORMAT_VERSION}. "
            "Load it with the anomalib-contnet version that wrote it, or refit."
        )
        raise ValueError(msg)
    state_dict = checkpoint["state_dict"]
    damaged = [key for key, value in state_dict.items() if not torch.is_tensor(value)]
    damaged += list(non_finite_counts(state_dict, prefix="model."))  # would load silently and score NaN
    if damaged:
        msg = (
            "this checkpoint holds NaN/Inf values (which would give NaN anomaly maps and scores) or entries "
            "that are not tensors; the file is damaged or was saved from a model that diverged. Use an intact "
            f"checkpoint or refit: {len(damaged)} entries, first {damaged[:3]}"
        )
        raise ValueError(msg)


def record_arguments(checkpoint: dict[str, Any], arguments: Mapping[str, Any]) -> None:
    """Mark ``checkpoint`` as ConTNetPaDiM's, in the current format, with the fitted model's arguments."""
    checkpoint[FORMAT_KEY] = FORMAT_VERSION
    checkpoint[ARGUMENTS_KEY] = {
        name: list(value) if isinstance(value, tuple) else value
        for name, value in arguments.items()
        if name in MODEL_ARGUMENTS
    }


def _canonical(name: str, value: Any) -> Any:
    """One spelling per value: YAML and checkpoints give lists where Python code gives tuples, None means 224x224."""
    if name == "layers":
        return tuple(value)
    if name == "image_size":
        return tuple(int(side) for side in (value or DEFAULT_IMAGE_SIZE))
    if name in {"epsilon", "sigma"}:
        return float(value)
    return value


def arguments_to_adopt(checkpoint: Mapping[str, Any], given: Mapping[str, Any], defaults: Mapping[str, Any]) -> dict:
    """The checkpoint's values of the :data:`MODEL_ARGUMENTS` that differ from ``given`` ones left at their defaults.

    Raises:
        ValueError: when an argument set to something other than its default contradicts the checkpoint.
    """
    saved = checkpoint.get(ARGUMENTS_KEY) or checkpoint.get("hyper_parameters", {})
    adopted = {}
    for name in MODEL_ARGUMENTS:
        if name not in saved:
            continue
        ours, theirs = _canonical(name, given[name]), _canonical(name, saved[name])
        if ours == theirs:
            continue
        if ours != _canonical(name, defaults[name]):
            value = f"[{','.join(map(str, theirs))}]" if isinstance(theirs, tuple) else theirs
            msg = (
                f"ConTNetPaDiM argument {name}={given[name]!r} contradicts the checkpoint, which was fitted with "
                f"{name}={saved[name]!r}: its Gaussians describe that model's features, so the scores would be "
                f"wrong. Leave the argument out (no --model.{name} on the command line) to use the checkpoint's, "
                f"or pass --model.{name} '{value}'; for another {name}, fit a new model with it."
            )
            raise ValueError(msg)
        adopted[name] = saved[name]
    return adopted
