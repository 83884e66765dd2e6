"""``anomalib-contnet data prepare {elpv,textures} --root R``: write the offline datasets from the command line."""

from __future__ import annotations

import argparse
import functools
import inspect
import sys
from collections.abc import Callable
from pathlib import Path

from anomalib_contnet.data.elpv import ELPV_CATEGORIES, prepare_elpv
from anomalib_contnet.data.layout import DatasetPrepareError, image_counts
from anomalib_contnet.data.textures import TEXTURE_CATEGORIES, prepare_textures

__all__ = ["register"]


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``data`` group to the sub-commands of ``anomalib-contnet`` (see :mod:`anomalib_contnet.cli`)."""
    data = subparsers.add_parser("data", help="prepare offline datasets in MVTec AD layout")
    prepare = data.add_subparsers(dest="data_command", required=True).add_parser(
        "prepare", help="write a dataset under --root (refuses to overwrite data it did not write)"
    )
    sources = prepare.add_subparsers(dest="source", required=True)
    elpv = sources.add_parser("elpv", help="ELPV solar cells (image labels only)")
    textures = sources.add_parser("textures", help="scikit-image textures with drawn defects and exact masks")
    for parser, writer, categories in (
        (elpv, prepare_elpv, ELPV_CATEGORIES),
        (textures, prepare_textures, TEXTURE_CATEGORIES),
    ):
        parser.add_argument("--root", type=Path, required=True, help="dataset root (the MVTecAD datamodule's root)")
        parser.add_argument("--categories", nargs="+", default=list(categories), choices=list(categories))
        parser.set_defaults(handler=functools.partial(_run, writer))
    elpv.add_argument("--max-per-split", type=int, help="keep at most N images per split (quick runs)")
    textures.add_argument("--image-size", type=int, default=256, help="side of the written images (default 256)")
    textures.add_argument(
        "--crop-size", type=int, default=160, help="crop side in the photograph, <= 192 (default 160)"
    )
    textures.add_argument("--n-train", type=int, default=100, help="normal training images per category")
    textures.add_argument("--n-test-good", type=int, default=30, help="normal test images per category")
    textures.add_argument("--n-test-defect", type=int, default=30, help="defective test images per category")
    return data


def _run(prepare: Callable[..., list[Path]], args: argparse.Namespace) -> int:
    """Call ``prepare`` with the options named as its parameters; print each category's image counts.

    A refusal or a file-system error is printed on stderr, with exit status 2 (argparse's for bad input).
    """
    parameters = inspect.signature(prepare).parameters
    try:
        folders = prepare(**{name: value for name, value in vars(args).items() if name in parameters})
    except (DatasetPrepareError, OSError) as error:
        print(f"anomalib-contnet data: error: {error}", file=sys.stderr)
        return 2
    for folder in folders:
        print(f"{folder}: written ({', '.join(f'{split}={count}' for split, count in image_counts(folder).items())})")
    names = ",".join(folder.name for folder in folders)
    print(f"use with: anomalib train --data MVTecAD --data.root {folders[0].parent} --data.category <{names}>")
    return 0
