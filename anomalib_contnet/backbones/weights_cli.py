"""``anomalib-contnet weights ...``: list, download and import the ConTNet ImageNet checkpoints.

Inspection machines are usually offline, so the typical flow is ``weights
download`` on a connected machine (or fetching the file by hand) and ``weights
import`` on the target, which checks the file before it enters the cache.
Failures print one line of advice on stderr and exit with status 2.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
from collections.abc import Callable

import torch

from anomalib_contnet.backbones.contnet import create_contnet, list_contnet_variants
from anomalib_contnet.backbones.weights import (
    WEIGHTS_ENV,
    WeightsError,
    cache_dir,
    cached_weights_path,
    download_weights,
    import_weights,
    published_weights,
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


@_reporting_errors
def _list(_args: argparse.Namespace) -> int:
    print(f"cache folder: {cache_dir()}")
    if override := os.environ.get(WEIGHTS_ENV):
        print(f"{WEIGHTS_ENV}={override} (takes precedence over the cache)")
    for name in list_contnet_variants():
        entry = published_weights(name)
        path = cached_weights_path(name)
        state = "cached" if path.is_file() else "missing"
        url = entry.url or "(no stable URL: get it from the authors, then `weights import`)"
        print(f"{name:<11} {_parameter_count(name):>11,} params  {state:<8} {path}  {url}")
    return 0


@_reporting_errors
def _download(args: argparse.Namespace) -> int:
    destination = cached_weights_path(args.name)
    if destination.is_file() and not args.force:
        print(f"{args.name} is already cached at {destination} (use --force to download it again)")
        return 0
    path = download_weights(args.name, args.url, args.sha256, force=args.force)
    print(f"{args.name} weights saved to {path}")
    return 0


@_reporting_errors
def _import(args: argparse.Namespace) -> int:
    path = import_weights(args.name, args.path)
    print(f"{args.name} weights checked and stored at {path}")
    if os.environ.get(WEIGHTS_ENV):
        print(f"note: {WEIGHTS_ENV} is set and takes precedence over this file", file=sys.stderr)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``weights`` command group to the top-level parser."""
    group = subparsers.add_parser("weights", help="list, download and import ConTNet ImageNet checkpoints")
    commands = group.add_subparsers(dest="weights_command", required=True, metavar="{list,download,import}")

    listing = commands.add_parser("list", help="show variants, parameter counts, cache state and download URLs")
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
