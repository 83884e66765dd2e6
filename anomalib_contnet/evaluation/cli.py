"""``anomalib-contnet benchmark``: the side-by-side benchmark from the command line.

Contributes the ``benchmark`` command through :func:`register`, following the
convention of ``anomalib_contnet.cli``.
"""

from __future__ import annotations

import argparse
import shlex
import sys

from anomalib_contnet.backbones.weight_files import WeightsError
from anomalib_contnet.data import DatasetPrepareError
from anomalib_contnet.evaluation.configs import DEFAULT_CONFIG_NAMES, MODEL_CONFIGS
from anomalib_contnet.evaluation.paper import MVTEC_AD
from anomalib_contnet.evaluation.runner import DEFAULT_CORESET_RATIO, DEFAULT_SEED, BenchmarkError, run_benchmark
from anomalib_contnet.evaluation.subsets import offline_categories

__all__ = ["register"]

EXIT_JOBS_FAILED = 1
EXIT_USAGE = 2


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``benchmark`` command to a parent parser's sub-commands."""
    parser = subparsers.add_parser(
        "benchmark",
        help="ConTNetPaDiM vs anomalib Padim/Patchcore/MHPatchcore on the same data: CSV + markdown table",
        description=(
            "Run every model configuration on every category, one process per job, on one seeded data subset "
            "(or every image: --max-train 0 --max-test 0); write benchmark.csv and benchmark.md "
            "under --out (--few-shot: also few_shot.md and few_shot.png). Rerunning the same command skips "
            "finished jobs. Metrics are computed on raw scores. "
            "Backbones without offline ImageNet weights run with random initialisation and are labelled so."
        ),
        epilog="configurations: " + ", ".join(MODEL_CONFIGS),
    )
    parser.add_argument("--data-root", default="datasets", help="MVTec AD-layout root (default: datasets)")
    parser.add_argument(
        "--categories",
        default="elpv_mono,brick",
        help=f"comma-separated folder names under --data-root; {MVTEC_AD} = its 15 categories; missing offline ones "
        f"({', '.join(offline_categories())}) are prepared (default: elpv_mono,brick)",
    )
    parser.add_argument(
        "--configs",
        default=None,
        help=f"comma-separated configuration names (default: {', '.join(DEFAULT_CONFIG_NAMES)})",
    )
    parser.add_argument(
        "--max-train", type=int, default=40, help="training images per category, 0 = every one (default 40)"
    )
    parser.add_argument(
        "--max-test",
        type=int,
        default=60,
        help="test images per category, half normal where possible, 0 = every one (default 60)",
    )
    parser.add_argument("--out", default="results/benchmark", help="output folder (default: results/benchmark)")
    parser.add_argument("--image-size", type=int, default=224, help="input side in pixels for every model (224)")
    parser.add_argument(
        "--seed",
        type=int,
        default=DEFAULT_SEED,
        help=f"seed of the subset and of random initialisation ({DEFAULT_SEED}, as anomalib's tables)",
    )
    parser.add_argument(
        "--coreset-ratio",
        type=float,
        default=DEFAULT_CORESET_RATIO,
        help=f"Patchcore coreset sampling ratio (default {DEFAULT_CORESET_RATIO}; anomalib's 0.1 takes hours on CPU)",
    )
    parser.add_argument(
        "--few-shot",
        default=None,
        help="comma-separated training image counts (0 = all), e.g. 1,2,4,8,16,32,0: fit every configuration on N "
        "images drawn with each of --seeds, score one test set, write few_shot.md and few_shot.png",
    )
    parser.add_argument("--seeds", default="0,1,2", help="seeds of the training draws of --few-shot (default 0,1,2)")
    parser.add_argument("--job-timeout", type=float, default=None, help="seconds before a job is killed (none)")
    parser.add_argument(
        "--allow-download",
        action="store_true",
        help="let timm / ConTNet download ImageNet weights (otherwise those backbones run with random init)",
    )
    parser.add_argument("--keep-checkpoints", action="store_true", help="keep each job's model.ckpt (large)")
    parser.set_defaults(handler=_run)
    return parser


def _split(text: str | None) -> list[str] | None:
    return None if text is None else [item.strip() for item in text.split(",") if item.strip()]


def _canonical_command(args: argparse.Namespace) -> str:
    """The command line that reproduces this run, with every option spelled out (for the results header)."""
    words = ["anomalib-contnet", "benchmark", "--data-root", str(args.data_root), "--categories", args.categories]
    if args.configs:
        words += ["--configs", args.configs]
    if not args.few_shot:
        words += ["--max-train", str(args.max_train)]
    words += ["--max-test", str(args.max_test), "--out", str(args.out)]
    if args.few_shot:
        words += ["--few-shot", args.few_shot, "--seeds", args.seeds]
    words += [
        "--image-size",
        str(args.image_size),
        "--seed",
        str(args.seed),
        "--coreset-ratio",
        str(args.coreset_ratio),
    ]
    if args.allow_download:
        words.append("--allow-download")
    return shlex.join(words)


def _counts(text: str | None, option: str) -> list[int]:
    try:
        return [int(item) for item in _split(text) or []]
    except ValueError as error:
        msg = f"{option} takes comma-separated whole numbers, got {text!r}"
        raise BenchmarkError(msg) from error


def _print_now(line: str) -> None:
    """Progress lines reach a log file as they happen, not when the buffer fills (runs last hours)."""
    print(line, flush=True)


def _run(args: argparse.Namespace) -> int:
    try:
        report = run_benchmark(
            args.data_root,
            _split(args.categories) or [],
            args.out,
            max_train=args.max_train,
            max_test=args.max_test,
            config_names=_split(args.configs),
            image_size=args.image_size,
            seed=args.seed,
            coreset_ratio=args.coreset_ratio,
            allow_download=args.allow_download,
            job_timeout_s=args.job_timeout,
            keep_checkpoints=args.keep_checkpoints,
            few_shot=_counts(args.few_shot, "--few-shot"),
            seeds=_counts(args.seeds, "--seeds") if args.few_shot else [],
            command=_canonical_command(args),
            log=_print_now,
        )
    except (BenchmarkError, DatasetPrepareError, WeightsError, OSError) as error:
        print(f"anomalib-contnet benchmark: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    if report.failed:
        print(f"{len(report.failed)} of {len(report.rows)} jobs failed; see the Status column", file=sys.stderr)
        return EXIT_JOBS_FAILED
    return 0
