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

import torch

from anomalib_contnet.backbones.contnet import (
    CONTNET_CFGS,
    SHORTCUT_LABELS,
    SHORTCUT_SPELLINGS,
    create_contnet,
    list_contnet_variants,
)
from anomalib_contnet.backbones.weights import (
    WEIGHTS_ENV,
    WeightsError,
    cache_dir,
    cached_weights_path,
    download_weights,
    import_weights,
    published_weights,
    resolve_weights,
    shortcut_of_file,
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


def _parameter_count(name: str) -> int:
    """Parameters of the variant with its 1000-class head, counted on the meta device (no memory, no init cost)."""
    with torch.device("meta"):
        return create_contnet(name).parameter_count()


def _file_shortcut(path: Path) -> str:
    """Which shortcut network ``path`` holds, read from its keys; what is wrong with it when that cannot be told."""
    try:
        avg_down = shortcut_of_file(path)
    except WeightsError:
        return "unreadable"
    if avg_down is None:
        return "no shortcut keys"
    return f"{SHORTCUT_LABELS[avg_down]} ({SHORTCUT_SPELLINGS[avg_down]})"


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
        print(f"{name:<11} {_parameter_count(name):>11,} params  {state:<8} {shortcut:<32} {path}  {url}")
    return 0


def _shortcut_note(path: Path) -> str:
    """``(avg-down shortcut: the file spells downsample.conv.conv)`` or the strided counterpart."""
    avg_down = shortcut_of_file(path)
    if avg_down is None:
        return "(no down-sampling shortcut keys)"
    return f"({SHORTCUT_LABELS[avg_down]} shortcut: the file spells {SHORTCUT_SPELLINGS[avg_down]})"


@_reporting_errors
def _download(args: argparse.Namespace) -> int:
    destination = cached_weights_path(args.name)
    if destination.is_file() and not args.force:
        print(f"{args.name} is already cached at {destination} (use --force to download it again)")
        return 0
    path = download_weights(args.name, args.url, args.sha256, force=args.force)
    print(f"{args.name} weights saved to {path} {_shortcut_note(path)}")
    return 0


@_reporting_errors
def _import(args: argparse.Namespace) -> int:
    path = import_weights(args.name, args.path)
    print(f"{args.name} weights checked and stored at {path} {_shortcut_note(path)}")
    if os.environ.get(WEIGHTS_ENV):
        print(f"note: {WEIGHTS_ENV} is set and takes precedence over this file", file=sys.stderr)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``weights`` command group to the top-level parser."""
    group = subparsers.add_parser("weights", help="list, download and import ConTNet ImageNet checkpoints")
    commands = group.add_subparsers(dest="weights_command", required=True, metavar="{list,download,import}")

    listing = commands.add_parser(
        "list", help="show variants, parameter counts, cache state, shortcut network and download URLs"
    )
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
