"""``anomalib-contnet benchmark``: the side-by-side benchmark from the command line."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from anomalib_contnet.backbones.weight_files import WeightsError
from anomalib_contnet.data import DatasetPrepareError
from anomalib_contnet.evaluation.configs import DEFAULT_CONFIG_NAMES, MODEL_CONFIGS
from anomalib_contnet.evaluation.paper import expand_categories
from anomalib_contnet.evaluation.runner import DEFAULT_CORESET_RATIO, DEFAULT_SEED, BenchmarkError, run_benchmark
from anomalib_contnet.pretrained import WeightConversionError

__all__ = ["register"]


def _names(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def _counts(text: str) -> list[int]:
    try:
        return [int(item) for item in _names(text)]
    except ValueError as error:
        msg = f"takes comma-separated whole numbers, got {text!r}"
        raise argparse.ArgumentTypeError(msg) from error


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``benchmark`` command to a parent parser's sub-commands."""
    parser = subparsers.add_parser(
        "benchmark",
        help="ConTNetPaDiM vs anomalib Padim/Patchcore/MHPatchcore on the same data: CSV + markdown table",
        description=(
            "Run every model configuration on every category, one process per job, on one seeded data subset "
            "(or every image: --max-train 0 --max-test 0); write benchmark.csv and benchmark.md under --out "
            "(--few-shot: also few_shot.md). Rerunning the same command skips finished jobs. "
            "Metrics are computed on raw scores. Backbones without offline ImageNet weights run with random "
            "initialisation and are labelled so."
        ),
        epilog="configurations: " + ", ".join(MODEL_CONFIGS),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--data-root", default="datasets", help="MVTec AD-layout root")
    parser.add_argument(
        "--categories",
        type=lambda text: expand_categories(_names(text)),
        default="elpv_mono,brick",
        help="comma-separated folder names under --data-root (mvtec_ad = its 15 categories); missing offline "
        "ones are prepared",
    )
    parser.add_argument("--configs", type=_names, default=",".join(DEFAULT_CONFIG_NAMES), help="configurations")
    parser.add_argument("--max-train", type=int, default=40, help="training images per category, 0 = every one")
    parser.add_argument("--max-test", type=int, default=60, help="test images per category, half normal, 0 = all")
    parser.add_argument("--out", type=Path, default=Path("results/benchmark"), help="output folder")
    parser.add_argument("--image-size", type=int, default=224, help="input side in pixels for every model")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="seed of the subset and of the fit")
    parser.add_argument("--coreset-ratio", type=float, default=DEFAULT_CORESET_RATIO, help="Patchcore's ratio")
    parser.add_argument(
        "--few-shot",
        type=_counts,
        default=None,
        help="training image counts (0 = all), e.g. 1,2,4,8: fit every configuration on N images drawn with "
        "each of --seeds, score one test set, write few_shot.md",
    )
    parser.add_argument("--seeds", type=_counts, default="0,1,2", help="seeds of the --few-shot training draws")
    parser.add_argument("--job-timeout", type=float, default=None, help="seconds before a job is killed")
    parser.add_argument(
        "--allow-download", action="store_true", help="let timm / ConTNet download ImageNet weights (else random)"
    )
    parser.add_argument("--keep-checkpoints", action="store_true", help="keep each job's model.ckpt (large)")
    parser.set_defaults(handler=_run)
    return parser


def _run(args: argparse.Namespace) -> int:
    try:
        args.out = args.out.expanduser()
        table = run_benchmark(args)
    except (BenchmarkError, DatasetPrepareError, WeightsError, WeightConversionError, OSError) as error:
        print(f"anomalib-contnet benchmark: error: {error}", file=sys.stderr)
        return 2
    failed = table.status.str.startswith("failed").sum()
    if failed:
        print(f"{failed} of {len(table)} jobs failed; see the status column", file=sys.stderr)
        return 1
    return 0
