"""Reading, checking and loading the ConTNet ImageNet checkpoints that :mod:`.weight_files` finds.

Whichever source a checkpoint comes from, the network built for it is the one
its keys describe (strided or avg-down shortcut, see
:func:`~anomalib_contnet.backbones.contnet_configs.shortcut_of_state_dict`): the
file is read first, then the matching architecture is built, validated and loaded,
all or nothing.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from anomalib_contnet.backbones.contnet import (
    ConTNet,
    checkpoint_filter_fn,
    create_contnet,
    unwrap_checkpoint,
)
from anomalib_contnet.backbones.contnet_configs import (
    CONTNET_CFGS,
    SHORTCUT_LABELS,
    SHORTCUT_SPELLINGS,
    ConTNetConfig,
    shortcut_of_state_dict,
)
from anomalib_contnet.backbones.weight_files import (
    CHUNK_BYTES,
    WeightsError,
    cached_weights_path,
    download,
    folder_lock,
    missing_weights_help,
    prepare_folder,
    published_weights,
    resolve_weights,
    temporary_sibling,
)
from anomalib_contnet.checkpoints import compare_state_dict, non_finite_counts, read_checkpoint

__all__ = [
    "download_weights",
    "import_weights",
    "load_checkpoint_file",
    "locate_checkpoint",
    "pretrained_contnet",
    "validated_state_dict",
]

logger = logging.getLogger(__name__)


def load_checkpoint_file(path: Path | str) -> dict[str, Any]:
    """Read a checkpoint safely (``weights_only``, on CPU); unreadable files raise WeightsError naming them."""
    try:
        return read_checkpoint(path, "delete it and fetch it again")
    except (FileNotFoundError, ValueError) as error:
        raise WeightsError(str(error)) from error


def _unwrapped(checkpoint: Mapping[str, Any], path: Path | str) -> dict[str, torch.Tensor]:
    """The checkpoint's state_dict; a file that holds none raises WeightsError naming it."""
    try:
        return unwrap_checkpoint(checkpoint)
    except TypeError as error:
        msg = f"{path}: {error}"
        raise WeightsError(msg) from error


def _spelled_shortcut(state_dict: Mapping[str, torch.Tensor], path: Path | str) -> bool | None:
    """:func:`shortcut_of_state_dict` with errors naming ``path``."""
    try:
        return shortcut_of_state_dict(state_dict)
    except ValueError as error:
        msg = f"{path}: {error}"
        raise WeightsError(msg) from error


def validated_state_dict(model: ConTNet, checkpoint: Mapping[str, Any], path: Path | str) -> dict[str, torch.Tensor]:
    """Adapt ``checkpoint`` to ``model`` and check every key, shape, dtype kind and value before anything is loaded.

    Raises:
        WeightsError: naming ``path`` and listing what does not fit, so a wrong
            variant, the other shortcut network or a damaged file is never loaded halfway.
    """
    try:
        state_dict = checkpoint_filter_fn(checkpoint, model)
    except TypeError as error:
        msg = f"{path}: {error}"
        raise WeightsError(msg) from error
    spelled = _spelled_shortcut(state_dict, path)
    if spelled is not None and spelled != model.config.avg_down:
        msg = (
            f"{path} holds the {SHORTCUT_LABELS[spelled]} ConTNet (keys {SHORTCUT_SPELLINGS[spelled]}.weight), "
            f"but this model has the {SHORTCUT_LABELS[model.config.avg_down]} shortcut: these are different networks "
            f"and renaming the keys would compute other features. Build it with avg_down={spelled} "
            f"(or avg_down=None to follow the file)."
        )
        raise WeightsError(msg)
    mismatch = compare_state_dict(model.state_dict(), state_dict)
    if mismatch:
        config = model.config
        msg = (
            f"{path} does not fit this ConTNet (inplanes={config.inplanes}, layers={config.layers}, "
            f"num_classes={config.num_classes}): {mismatch.describe()}. Is it a checkpoint of another variant? "
            f"A mismatch only in 'fc' means another classifier size: build the model with num_classes=0."
        )
        raise WeightsError(msg)
    non_finite = non_finite_counts(state_dict)
    if non_finite:
        key, bad = next(iter(non_finite.items()))
        msg = f"{path}: {key} holds {bad} NaN/Inf values; the file is damaged, fetch it again"
        raise WeightsError(msg)
    return state_dict


def _shortcut_to_build(spelled: bool | None, requested: bool | None, path: Path | str) -> bool | None:
    """The ``avg_down`` to build for a checkpoint spelled ``spelled``; an explicit request may not contradict it."""
    if spelled is not None and requested is not None and spelled != requested:
        msg = (
            f"avg_down={requested} asks for the {SHORTCUT_LABELS[requested]} shortcut, but {path} holds the "
            f"{SHORTCUT_LABELS[spelled]} network (keys {SHORTCUT_SPELLINGS[spelled]}.weight): the two compute "
            f"different features. Pass avg_down=None to build the network the file was trained as, "
            f"or use a checkpoint of the {SHORTCUT_LABELS[requested]} network."
        )
        raise WeightsError(msg)
    return requested if spelled is None else spelled


def locate_checkpoint(
    name: str,
    weights: str | os.PathLike[str] | None = None,
    *,
    avg_down: bool | None = None,
    sha256: str | None = None,
) -> tuple[Path, dict[str, Any], bool | None]:
    """Find and read the checkpoint of variant ``name``; return (file, checkpoint, ``avg_down`` to build).

    The file comes from :func:`resolve_weights`; its shortcut spelling decides
    the network to build (None: the file has no shortcut keys, the variant's
    default applies). An explicit ``avg_down`` that contradicts the file is refused.
    Every loader (:func:`pretrained_contnet`, timm's ``contnet_*`` entry points) starts here.

    Raises:
        WeightsError: no file, an unreadable one, or a contradicting ``avg_down``.
    """
    path = resolve_weights(name, weights, sha256=sha256)
    checkpoint = load_checkpoint_file(path)
    spelled = _spelled_shortcut(_unwrapped(checkpoint, path), path)
    return path, checkpoint, _shortcut_to_build(spelled, avg_down, path)


def pretrained_contnet(
    name: str,
    weights: str | os.PathLike[str] | None = None,
    *,
    avg_down: bool | None = None,
    num_classes: int = 1000,
    sha256: str | None = None,
    **overrides: Any,
) -> ConTNet:
    """Build variant ``name`` as the network its checkpoint describes, and load that checkpoint strictly.

    The file (found by :func:`resolve_weights`) is read first; its shortcut
    spelling decides ``avg_down`` (an explicit, contradicting ``avg_down`` is
    refused), then the whole state_dict is validated before it is loaded, and
    the choice is logged. ``timm.create_model(name, pretrained=True)`` takes the same
    steps through :func:`locate_checkpoint` and :func:`validated_state_dict`.

    Raises:
        WeightsError: no file, unreadable file, contradicting ``avg_down``, or a state_dict that does not fit.
    """
    path, checkpoint, built = locate_checkpoint(name, weights, avg_down=avg_down, sha256=sha256)
    model = create_contnet(name, avg_down=built, num_classes=num_classes, **overrides)
    model.load_state_dict(validated_state_dict(model, checkpoint, path), strict=True)
    shortcut = model.config.avg_down
    logger.info(
        "built %s with the %s shortcut: %s spells %s",
        name,
        SHORTCUT_LABELS[shortcut],
        path,
        SHORTCUT_SPELLINGS[shortcut],
    )
    return model


def _check_checkpoint_file(name: str, path: Path | str) -> ConTNetConfig:
    """Check that ``path`` loads strictly into variant ``name``; returns the architecture it was checked with.

    The architecture is the one the file describes: with ``fc`` keys the
    1000-class model, without them the headless model (``num_classes=0``); the
    shortcut its keys spell. The check builds the model on the meta device, so
    it costs no memory beyond the file itself.
    """
    published_weights(name)
    checkpoint = load_checkpoint_file(path)
    state_dict = _unwrapped(checkpoint, path)
    num_classes = CONTNET_CFGS[name].num_classes if any(key.startswith("fc.") for key in state_dict) else 0
    with torch.device("meta"):
        model = create_contnet(name, avg_down=_spelled_shortcut(state_dict, path), num_classes=num_classes)
    validated_state_dict(model, checkpoint, path)
    return model.config


def import_weights(name: str, source: Path | str) -> Path:
    """Validate ``source`` for variant ``name`` and copy it atomically to :func:`cached_weights_path`."""
    source = Path(source).expanduser()
    _check_checkpoint_file(name, source)
    destination = cached_weights_path(name)
    prepare_folder(destination.parent)
    if destination.exists() and destination.resolve() == source.resolve():
        return destination
    with (
        folder_lock(destination.parent),
        temporary_sibling(destination) as (temporary, stream),
        source.open("rb") as original,
    ):
        shutil.copyfileobj(original, stream, CHUNK_BYTES)
        stream.flush()
        os.fsync(stream.fileno())
        stream.close()
        os.replace(temporary, destination)
    return destination


def download_weights(
    name: str, url: str | None = None, sha256: str | None = None, *, force: bool = False, progress: bool = True
) -> Path:
    """Download variant ``name`` into :func:`cached_weights_path`, checking it loads strictly before it lands there.

    This is an explicit user request, so it does not consult the offline switches.
    """
    entry = published_weights(name)
    url = url or entry.url
    if url is None:
        reason = f"no stable download URL is known for {name}; pass --url, or import a file you have"
        raise WeightsError(missing_weights_help(entry, reason))
    destination = cached_weights_path(name)
    if destination.is_file() and not force:
        return destination

    def check_download(temporary: Path) -> None:
        try:
            _check_checkpoint_file(name, temporary)
        except WeightsError as error:
            msg = f"{url} did not deliver a usable {name} checkpoint (nothing was cached): {error}"
            raise WeightsError(msg) from error

    expected = sha256 or (entry.sha256 if url == entry.url else None)
    try:
        return download(url, destination, expected, progress, validate=check_download)
    except WeightsError as error:
        raise WeightsError(missing_weights_help(entry, str(error), destination, url)) from error
