"""``anomalib-contnet weights ...``: list, download and import the ConTNet ImageNet checkpoints.

Inspection machines are usually offline, so the typical flow is ``weights
download`` on a connected machine (or fetching the file by hand) and ``weights
import`` on the target. Both load the file into the network it spells before it
enters the cache, and say which shortcut network that is. ``weights list`` imports
no torch, so it answers at once. Failures print the advice on stderr, exit status 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from anomalib_contnet.backbones.contnet_configs import list_contnet_variants, shortcut_name
from anomalib_contnet.backbones.weight_files import (
    PUBLISHED_URLS,
    WEIGHTS_ENV,
    WeightsError,
    cache_dir,
    cached_weights_path,
    download_file,
    resolve_weights,
)

ERROR_EXIT_CODE = 2


def _list(_args: argparse.Namespace) -> None:
    print(f"cache folder: {cache_dir()}")
    if override := os.environ.get(WEIGHTS_ENV):
        print(f"{WEIGHTS_ENV}={override} (takes precedence over the cache)")
    for name in list_contnet_variants():
        cached = cached_weights_path(name)
        try:
            path = resolve_weights(name, download=False)
        except WeightsError:
            state, path = "missing", cached
        else:
            state = "cached" if path == cached else "found"
        url = PUBLISHED_URLS.get(name, "(no stable URL: get it from the authors, then `weights import`)")
        print(f"{name:<11} {state:<8} {path}  {url}")


def _checked(name: str, path: Path, origin: str) -> str:
    """Load ``path`` into the headless network its keys spell, as a fit would; return that network's shortcut."""
    import timm  # noqa: PLC0415  (torch and timm: not for `list`)

    from anomalib_contnet.backbones import timm_contnet  # noqa: F401, PLC0415  (registers contnet_* with timm)

    try:
        model = timm.create_model(name, pretrained=True, num_classes=0, pretrained_cfg_overlay={"file": str(path)})
    except WeightsError as error:
        msg = f"{origin} is not a usable {name} checkpoint (nothing was cached): {error}"
        raise WeightsError(msg) from error
    return shortcut_name(model.config.avg_down)


def _download(args: argparse.Namespace) -> None:
    destination = cached_weights_path(args.name)
    if destination.is_file() and not args.force:
        print(f"{args.name} is already cached at {destination} (use --force to download it again)")
        return
    url = args.url or PUBLISHED_URLS.get(args.name)
    if url is None:
        msg = f"no stable download URL is known for {args.name}; pass --url, or `weights import` a file you have"
        raise WeightsError(msg)
    shortcuts: list[str] = []
    download_file(url, destination, args.sha256, lambda staged: shortcuts.append(_checked(args.name, staged, url)))
    print(f"{args.name} weights saved to {destination} ({shortcuts[0]} shortcut)")


def _import(args: argparse.Namespace) -> None:
    source = Path(args.path).expanduser().absolute()
    shortcut = _checked(args.name, source, str(source))
    destination = cached_weights_path(args.name)
    if not (destination.is_file() and destination.samefile(source)):
        download_file(source.as_uri(), destination)  # torch.hub copies file:// URLs through a temporary file too
    print(f"{args.name} weights checked and stored at {destination} ({shortcut} shortcut)")
    if os.environ.get(WEIGHTS_ENV):
        print(f"note: {WEIGHTS_ENV} is set and takes precedence over this file", file=sys.stderr)


def _run(args: argparse.Namespace) -> int:
    """Run the chosen command; a WeightsError becomes its message on stderr and exit status 2, not a traceback."""
    try:
        args.command(args)
    except WeightsError as error:
        print(f"anomalib-contnet weights: error: {error}", file=sys.stderr)
        return ERROR_EXIT_CODE
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``weights`` command group to the top-level parser."""
    group = subparsers.add_parser("weights", help="list, download and import ConTNet ImageNet checkpoints")
    group.set_defaults(handler=_run)
    commands = group.add_subparsers(required=True, metavar="{list,download,import}")
    listing = commands.add_parser("list", help="show variants, where their files are, and download URLs")
    listing.set_defaults(command=_list)
    fetching = commands.add_parser("download", help="download a variant's checkpoint into the cache")
    fetching.add_argument("name", choices=list_contnet_variants(), help="variant")
    fetching.add_argument("--url", help="download from this URL instead of the published one")
    fetching.add_argument("--sha256", help="expected SHA-256 of the file (or its first characters)")
    fetching.add_argument("--force", action="store_true", help="download even when the file is already cached")
    fetching.set_defaults(command=_download)
    importing = commands.add_parser("import", help="check a checkpoint file and copy it into the cache")
    importing.add_argument("name", choices=list_contnet_variants(), help="variant the file belongs to")
    importing.add_argument("path", help="checkpoint file (.pth)")
    importing.set_defaults(command=_import)
