"""``anomalib-contnet demo``: train, test, export and report in one command.

Contributes the ``demo`` command through :func:`register`, following the
convention of ``anomalib_contnet.cli``.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from anomalib_contnet.backbones.weight_files import WeightsError
from anomalib_contnet.data import DatasetPrepareError
from anomalib_contnet.demo.pipeline import BACKBONE_CHOICES, TINY_SIZES, DemoError, DemoOptions, run_demo
from anomalib_contnet.pretrained import WeightConversionError

__all__ = ["register"]

EXIT_USAGE = 2


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``demo`` command to a parent parser's sub-commands."""
    defaults = DemoOptions()
    parser = subparsers.add_parser(
        "demo",
        help="offline end-to-end demo: data, training, test, OpenVINO export, report with figures",
        description=(
            "Prepare an offline dataset, train ConTNetPaDiM, test it, export it to OpenVINO, predict sample images "
            "and write report.md with figures under --out (replaced only when the whole run succeeds). With "
            "--backbone auto the paper's ConTNet-B runs when its ImageNet weights are on this machine, otherwise "
            "EfficientNet-Lite0 with offline ImageNet weights; the report says which."
        ),
    )
    parser.add_argument("--out", type=Path, default=defaults.out, help=f"report folder (default: {defaults.out})")
    parser.add_argument("--data-root", type=Path, default=defaults.data_root, help="dataset root (default: datasets)")
    parser.add_argument("--category", default=defaults.category, help="MVTec AD-layout category (default: brick)")
    parser.add_argument("--backbone", choices=BACKBONE_CHOICES, default=defaults.backbone, help="(default: auto)")
    parser.add_argument(
        "--random-init", action="store_true", help="allow --backbone contnet_b without its weights (untrained)"
    )
    parser.add_argument("--max-train", type=int, default=defaults.max_train, help="training images (default 60)")
    parser.add_argument("--max-test", type=int, default=defaults.max_test, help="test images (default 40)")
    parser.add_argument(
        "--samples", type=int, default=defaults.n_samples, help="images in the prediction grid (default 6)"
    )
    parser.add_argument(
        "--image-size",
        type=int,
        default=defaults.image_size,
        help="input side in pixels (default 224, the paper's; ConTNet needs a multiple of 224)",
    )
    parser.add_argument("--seed", type=int, default=defaults.seed, help="seed of the subset and the fit (default 0)")
    parser.add_argument(
        "--tiny",
        action="store_true",
        help="a few images only, to check that every step works (overrides --max-train/--max-test/--samples)",
    )
    parser.set_defaults(handler=_run)
    return parser


def _run(args: argparse.Namespace) -> int:
    options = DemoOptions(
        out=args.out,
        data_root=args.data_root,
        category=args.category,
        backbone=args.backbone,
        random_init=args.random_init,
        max_train=args.max_train,
        max_test=args.max_test,
        n_samples=args.samples,
        image_size=args.image_size,
        seed=args.seed,
    )
    if args.tiny:
        options = dataclasses.replace(options, **TINY_SIZES)
    try:
        run_demo(options)
    except (DemoError, DatasetPrepareError, WeightsError, WeightConversionError) as error:
        print(f"anomalib-contnet demo: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    return 0
