"""Checks that turn bad inputs into clear errors before they turn into wrong results.

Each check sits where the bad input is still recognisable, and costs little on
good input: image files are checked before a stage runs (PNG by its chunk
checksums, other formats by decoding them), checkpoints are inspected before anything is built from them, and
warnings that concern one fit are shown for every fit. ``docs/reliability.md``
lists every bad input these checks answer and the test that proves it.
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from anomalib.utils.serialization import anomalib_safe_globals
from PIL import Image
from torch import distributed, nn

from anomalib_contnet.backbones.contnet import StateDictMismatch

__all__ = [
    "CHECKPOINT_FORMAT_VERSION",
    "FORMAT_KEY",
    "HIGH_BIT_DEPTH_MODES",
    "check_checkpoint_format",
    "check_checkpoint_state",
    "check_image_files",
    "dataset_image_paths",
    "loader_datasets",
    "read_checkpoint",
    "require_training_images",
    "warn_each_time",
]

CHECKPOINT_FORMAT_VERSION = 2
"""Bumped whenever saved state changes meaning; checkpoints from a newer format are refused on load.

Version 2 stores the precision factor packed (1-D); version-1 checkpoints (full factor) are packed on load.
"""

FORMAT_KEY = "anomalib_contnet_format_version"
"""Top-level checkpoint key holding the format version; only ConTNetPaDiM checkpoints have it."""

HIGH_BIT_DEPTH_MODES = frozenset({"I", "I;16", "I;16B", "I;16L", "I;16N", "F"})
"""Pillow modes of one-channel images with more than 8 bits (16-bit PNG/TIFF, 32-bit integer or float).

anomalib reads every image with ``Image.convert("RGB")``, which clips these values
at 255 instead of scaling them: a 16-bit image becomes almost uniformly white, and
the model would score that. 16-bit colour PNGs are not affected (Pillow reduces
them to 8 bits per channel correctly).
"""

_SHOWN = 5
"""Offending files or keys quoted in one message; the rest are counted."""

_HYPER_PARAMETERS_THAT_SHAPE_STATE = ("backbone", "layers", "n_features", "factor_dtype")


def _quote(items: Sequence[str]) -> str:
    """First few items, one per line, and how many more there are."""
    lines = [f"  - {item}" for item in items[:_SHOWN]]
    if len(items) > _SHOWN:
        lines.append(f"  ... and {len(items) - _SHOWN} more")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ image files
def check_image_files(paths: Iterable[str | os.PathLike[str]], purpose: str) -> None:
    """Raise ValueError naming every file in ``paths`` that anomalib would fail on or silently misread.

    A PNG is checked with Pillow's ``verify``, which checks every chunk's checksum
    (a truncated or damaged PNG fails) without decoding pixels: about a millisecond
    per file. Other formats have no checksums (a truncated JPEG opens and verifies
    fine, then fails mid-run with Pillow's "image file is truncated" and no file
    name), so they are decoded with the decoder anomalib's reader uses; JPEGs at
    reduced scale (libjpeg's scaled decoding still reads the whole entropy-coded
    stream, so cuts are found), a few milliseconds per 1024 px photograph.

    Args:
        paths: image files a stage is about to read.
        purpose: what the images are for (``"training"``, ``"prediction"``...), for the message.
    """
    unreadable: list[str] = []
    high_bit_depth: list[str] = []
    for path in paths:
        try:
            with Image.open(path) as image:
                mode = image.mode
                if image.format == "PNG":
                    image.verify()
                else:
                    image.draft("RGB", (max(1, image.width // 8), max(1, image.height // 8)))
                    image.load()
        except Exception as error:  # noqa: BLE001 (Pillow raises many types; every one means the file is unusable)
            unreadable.append(f"{path} ({type(error).__name__}: {error})")
            continue
        if mode in HIGH_BIT_DEPTH_MODES:
            high_bit_depth.append(f"{path} (mode {mode})")
    problems = []
    if unreadable:
        problems.append(
            f"{len(unreadable)} file(s) are not readable images (damaged, truncated, or not an image at all); "
            f"replace or remove them:\n{_quote(unreadable)}"
        )
    if high_bit_depth:
        problems.append(
            f"{len(high_bit_depth)} file(s) are one-channel images with more than 8 bits per pixel. anomalib reads "
            "images with Pillow's convert('RGB'), which clips such values at 255 instead of scaling them, so the "
            "model would see an almost white image. Convert them to 8 bits first (16-bit: divide by 257; "
            f"float: scale to 0..255):\n{_quote(high_bit_depth)}"
        )
    if problems:
        msg = f"cannot use the {purpose} images:\n" + "\n".join(problems)
        raise ValueError(msg)


def dataset_image_paths(dataset: object) -> list[str]:
    """Image files an anomalib dataset will read: its images and masks (``samples``), or a PredictDataset's files.

    Other datasets (user-made tensors, custom classes) give an empty list: there
    are no files to check.
    """
    try:
        samples = getattr(dataset, "samples", None)
    except RuntimeError:  # an AnomalibDataset whose samples were never set
        samples = None
    columns = getattr(samples, "columns", ())
    if samples is not None and "image_path" in columns:
        paths = [str(path) for path in samples["image_path"]]
        if "mask_path" in columns:  # empty (or NaN) for normal images
            paths += [str(path) for path in samples["mask_path"] if isinstance(path, str | os.PathLike) and path]
        return paths
    file_names = getattr(dataset, "image_filenames", None)
    if isinstance(file_names, Iterable) and not isinstance(file_names, str | bytes):
        return [str(path) for path in file_names]
    return []


def loader_datasets(loaders: object) -> Iterator[object]:
    """Datasets of a Lightning dataloader attribute: one DataLoader, or a list, tuple or dict of them."""
    if loaders is None:
        return
    if isinstance(loaders, Mapping):
        loaders = list(loaders.values())
    if isinstance(loaders, list | tuple):
        for loader in loaders:
            yield from loader_datasets(loader)
        return
    dataset = getattr(loaders, "dataset", None)
    if dataset is not None:
        yield dataset


def require_training_images(datamodule: object) -> None:
    """Raise ValueError when an anomalib datamodule found no training images.

    Without this, an empty training folder surfaces as torch's
    "num_samples should be a positive integer value" from the data loader.
    """
    train_data = getattr(datamodule, "train_data", None)
    if train_data is None or len(train_data) > 0:
        return
    where = ", ".join(
        f"{name}={getattr(datamodule, name)}"
        for name in ("root", "category", "normal_dir")
        if getattr(datamodule, name, None) is not None
    )
    msg = (
        f"{type(datamodule).__name__} found no training images ({where}). ConTNetPaDiM fits its Gaussians on "
        "normal training images and needs at least 2: put them in the training folder (MVTec AD layout: "
        "<root>/<category>/train/good) or point the datamodule to the right folder."
    )
    raise ValueError(msg)


# ------------------------------------------------------------------------------------------------ checkpoints
def read_checkpoint(path: str | os.PathLike[str], safe_globals: Sequence[Any] = ()) -> dict[str, Any]:
    """Read a Lightning checkpoint for inspection (on CPU, memory-mapped when possible, ``weights_only``).

    Raises:
        FileNotFoundError: when ``path`` is not a file.
        ValueError: naming ``path`` when the file is truncated or not a checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        msg = f"checkpoint {path} does not exist"
        raise FileNotFoundError(msg)
    error: Exception | None = None
    for memory_map in (True, False):  # memory mapping needs the zip format that torch.save writes since 1.6
        try:
            with anomalib_safe_globals(extra=list(safe_globals)):
                checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=memory_map)
        except Exception as failure:  # noqa: BLE001 (any failure means the file cannot be used; reported below)
            error = failure
            continue
        if not isinstance(checkpoint, Mapping):
            msg = f"{path} holds a {type(checkpoint).__name__}, not a Lightning checkpoint (a dict with a state_dict)"
            raise ValueError(msg)
        return dict(checkpoint)
    detail = _load_failure_detail(error)
    if "Unsupported global" in detail:
        msg = (
            f"{path} holds Python objects that safe loading refuses ({detail}). ConTNetPaDiM checkpoints hold none, "
            "so other code wrote this file: load it with that code, and only if you trust its source."
        )
    else:
        msg = (
            f"{path} is not a readable checkpoint ({type(error).__name__}: {detail}). It is probably truncated (an "
            "interrupted copy or save) or not a checkpoint at all: use a complete .ckpt written by anomalib/Lightning."
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
        msg = f"{source} is damaged: its state_dict holds values that are not tensors:\n{_quote(not_tensors)}"
        raise ValueError(msg)
    mismatch = StateDictMismatch(
        missing=[key for key in expected if key not in state_dict],
        unexpected=[key for key in state_dict if key not in expected],
        wrong_shape=[
            f"{key} {tuple(state_dict[key].shape)} vs {tuple(value.shape)}"
            for key, value in expected.items()
            if key in state_dict and value.numel() > 0 and state_dict[key].shape != value.shape
        ],
    )
    mismatch.wrong_shape += [
        f"{key} dtype {state_dict[key].dtype} vs {value.dtype}"
        for key, value in expected.items()
        if key in state_dict and state_dict[key].is_floating_point() != value.is_floating_point()
    ]
    if mismatch:
        differences = _hyper_parameter_differences(checkpoint, model)
        cause = f" It was trained with other settings: {'; '.join(differences)}." if differences else ""
        msg = (
            f"{source} does not fit this ConTNetPaDiM: {mismatch.describe(_SHOWN)}.{cause} Build the model with the "
            "checkpoint's settings, or let ConTNetPaDiM.load_from_checkpoint(path) rebuild it from the checkpoint."
        )
        raise ValueError(msg)
    non_finite = [
        f"{key} ({int((~torch.isfinite(value)).sum())} of {value.numel()} values)"
        for key, value in state_dict.items()
        if key.startswith(finite_prefix) and value.is_floating_point() and not bool(torch.isfinite(value).all())
    ]
    if non_finite:
        msg = (
            f"{source} holds NaN/Inf values, which would give NaN anomaly maps and scores; the file is damaged or "
            f"was saved from a model that diverged. Use an intact checkpoint or refit:\n{_quote(non_finite)}"
        )
        raise ValueError(msg)


# ------------------------------------------------------------------------------------------------ warnings
def warn_each_time(message: str, stacklevel: int = 2) -> None:
    """Issue a UserWarning every time it is called, on the first distributed process only.

    ``warnings.warn`` shows a message once per code location and process under
    Python's default filters, so a second fit in the same process (a benchmark
    over categories, a notebook) would stay silent about its own problem. Passing
    no registry to ``warn_explicit`` keeps that deduplication out, while user
    filters (``-W error``, ``filterwarnings``) still apply.
    """
    if distributed.is_available() and distributed.is_initialized() and distributed.get_rank() != 0:
        return
    frame = sys._getframe(stacklevel)  # the caller's location, as warnings.warn would report it
    warnings.warn_explicit(
        message,
        UserWarning,
        filename=frame.f_code.co_filename,
        lineno=frame.f_lineno,
        module=frame.f_globals.get("__name__", "<unknown>"),
        registry=None,
        module_globals=frame.f_globals,
    )
