"""Where the ConTNet ImageNet checkpoints are: the lookup, the cache and the download. Imports no torch.

Nothing here falls back to random weights: without a file, :class:`WeightsError` says at
once every way to provide one (most inspection machines are offline).

:func:`resolve_weights` takes the first source that is set: the explicit ``weights``
argument (a file, a folder holding ``<variant>.pth``, or an http(s) URL), then
``$ANOMALIB_CONTNET_WEIGHTS`` (a file or such a folder), then the cache file
:func:`cached_weights_path`, then the published URL unless an offline switch is set.
"""

from __future__ import annotations

import os
import tempfile
import urllib.parse
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path

from anomalib_contnet.backbones.contnet_configs import CONTNET_CFGS, list_contnet_variants

__all__ = [
    "CACHE_ENV",
    "PUBLISHED_URLS",
    "WEIGHTS_ENV",
    "WeightsError",
    "cache_dir",
    "cached_weights_path",
    "checkpoint_keys",
    "download_file",
    "resolve_weights",
]

WEIGHTS_ENV = "ANOMALIB_CONTNET_WEIGHTS"
"""A checkpoint file, or a folder holding ``<variant>.pth`` files; overrides the cache."""

CACHE_ENV = "ANOMALIB_CONTNET_CACHE"
"""Folder for downloaded and imported checkpoints."""

OFFLINE_ENVS = ("ANOMALIB_CONTNET_OFFLINE", "HF_HUB_OFFLINE")
"""Any of these set to a true value forbids downloads, so an offline machine gets the remedies at once."""

AUTHORS_REPOSITORY = "https://github.com/yan-hao-tian/ConTNet"

_RELEASE = "https://github.com/okotaku/timmextension/releases/download/w_contnet"

PUBLISHED_URLS: dict[str, str] = {
    "contnet_m": f"{_RELEASE}/contnet_m.pth",
    "contnet_b": f"{_RELEASE}/contnet_b.pth",
}
"""Stable downloads, re-hosted as GitHub release assets by a third party (okotaku/timmextension).

Ti and S are shared by the authors only through links without stable names
(Google Drive, Baidu); no hash was ever published for any of them.
"""


class WeightsError(RuntimeError):
    """Weights could not be found, fetched or loaded; the message names the file and says what to do."""


def cache_dir() -> Path:
    """``$ANOMALIB_CONTNET_CACHE``, else ``$XDG_CACHE_HOME/anomalib_contnet``, else ``~/.cache/anomalib_contnet``."""
    if explicit := os.environ.get(CACHE_ENV):
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "anomalib_contnet"


def cached_weights_path(name: str) -> Path:
    """Where the checkpoint of variant ``name`` lives in the cache (whether or not it exists)."""
    return cache_dir() / f"{name}.pth"


def _offline_reason() -> str | None:
    """The ``VAR=value`` that forbids downloads, or None."""
    for variable in OFFLINE_ENVS:
        value = os.environ.get(variable, "")
        if value.strip().lower() in {"1", "true", "yes", "on"}:
            return f"{variable}={value}"
    return None


def missing_weights_help(name: str, reason: str, url: str | None = None) -> str:
    """Why no weights were found, and every way to provide them."""
    url = url or PUBLISHED_URLS.get(name)
    source = f"download {url}" if url else f"get the {name} checkpoint from the authors' links in {AUTHORS_REPOSITORY}"
    return (
        f"No ImageNet weights for {name}: {reason}\n"
        f"Pretrained features are required and are never replaced by random ones. To provide them, {source}, then:\n"
        f"  - put the file at {cached_weights_path(name)}\n"
        f"  - or run: anomalib-contnet weights import {name} /path/to/{name}.pth\n"
        f"  - or set {WEIGHTS_ENV}=/path/to/{name}.pth (or to a folder holding {name}.pth)\n"
        f"Only for experiments: pre_trained=False builds the backbone with untrained (random) features."
    )


def _local_file(name: str, path: Path, origin: str) -> Path:
    """``path`` itself, or ``<name>.pth`` in the folder ``path``; anything else is an error naming ``origin``."""
    path = path.expanduser()
    candidate = path / f"{name}.pth" if path.is_dir() else path
    if candidate.is_file():
        return candidate
    msg = f"{origin} is {path}, which holds no {name}.pth; point it to the {name} checkpoint or its folder"
    raise WeightsError(msg)


def resolve_weights(name: str, weights: str | os.PathLike[str] | None = None, *, download: bool = True) -> Path:
    """The checkpoint file of variant ``name``, downloaded into the cache when it comes from a URL.

    A URL is cached under its last path component, as ``torch.hub`` does, so a
    URL ending in ``<name>.pth`` fills the slot that the cache lookup reads.

    Raises:
        WeightsError: with the steps that provide the file, when none is available or allowed.
    """
    if name not in CONTNET_CFGS:
        msg = f"unknown ConTNet variant {name!r}; choose one of {list_contnet_variants()}"
        raise WeightsError(msg)
    if weights is not None and urllib.parse.urlsplit(os.fspath(weights)).scheme not in {"http", "https"}:
        return _local_file(name, Path(weights), "the weights argument")
    if weights is None and (environment := os.environ.get(WEIGHTS_ENV)):
        return _local_file(name, Path(environment), f"${WEIGHTS_ENV}")
    url = None if weights is None else os.fspath(weights)
    destination = cache_dir() / Path(urllib.parse.urlsplit(url).path).name if url else cached_weights_path(name)
    if destination.is_file():
        return destination
    url = url or PUBLISHED_URLS.get(name)
    if url is None:
        reason = f"{destination} is missing and no stable download URL is known for {name}"
    elif not download:
        reason = f"{destination} is missing and downloading is disabled"
    elif offline := _offline_reason():
        reason = f"{destination} is missing and offline mode ({offline}) forbids downloading {url}"
    else:
        try:
            return download_file(url, destination)
        except WeightsError as error:
            reason = str(error)
    raise WeightsError(missing_weights_help(name, reason, url))


def checkpoint_keys(path: Path) -> list[str]:
    """The parameter names in checkpoint ``path``, as timm's loader will see them (wrapper and ``module.`` removed).

    A ``torch.save`` zip archive is memory-mapped, so only its small pickle is
    read here and the tensors stay on disk until the model loads them.

    Raises:
        WeightsError: naming the file, when it is not a readable checkpoint holding a state dict.
    """
    import torch  # noqa: PLC0415  (not for `weights list`)

    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as error:
        detail = str(error).strip().splitlines()[0][:200] if str(error).strip() else ""
        msg = (
            f"{path} is not a readable PyTorch checkpoint ({type(error).__name__}: {detail}). It is probably "
            f"truncated (an interrupted copy or download) or not a checkpoint: delete it and fetch it again."
        )
        raise WeightsError(msg) from error
    if isinstance(checkpoint, Mapping):  # the entry that timm's load_state_dict loads, in its order
        for container in ("state_dict_ema", "model_ema", "state_dict", "model"):
            if checkpoint.get(container) is not None:
                checkpoint = checkpoint[container]
                break
    if not isinstance(checkpoint, Mapping) or not all(isinstance(key, str) for key in checkpoint):
        msg = f"{path} holds a {type(checkpoint).__name__}, not a state dict (a mapping of names to tensors)"
        raise WeightsError(msg)
    return [key.removeprefix("module.") for key in checkpoint]


def download_file(
    url: str, destination: Path, hash_prefix: str | None = None, check: Callable[[Path], object] = checkpoint_keys
) -> Path:
    """Download ``url`` to ``destination``; the file lands there only when complete and accepted by ``check``.

    ``torch.hub.download_url_to_file`` fetches into a temporary folder beside
    ``destination`` and checks ``hash_prefix`` (of the SHA-256). It cannot tell a
    transfer cut short, so ``check`` reads the file before the rename.

    Raises:
        WeightsError: an unwritable cache folder, a failed transfer, a wrong hash, or whatever ``check`` refuses.
    """
    import torch.hub  # noqa: PLC0415  (not for `weights list`)

    try:
        destination.parent.mkdir(parents=True, exist_ok=True)
        staging = tempfile.TemporaryDirectory(dir=destination.parent, prefix=f".{destination.name}.")
    except OSError as error:
        msg = (
            f"cannot write into the cache folder {destination.parent} ({error.strerror or error}); "
            f"set {CACHE_ENV} to a writable folder or {WEIGHTS_ENV} to an existing checkpoint"
        )
        raise WeightsError(msg) from error
    with staging:
        staged = Path(staging.name) / destination.name
        try:
            torch.hub.download_url_to_file(url, str(staged), hash_prefix)
        except (OSError, RuntimeError, ValueError) as error:  # URLError is an OSError; a wrong hash a RuntimeError
            msg = f"downloading {url} failed ({error}); check the URL, the hash and the network"
            raise WeightsError(msg) from error
        check(staged)
        os.replace(staged, destination)
    return destination
