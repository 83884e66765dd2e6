"""``anomalib-contnet weights ...``: list, download and import the ConTNet ImageNet checkpoints.

Inspection machines are usually offline, so the typical flow is ``weights
download`` on a connected machine (or fetching the file by hand) and ``weights
import`` on the target, which checks the file before it enters the cache.
Failures print one line of advice on stderr and exit with status 2. Every
command says which shortcut network (strided or avg-down) a file holds, since
that is the architecture it will be run as.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
from collections.abc import Callable
from pathlib import Path

from anomalib_contnet.backbones.contnet_configs import (
    CONTNET_CFGS,
    SHORTCUT_LABELS,
    SHORTCUT_SPELLINGS,
    list_contnet_variants,
    shortcut_of_state_dict,
)
from anomalib_contnet.backbones.weight_files import (
    WEIGHTS_ENV,
    WeightsError,
    cache_dir,
    cached_weights_path,
    published_weights,
    resolve_weights,
    state_dict_keys_in_file,
)

ERROR_EXIT_CODE = 2

Handler = Callable[[argparse.Namespace], int]


def _reporting_errors(handler: Handler) -> Handler:
    """Turn WeightsError into a message on stderr and exit status 2 instead of a traceback."""

    @functools.wraps(handler)
    def wrapper(args: argparse.Namespace) -> int:
        try:
            return handler(args)
        except WeightsError as error:
            print(f"anomalib-contnet weights: error: {error}", file=sys.stderr)
            return ERROR_EXIT_CODE

    return wrapper


def _spelled_shortcut(path: Path) -> bool | str:
    """The ``avg_down`` that ``path``'s keys spell, read without torch, or what keeps it from being told."""
    keys = state_dict_keys_in_file(path)
    if keys is None:
        return "unknown (not a zip checkpoint)"
    try:
        avg_down = shortcut_of_state_dict(key.removeprefix("module.") for key in keys)
    except ValueError:
        return "unusable (mixes both spellings)"
    return "no shortcut keys" if avg_down is None else avg_down


def _file_shortcut(path: Path) -> str:
    """Which shortcut network ``path`` holds, for the listing: ``avg-down (downsample.conv.conv)``."""
    avg_down = _spelled_shortcut(path)
    return avg_down if isinstance(avg_down, str) else f"{SHORTCUT_LABELS[avg_down]} ({SHORTCUT_SPELLINGS[avg_down]})"


def _shortcut_note(path: Path) -> str:
    """``(avg-down shortcut: the file spells downsample.conv.conv)`` or the strided counterpart."""
    avg_down = _spelled_shortcut(path)
    if isinstance(avg_down, str):
        return f"(shortcut: {avg_down})"
    return f"({SHORTCUT_LABELS[avg_down]} shortcut: the file spells {SHORTCUT_SPELLINGS[avg_down]})"


def _found_file(name: str) -> Path | None:
    """The local file that loading ``name`` would use now, or None when it would need a download or fail."""
    try:
        return resolve_weights(name, download=False)
    except WeightsError:
        return None


@_reporting_errors
def _list(_args: argparse.Namespace) -> int:
    print(f"cache folder: {cache_dir()}")
    if override := os.environ.get(WEIGHTS_ENV):
        print(f"{WEIGHTS_ENV}={override} (takes precedence over the cache)")
    for name in list_contnet_variants():
        entry = published_weights(name)
        cached = cached_weights_path(name)
        found = _found_file(name)
        if found is None:
            state, path = "missing", cached
            shortcut = f"{SHORTCUT_LABELS[CONTNET_CFGS[name].avg_down]} (default)"
        else:
            state, path = ("cached" if found == cached else "found"), found
            shortcut = _file_shortcut(found)
        url = entry.url or "(no stable URL: get it from the authors, then `weights import`)"
        print(f"{name:<11} {state:<8} {shortcut:<32} {path}  {url}")
    return 0


@_reporting_errors
def _download(args: argparse.Namespace) -> int:
    from anomalib_contnet.backbones.weights import download_weights  # noqa: PLC0415  (torch: not for `list`)

    destination = cached_weights_path(args.name)
    if destination.is_file() and not args.force:
        print(f"{args.name} is already cached at {destination} (use --force to download it again)")
        return 0
    path = download_weights(args.name, args.url, args.sha256, force=args.force)
    print(f"{args.name} weights saved to {path} {_shortcut_note(path)}")
    return 0


@_reporting_errors
def _import(args: argparse.Namespace) -> int:
    from anomalib_contnet.backbones.weights import import_weights  # noqa: PLC0415  (torch: not for `list`)

    path = import_weights(args.name, args.path)
    print(f"{args.name} weights checked and stored at {path} {_shortcut_note(path)}")
    if os.environ.get(WEIGHTS_ENV):
        print(f"note: {WEIGHTS_ENV} is set and takes precedence over this file", file=sys.stderr)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``weights`` command group to the top-level parser."""
    group = subparsers.add_parser("weights", help="list, download and import ConTNet ImageNet checkpoints")
    commands = group.add_subparsers(dest="weights_command", required=True, metavar="{list,download,import}")

    listing = commands.add_parser("list", help="show variants, cache state, shortcut network and download URLs")
    listing.set_defaults(handler=_list)

    fetching = commands.add_parser("download", help="download a variant's checkpoint into the cache")
    fetching.add_argument("name", choices=list_contnet_variants(), help="variant")
    fetching.add_argument("--url", help="download from this URL instead of the known one")
    fetching.add_argument("--sha256", help="expected SHA-256 of the file")
    fetching.add_argument("--force", action="store_true", help="download even when the file is already cached")
    fetching.set_defaults(handler=_download)

    importing = commands.add_parser("import", help="check a checkpoint file and copy it into the cache")
    importing.add_argument("name", choices=list_contnet_variants(), help="variant the file belongs to")
    importing.add_argument("path", help="checkpoint file (.pth)")
    importing.set_defaults(handler=_import)
