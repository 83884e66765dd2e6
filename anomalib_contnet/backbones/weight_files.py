"""Where the ConTNet ImageNet checkpoint files are and how they get there: find, download, cache. No torch.

The anomaly detector is only meaningful with the ImageNet features, so nothing
here falls back to random weights: when no file can be found,
:class:`WeightsError` carries the exact steps that fix the situation (most
installations that run inspections are offline). Reading and checking the files
is :mod:`anomalib_contnet.backbones.weights`; this module needs no torch, so
``anomalib-contnet weights list`` answers at once.

Resolution order of :func:`resolve_weights` (first hit wins, no silent fallback
once a source is named):

1. the explicit ``weights`` argument (a file, a folder holding the variant's
   file name, or an http(s) URL downloaded into the cache);
2. ``$ANOMALIB_CONTNET_WEIGHTS`` (a file, or a folder holding the variant's file name);
3. the cache file :func:`cached_weights_path` (see :func:`cache_dir`);
4. the known download URL of the variant (:data:`PUBLISHED_WEIGHTS`), unless
   ``$ANOMALIB_CONTNET_OFFLINE`` or ``$HF_HUB_OFFLINE`` is set.

Everything written into the cache goes to a unique temporary file in the cache
folder first and is renamed into place only once complete and verified, so a
cut transfer or a concurrent download can never leave a partial file behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import os
import pickletools
import sys
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from anomalib_contnet import atomic_files
from anomalib_contnet.atomic_files import file_sha256

try:  # POSIX only; elsewhere unique temp names plus atomic rename still keep files intact.
    import fcntl
except ImportError:  # pragma: no cover - exercised on Windows only
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "CACHE_ENV",
    "CHUNK_BYTES",
    "PUBLISHED_WEIGHTS",
    "WEIGHTS_ENV",
    "PublishedWeights",
    "WeightsError",
    "cache_dir",
    "cached_weights_path",
    "download",
    "folder_lock",
    "missing_weights_help",
    "prepare_folder",
    "published_weights",
    "resolve_weights",
    "state_dict_keys_in_file",
    "temporary_sibling",
]

WEIGHTS_ENV = "ANOMALIB_CONTNET_WEIGHTS"
"""A checkpoint file, or a folder holding ``<variant>.pth`` files; overrides the cache."""

CACHE_ENV = "ANOMALIB_CONTNET_CACHE"
"""Folder for downloaded and imported checkpoints."""

OFFLINE_ENVS: tuple[str, ...] = ("ANOMALIB_CONTNET_OFFLINE", "HF_HUB_OFFLINE")
"""Any of these set to a true value forbids network access, so offline machines fail at once instead of waiting."""

CONNECT_TIMEOUT_S = 10.0
"""Socket timeout for connecting and for each read: long enough for a slow link, short enough to fail in seconds."""

CHUNK_BYTES = 1 << 20

AUTHORS_REPOSITORY = "https://github.com/yan-hao-tian/ConTNet"

_TRUE_VALUES = frozenset({"1", "true", "yes", "on"})


class WeightsError(RuntimeError):
    """Weights could not be found, fetched, verified or loaded; the message says which file and what to do."""


@dataclass(frozen=True)
class PublishedWeights:
    """Where a variant's ImageNet checkpoint comes from.

    ``url`` is None when the authors share the file only through links without
    stable names (Google Drive, Baidu); ``sha256`` is None because no hash was
    ever published (pass one explicitly to pin a file you trust).
    """

    variant: str
    file_name: str
    url: str | None
    sha256: str | None = None


_RELEASE = "https://github.com/okotaku/timmextension/releases/download/w_contnet"

PUBLISHED_WEIGHTS: dict[str, PublishedWeights] = {
    "contnet_ti": PublishedWeights("contnet_ti", "contnet_ti.pth", None),
    "contnet_s": PublishedWeights("contnet_s", "contnet_s.pth", None),
    "contnet_m": PublishedWeights("contnet_m", "contnet_m.pth", f"{_RELEASE}/contnet_m.pth"),
    "contnet_b": PublishedWeights("contnet_b", "contnet_b.pth", f"{_RELEASE}/contnet_b.pth"),
}
"""Known checkpoint files; M and B are re-hosted as GitHub release assets by a third party (okotaku/timmextension)."""


def published_weights(name: str) -> PublishedWeights:
    """Return the table entry of variant ``name``."""
    try:
        return PUBLISHED_WEIGHTS[name]
    except KeyError:
        msg = f"unknown ConTNet variant {name!r}; choose one of {sorted(PUBLISHED_WEIGHTS)}"
        raise WeightsError(msg) from None


def cache_dir() -> Path:
    """Folder of cached checkpoints: ``$ANOMALIB_CONTNET_CACHE``, else ``$XDG_CACHE_HOME/anomalib_contnet``, else ``~/.cache/anomalib_contnet``."""  # noqa: E501
    if explicit := os.environ.get(CACHE_ENV):
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "anomalib_contnet"


def cached_weights_path(name: str) -> Path:
    """Where the checkpoint of variant ``name`` lives in the cache (whether or not it exists)."""
    return cache_dir() / published_weights(name).file_name


def offline_reason() -> str | None:
    """Return the ``VAR=value`` that forbids network access, or None when downloading is allowed."""
    for variable in OFFLINE_ENVS:
        value = os.environ.get(variable, "")
        if value.strip().lower() in _TRUE_VALUES:
            return f"{variable}={value}"
    return None


def _normalise_sha256(sha256: str | None) -> str | None:
    """Lower-case a hex digest and reject anything that is not one, so a typo is caught before hours of waiting."""
    if sha256 is None:
        return None
    digest = sha256.strip().lower()
    if len(digest) != 64 or any(char not in "0123456789abcdef" for char in digest):
        msg = f"{sha256!r} is not a SHA-256 hex digest (64 hex characters)"
        raise WeightsError(msg)
    return digest


def _verify_sha256(path: Path, expected: str) -> None:
    """Raise unless ``path`` has the digest ``expected``."""
    actual = file_sha256(path)
    if actual != expected:
        msg = (
            f"{path} has SHA-256 {actual}, expected {expected}: the file is damaged or a different release. "
            f"Delete it and fetch it again, or pass the right hash."
        )
        raise WeightsError(msg)


def missing_weights_help(
    entry: PublishedWeights, reason: str, destination: Path | None = None, url: str | None = None
) -> str:
    """Explain why no weights were found and list every way to provide them."""
    destination = destination or cache_dir() / entry.file_name
    url = url or entry.url
    source = (
        f"download {url} on a machine with internet access"
        if url
        else f"get the {entry.variant} ImageNet checkpoint from the authors' links in {AUTHORS_REPOSITORY}"
    )
    return (
        f"No ImageNet weights for {entry.variant}: {reason}\n"
        f"Pretrained features are required and are never replaced by random ones. To provide them, {source}, then:\n"
        f"  - put the file at {destination}\n"
        f"  - or run: anomalib-contnet weights import {entry.variant} /path/to/{entry.file_name}\n"
        f"  - or set {WEIGHTS_ENV}=/path/to/{entry.file_name} (or to a folder holding {entry.file_name})\n"
        f"Only for experiments: pre_trained=False builds the backbone with untrained (random) features."
    )


def _local_checkpoint(path: Path, entry: PublishedWeights, origin: str) -> Path:
    """Accept a file, or a folder holding the variant's file name; anything else is an error naming ``origin``."""
    path = path.expanduser()
    if path.is_dir():
        candidate = path / entry.file_name
        if candidate.is_file():
            return candidate
        msg = (
            f"{origin} is the folder {path}, which holds no {entry.file_name}; "
            f"put the {entry.variant} checkpoint there under that name or point to the file itself"
        )
        raise WeightsError(msg)
    if path.is_file():
        return path
    msg = f"{origin} is {path}, which does not exist; point it to an existing {entry.variant} checkpoint"
    raise WeightsError(msg)


def _is_url(text: str) -> bool:
    return urllib.parse.urlsplit(text).scheme in {"http", "https"}


def _url_file_name(url: str, fallback: str) -> str:
    """Cache file name of a URL: its last path component, as torch.hub does."""
    return Path(urllib.parse.unquote(urllib.parse.urlsplit(url).path)).name or fallback


def _fetch_into_cache(entry: PublishedWeights, url: str, sha256: str | None, allowed: bool) -> Path:
    """Return the cached copy of ``url``, downloading it first when allowed; failures carry the full help text."""
    destination = cache_dir() / _url_file_name(url, entry.file_name)
    if destination.is_file():
        return destination
    problem = None
    if not allowed:
        problem = "downloading is disabled"
    elif offline := offline_reason():
        problem = f"offline mode ({offline}) forbids downloading {url}"
    if problem:
        raise WeightsError(missing_weights_help(entry, f"{destination} is missing and {problem}", destination, url))
    try:
        return download(url, destination, sha256)
    except WeightsError as error:
        raise WeightsError(missing_weights_help(entry, str(error), destination, url)) from error


def resolve_weights(
    name: str, weights: str | os.PathLike[str] | None = None, *, sha256: str | None = None, download: bool = True
) -> Path:
    """Find the checkpoint file of variant ``name`` (see the module docstring for the order).

    Args:
        name: variant, e.g. ``contnet_b``; picks the file name and the known URL.
        weights: explicit file, folder or http(s) URL; when given, nothing else is tried.
        sha256: expected digest of the resolved file (the table's digest is used for known files when published).
        download: allow network access for URLs (set False to only look at local files).

    A URL is cached under its last path component (as torch.hub does), so a
    URL ending in ``<variant>.pth`` also fills the cache slot that step 3 reads.

    Raises:
        WeightsError: with the steps to provide the file when none is available.
    """
    entry = published_weights(name)
    expected = _normalise_sha256(sha256)
    if weights is not None:
        text = os.fspath(weights)
        if _is_url(text):
            path = _fetch_into_cache(entry, text, expected, download)
        else:
            path = _local_checkpoint(Path(text), entry, "the weights argument")
    elif environment := os.environ.get(WEIGHTS_ENV):
        path = _local_checkpoint(Path(environment), entry, f"${WEIGHTS_ENV}")
    else:
        expected = expected or _normalise_sha256(entry.sha256)
        cached = cached_weights_path(name)
        if cached.is_file():
            path = cached
        elif entry.url is None:
            reason = f"{cached} is missing and no stable download URL is known for {name}"
            raise WeightsError(missing_weights_help(entry, reason, cached))
        else:
            path = _fetch_into_cache(entry, entry.url, expected, download)
    if expected:
        _verify_sha256(path, expected)
    return path


@contextlib.contextmanager
def folder_lock(folder: Path) -> Iterator[bool]:
    """Hold an exclusive lock on ``folder`` itself; yields whether another process held it first.

    Locking the folder rather than a lock file leaves nothing behind in the
    cache. The lock only avoids duplicate downloads: correctness comes from
    unique temporary names and the atomic rename.
    """
    if fcntl is None:  # pragma: no cover - Windows
        yield False
        return
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            waited = False
        except BlockingIOError:
            fcntl.flock(descriptor, fcntl.LOCK_EX)
            waited = True
        yield waited
    finally:
        os.close(descriptor)  # closing releases the lock


def prepare_folder(folder: Path) -> None:
    """Create the cache folder, turning permission and not-a-folder errors into advice."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        msg = (
            f"cannot create the cache folder {folder} ({error.strerror or error}); "
            f"set {CACHE_ENV} to a writable folder or {WEIGHTS_ENV} to an existing checkpoint"
        )
        raise WeightsError(msg) from error


@contextlib.contextmanager
def temporary_sibling(destination: Path) -> Iterator[tuple[Path, BinaryIO]]:
    """:func:`anomalib_contnet.atomic_files.temporary_sibling`, with the fix when the cache folder is not writable."""
    try:
        with atomic_files.temporary_sibling(destination) as opened:
            yield opened
    except atomic_files.FolderNotWritableError as error:
        msg = (
            f"cannot write into the cache folder {destination.parent} ({error.strerror or error}); "
            f"set {CACHE_ENV} to a writable folder or {WEIGHTS_ENV} to an existing checkpoint"
        )
        raise WeightsError(msg) from error


class _ProgressReport:
    """Prints a line per tenth of the transfer (or per 64 MiB when the size is unknown) to stderr."""

    def __init__(self, label: str, total: int | None, enabled: bool) -> None:
        self.label, self.total, self.enabled = label, total, enabled
        self.next_mark = 0

    def update(self, received: int) -> None:
        if not self.enabled:
            return
        step = self.total / 10 if self.total else 64 * CHUNK_BYTES
        if received >= self.next_mark or received == self.total:
            size = f"{received / 1e6:.1f}/{self.total / 1e6:.1f} MB" if self.total else f"{received / 1e6:.1f} MB"
            print(f"downloading {self.label}: {size}", file=sys.stderr, flush=True)
            self.next_mark = received + step


def _stream_to(url: str, stream: BinaryIO, sha256: str | None, progress: bool, label: str) -> None:
    """Copy ``url`` into ``stream``, checking the byte count against Content-Length and the digest when known."""
    request = urllib.request.Request(url, headers={"User-Agent": "anomalib-contnet"})
    digest = hashlib.sha256()
    received = 0
    try:
        with urllib.request.urlopen(request, timeout=CONNECT_TIMEOUT_S) as response:
            length = response.headers.get("Content-Length")
            expected_size = int(length) if length and length.isdigit() else None
            report = _ProgressReport(label, expected_size, progress)
            while chunk := response.read(CHUNK_BYTES):
                stream.write(chunk)
                digest.update(chunk)
                received += len(chunk)
                report.update(received)
        stream.flush()
        os.fsync(stream.fileno())
    except urllib.error.HTTPError as error:
        msg = f"downloading {url} failed: the server answered HTTP {error.code} {error.reason}"
        raise WeightsError(msg) from error
    except (OSError, http.client.HTTPException, ValueError) as error:
        msg = f"downloading {url} failed ({type(error).__name__}: {error}); check the URL and the network"
        raise WeightsError(msg) from error
    if expected_size is not None and received != expected_size:
        msg = f"downloading {url} failed: received {received} of {expected_size} bytes (transfer cut short)"
        raise WeightsError(msg)
    if sha256 is not None and digest.hexdigest() != sha256:
        msg = f"downloading {url} failed: SHA-256 {digest.hexdigest()} differs from the expected {sha256}"
        raise WeightsError(msg)


def download(
    url: str,
    destination: Path | str,
    sha256: str | None = None,
    progress: bool = True,
    *,
    validate: Callable[[Path], object] | None = None,
) -> Path:
    """Download ``url`` to ``destination`` atomically; nothing is left behind on failure.

    The body streams into a unique temporary file in the destination folder;
    size (Content-Length), ``sha256`` and the optional ``validate(temp_path)``
    are checked before ``os.replace`` puts it in place. A process that finds
    another one downloading into the same folder waits for it and reuses its
    file when that appeared meanwhile.

    Raises:
        WeightsError: unreachable server, HTTP error, short transfer, digest mismatch, unwritable folder,
            or whatever ``validate`` raised as WeightsError.
    """
    destination = Path(destination).expanduser()
    expected = _normalise_sha256(sha256)
    prepare_folder(destination.parent)
    with folder_lock(destination.parent) as waited:
        if waited and destination.is_file() and (expected is None or file_sha256(destination) == expected):
            return destination
        with temporary_sibling(destination) as (temporary, stream):
            _stream_to(url, stream, expected, progress, destination.name)
            stream.close()
            if validate is not None:
                validate(temporary)
            os.replace(temporary, destination)
    return destination


def state_dict_keys_in_file(path: Path | str) -> list[str] | None:
    """The text entries of a checkpoint file's pickle (its state_dict keys among them), read without torch.

    ``torch.save`` writes a zip archive whose ``*/data.pkl`` member holds every
    key as a string; the pickle's opcodes are only listed here, never executed.
    Returns None for a file in the pre-zip format or not a checkpoint archive
    (then only loading it with torch can tell).
    """
    try:
        with zipfile.ZipFile(path) as archive:
            member = next((name for name in archive.namelist() if name.endswith("/data.pkl")), None)
            if member is None:
                return None
            data = archive.read(member)
    except (OSError, zipfile.BadZipFile):
        return None
    try:
        return [argument for _, argument, _ in pickletools.genops(data) if isinstance(argument, str)]
    except ValueError:  # a damaged pickle stream
        return None
