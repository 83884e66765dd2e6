"""``anomalib-contnet data prepare {elpv,textures}``: write the offline datasets from the command line.

Contributes the ``data`` command group through :func:`register`, following the
convention of ``anomalib_contnet.cli`` (each group adds its sub-parser and sets a
``handler`` that returns the exit status).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from anomalib_contnet.data.layout import DatasetPrepareError, PreparedCategory
from anomalib_contnet.data.prepare import (
    DEFECT_TYPES,
    ELPV_CATEGORIES,
    TEXTURE_CATEGORIES,
    prepare_elpv,
    prepare_textures,
)

__all__ = ["register"]

EXIT_USAGE = 2
"""Exit status for input the command cannot work with (argparse uses 2 for the same)."""


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``data`` group (``data prepare elpv|textures``) to a parent parser's sub-commands."""
    data = subparsers.add_parser("data", help="prepare offline datasets in MVTec AD layout")
    actions = data.add_subparsers(dest="data_command", required=True, metavar="{prepare}")
    prepare = actions.add_parser("prepare", help="write a dataset under --root (refuses to overwrite foreign data)")
    sources = prepare.add_subparsers(dest="source", required=True, metavar="{elpv,textures}")

    elpv = sources.add_parser(
        "elpv",
        help="ELPV solar cells: elpv_mono / elpv_poly (image labels; masks cover the whole cell)",
        description="Functional cells train/test as good, defective cells (p=1) test as 'defective'.",
    )
    _add_common_options(elpv)
    elpv.add_argument("--categories", nargs="+", default=list(ELPV_CATEGORIES), choices=list(ELPV_CATEGORIES))
    elpv.add_argument(
        "--train-fraction", type=float, default=0.8, help="share of functional cells used for training (default 0.8)"
    )
    elpv.add_argument("--max-per-split", type=int, default=None, help="keep at most N images per split (quick runs)")
    elpv.set_defaults(handler=_run_elpv)

    textures = sources.add_parser(
        "textures",
        help="skimage texture photographs with drawn defects and exact masks",
        description="Normal crops of real textures; defects drawn with masks of exactly the altered pixels.",
    )
    _add_common_options(textures)
    textures.add_argument("--categories", nargs="+", default=list(TEXTURE_CATEGORIES), choices=list(TEXTURE_CATEGORIES))
    textures.add_argument("--defect-types", nargs="+", default=list(DEFECT_TYPES), choices=list(DEFECT_TYPES))
    textures.add_argument("--image-size", type=int, default=256, help="side of the written images (default 256)")
    textures.add_argument(
        "--crop-size", type=int, default=160, help="side of the crop cut from the photograph, <= 192 (default 160)"
    )
    textures.add_argument("--n-train", type=int, default=100, help="normal training images per category")
    textures.add_argument("--n-test-good", type=int, default=30, help="normal test images per category")
    textures.add_argument(
        "--n-test-defect", type=int, default=30, help="defective test images per category (split among defect types)"
    )
    textures.set_defaults(handler=_run_textures)
    return data


def _add_common_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--root", type=Path, required=True, help="dataset root (the MVTecAD datamodule's root)")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the split / crops / defects (default 0)")


def _run_elpv(args: argparse.Namespace) -> int:
    return _report(
        lambda: prepare_elpv(
            args.root,
            seed=args.seed,
            train_fraction=args.train_fraction,
            max_per_split=args.max_per_split,
            categories=args.categories,
        )
    )


def _run_textures(args: argparse.Namespace) -> int:
    return _report(
        lambda: prepare_textures(
            args.root,
            seed=args.seed,
            categories=args.categories,
            image_size=args.image_size,
            crop_size=args.crop_size,
            n_train=args.n_train,
            n_test_good=args.n_test_good,
            n_test_defect=args.n_test_defect,
            defect_types=args.defect_types,
        )
    )


def _report(prepare: Callable[[], list[PreparedCategory]]) -> int:
    """Run ``prepare``; print one line per category, or the reason it failed on stderr (exit 2)."""
    try:
        prepared = prepare()
    except (DatasetPrepareError, OSError) as error:
        print(f"anomalib-contnet data: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    for category in prepared:
        counts = ", ".join(f"{folder}={count}" for folder, count in category.counts.items())
        state = "unchanged" if category.unchanged else "written"
        print(f"{category.path}: {state} ({counts})")
    root = prepared[0].root
    names = ",".join(category.category for category in prepared)
    print(f"use with: anomalib train --data MVTecAD --data.root {root} --data.category <{names}>")
    return 0
