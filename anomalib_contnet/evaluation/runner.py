"""Run every configuration on every category, one process per job, and write the CSV and markdown tables.

Why not ``anomalib benchmark``: it collects results into one table keyed by the grid's ``init_args``
and raises ``KeyError`` (still exiting 0) when the entries' keys differ, which they must here
(``n_features`` for Padim, ``coreset_sampling_ratio`` for Patchcore, a weights file for ConTNetPaDiM);
its metrics are computed on the post-processor's normalised, clamped scores; and it measures no memory.
This runner drives anomalib's ``Engine`` (:mod:`.worker`) on one data subset shared by all jobs, and
skips a job whose folder holds a successful result for the same settings, so a rerun resumes.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import itertools
import json
import os
import platform
import shutil
import subprocess
import sys
from dataclasses import asdict
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import pandas as pd

from anomalib_contnet.atomic_files import write_text_atomically
from anomalib_contnet.backbones.contnet_configs import is_contnet
from anomalib_contnet.evaluation.configs import MODEL_CONFIGS, ModelConfig, resolve_job_weights
from anomalib_contnet.evaluation.paper import MVTEC_AD_OBJECTS, MVTEC_AD_TEXTURES, PAPER_AUROC_PERCENT
from anomalib_contnet.evaluation.subsets import CategorySubset, ensure_category, select_images
from anomalib_contnet.evaluation.worker import JobSpec, run_job

__all__ = ["DEFAULT_CORESET_RATIO", "DEFAULT_SEED", "BenchmarkError", "run_benchmark"]

DEFAULT_CORESET_RATIO = 0.01
"""Patchcore's own default, 0.1, takes hours of greedy coreset steps on a CPU."""
DEFAULT_SEED = 42
"""The seed of anomalib's published model tables."""
RUN_COLUMNS = ["category", "n_train", "n_test", "model", "backbone", "weights", "settings"]
AUROC_COLUMNS = ["image_auroc", "paper_image_auroc", "pixel_auroc", "paper_pixel_auroc", "aupro"]
"""What the mean rows average."""
COLUMNS = [*RUN_COLUMNS, *AUROC_COLUMNS, "fit_s", "predict_images_per_s", "peak_rss_mb", "checkpoint_mb", "status"]
"""The columns of the CSV and of the markdown table, in order."""
MODEL_NAMES = {
    "contnet_padim": "ConTNetPaDiM",
    "padim": "Padim",
    "patchcore": "Patchcore",
    "mhpatchcore": "MHPatchcore",
}


class BenchmarkError(RuntimeError):
    """The benchmark cannot start as asked; the message says what to change."""


def run_benchmark(args: argparse.Namespace) -> pd.DataFrame:
    """Benchmark ``args.configs`` on ``args.categories`` (the command's options); return the table's rows.

    Writes ``benchmark.csv`` and ``benchmark.md`` (jobs, then means) under ``args.out`` after every
    job, data subsets under ``data/`` and per job ``jobs/<id>/`` (spec, key, result, log). A failed job
    becomes a row with its reason. ``args.few_shot`` (training image counts, 0 = all): every configuration
    is fitted on N images drawn with each of ``args.seeds`` and scored on one test set, in this process
    (no per-job memory: starting a process would cost more than such a job); ``few_shot.md`` gives the
    mean and standard error over the seeds.
    """
    log = functools.partial(print, flush=True)  # a log file sees progress as it happens
    unknown = sorted(set(args.configs) - set(MODEL_CONFIGS))
    if unknown or not args.configs or not args.categories:
        msg = f"name at least one category and configuration; unknown {unknown}, choose from {', '.join(MODEL_CONFIGS)}"
        raise BenchmarkError(msg)
    if args.few_shot and (not args.seeds or min(args.few_shot) < 0):
        msg = "--few-shot needs training image counts >= 0 (0 = all) and at least one seed in --seeds"
        raise BenchmarkError(msg)
    configs = [MODEL_CONFIGS[name] for name in dict.fromkeys(args.configs)]
    started = datetime.now(timezone.utc)
    log(f"== preparing data ({', '.join(args.categories)}) ==")
    sources = [ensure_category(args.data_root, category) for category in args.categories]
    draws = []  # (images, seed of the fit, job id suffix); few-shot: seed by seed, so a stopped run has whole curves
    for draw, source, n_train in itertools.product(args.seeds, sources, args.few_shot) if args.few_shot else []:
        folder = args.out / "data" / f"n{n_train}_s{draw}"
        sizes = {"max_train": n_train, "max_test": args.max_test, "seed": args.seed}
        draws.append((select_images(source, folder, **sizes, train_seed=draw), draw, f"__n{n_train}_s{draw}"))
    for source in [] if args.few_shot else sources:
        sizes = {"max_train": args.max_train, "max_test": args.max_test, "seed": args.seed}
        draws.append((select_images(source, args.out / "data", **sizes), args.seed, ""))
    lite0 = None
    if any(config.backbone == "efficientnet_lite0" for config in configs):
        from anomalib_contnet.pretrained import offline_efficientnet_lite0  # noqa: PLC0415  (converts on first use)

        lite0 = offline_efficientnet_lite0()
    weights = {config.name: resolve_job_weights(config, lite0, args.allow_download) for config in configs}
    header = _header(started, args, [subset for subset, _, _ in draws])
    rows: list[dict[str, Any]] = []
    jobs = [(subset, draw, suffix, config) for subset, draw, suffix in draws for config in configs]
    for index, (subset, draw, suffix, config) in enumerate(jobs, start=1):
        job_weights = weights[config.name]
        init_args = {"backbone": config.backbone, "layers": list(config.layers), **config.options}
        init_args |= job_weights.init_args
        if config.family == "patchcore":
            init_args["coreset_sampling_ratio"] = args.coreset_ratio
        job_id = f"{subset.category}__{config.name}{suffix}"
        spec = JobSpec(
            job_id,
            config.family,
            init_args,
            dataset_root=str(subset.root.resolve()),
            category=subset.category,
            pixel_labels=subset.pixel_labels,
            work_dir=str((args.out / "jobs" / job_id).resolve()),
            image_size=args.image_size,
            seed=draw,
            backbone_file=job_weights.backbone_file,
            keep_checkpoint=args.keep_checkpoints,
        )
        key = _job_key(spec, subset, job_weights.label, job_weights.environment)
        result = _finished_result(Path(spec.work_dir), key)
        state = "finished earlier, skipped" if result else f"running ({job_weights.label})"
        log(f"== [{index}/{len(jobs)}] {job_id}: {state} ==")
        if result is None:
            environment = None if args.few_shot else _job_environment(args.allow_download) | job_weights.environment
            result = _run_job(spec, key, environment, args.job_timeout)
            if result["status"] != "ok":
                log(f"   FAILED: {result['status']}")
        rows.append(_row(spec, config, job_weights.label, subset) | result)
        # After every job, so that a stopped run leaves the table of what it finished.
        table = _write_tables(rows, args.out, header, means=not args.few_shot)
    if args.few_shot:
        _write_few_shot(table, args.out, header)
        log(f"wrote {args.out / 'few_shot.md'}")
    log(f"wrote {args.out / 'benchmark.csv'}, {args.out / 'benchmark.md'}")
    return table


def _job_key(spec: JobSpec, subset: CategorySubset, weights_label: str, environment: dict[str, str]) -> str:
    """sha256 of everything a job's numbers depend on: settings, weights, the data's files, the package version.

    Where the files are and whether the checkpoint is kept do not change the numbers; the data's content does.
    """
    folder = subset.root / subset.category
    files = [
        f"{path.relative_to(folder).as_posix()}:{path.stat().st_size}"
        for path in sorted(folder.rglob("*"))
        if path.is_file() and not path.name.startswith(".")
    ]
    identity = asdict(spec) | {"dataset_root": None, "work_dir": None, "keep_checkpoint": None, "backbone_file": None}
    identity |= {"files": files, "weights": weights_label, "environment": environment}
    identity["version"] = _version("anomalib-contnet")
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def _finished_result(work_dir: Path, key: str) -> dict[str, Any] | None:
    """The result of an earlier successful run of exactly these settings, else None."""
    key_path, result_path = work_dir / "key.txt", work_dir / "result.json"
    if not (key_path.is_file() and result_path.is_file()) or key_path.read_text(encoding="utf-8").strip() != key:
        return None
    result = json.loads(result_path.read_text(encoding="utf-8"))
    return result if result.get("status") == "ok" else None


def _job_environment(allow_download: bool) -> dict[str, str]:
    """The parent's environment, offline unless downloads are allowed (so no job waits on a missing network)."""
    environment = dict(os.environ) | {"PYTHONUNBUFFERED": "1"}
    if not allow_download:
        environment |= {"HF_HUB_OFFLINE": "1", "ANOMALIB_CONTNET_OFFLINE": "1"}
    return environment


def _run_job(spec: JobSpec, key: str, environment: dict[str, str] | None, timeout_s: float | None) -> dict[str, Any]:
    """Run ``spec`` in a fresh job folder: in a worker process with ``environment``, or in this one (None).

    A crash, kill or timeout of the worker becomes a failed result with the reason and where the log is.
    """
    work_dir = Path(spec.work_dir)
    shutil.rmtree(work_dir, ignore_errors=True)  # an unfinished or outdated run's files must not be read
    work_dir.mkdir(parents=True)
    write_text_atomically(work_dir / "spec.json", json.dumps(asdict(spec), indent=1) + "\n")
    write_text_atomically(work_dir / "key.txt", key + "\n")
    result_path, log_path = work_dir / "result.json", work_dir / "log.txt"
    if environment is None:
        write_text_atomically(result_path, json.dumps(run_job(spec), indent=1) + "\n")
    else:
        command = [sys.executable, "-m", "anomalib_contnet.evaluation.worker", str(work_dir / "spec.json")]
        with log_path.open("w", encoding="utf-8") as log_file:
            process = subprocess.Popen(
                [*command, str(result_path)], stdout=log_file, stderr=subprocess.STDOUT, env=environment
            )
            try:
                return_code = process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
                return {"status": f"failed: timed out after {timeout_s:.0f} s (see {log_path})"}
    if result_path.is_file():
        return json.loads(result_path.read_text(encoding="utf-8"))
    reason = f"killed by signal {-return_code}" if return_code < 0 else f"exit status {return_code}"
    return {"status": f"failed: the job process ended without a result: {reason} (see {log_path})"}


def _row(spec: JobSpec, config: ModelConfig, weights_label: str, subset: CategorySubset) -> dict[str, Any]:
    """What the table says about a job besides its result: data, model, weights, settings, the paper's values."""
    hidden = {"backbone", "pre_trained", "weights"}
    settings = {key: value for key, value in spec.init_args.items() if key not in hidden} | {"input": spec.image_size}
    paper = config.family == "contnet_padim" and is_contnet(config.backbone) and spec.image_size == 224
    paper_auroc = PAPER_AUROC_PERCENT.get(subset.category, (None, None)) if paper else (None, None)
    return {
        "category": subset.category,
        "n_train": subset.n_train,
        "n_test": subset.n_test_normal + subset.n_test_anomalous,
        "model": MODEL_NAMES[config.family] + (f" ({config.preset})" if config.preset else ""),
        "backbone": config.backbone,
        "weights": weights_label,
        "settings": " ".join(f"{key}={'+'.join(v) if isinstance(v, list) else v}" for key, v in settings.items()),
        "paper_image_auroc": None if paper_auroc[0] is None else paper_auroc[0] / 100,
        "paper_pixel_auroc": None if paper_auroc[1] is None else paper_auroc[1] / 100,
    }


def _write_tables(rows: list[dict[str, Any]], out: Path, header: list[str], means: bool) -> pd.DataFrame:
    """``benchmark.csv`` and ``benchmark.md`` of ``rows`` and (unless few-shot) their means over categories.

    A mean is given only where every averaged row has the value (a failed job makes it n/a, never a mean of
    the rest); textures / objects rows appear when the run has such categories, "all" for two or more.
    """
    jobs = pd.DataFrame(rows).reindex(columns=list(COLUMNS))
    jobs[AUROC_COLUMNS] = jobs[AUROC_COLUMNS].astype(float)
    selections = {"objects": jobs.category.isin(MVTEC_AD_OBJECTS), "textures": jobs.category.isin(MVTEC_AD_TEXTURES)}
    selections["all"] = pd.Series(jobs.category.nunique() > 1, index=jobs.index)
    group_columns = ["model", "backbone", "weights", "settings"]
    mean_rows = []
    for label, selected in selections.items() if means else ():
        for group, members in jobs[selected].groupby(group_columns, sort=False):
            count = len(members)
            mean_rows.append(
                dict(zip(group_columns, group, strict=True))
                | {"category": f"mean ({label})", "n_train": members.n_train.sum(), "n_test": members.n_test.sum()}
                | {"status": f"mean of {count} categor{'y' if count == 1 else 'ies'}"}
                | members[AUROC_COLUMNS].mean(skipna=False).to_dict()
            )
    table = pd.DataFrame(jobs.to_dict("records") + mean_rows, columns=list(COLUMNS))
    write_text_atomically(out / "benchmark.csv", table.to_csv(index=False, lineterminator="\n"))
    notes = [
        "n/a: not applicable (no pixel labels) or not measured (failed or not yet run job). Paper columns: Dini & "
        "Rahtu (2023), Tables 2 and 3, on rows of the paper's configuration (ConTNet, layer3+layer4, 224 px) on "
        "MVTec AD categories; the weights column says whether a row ran with the paper's ImageNet weights."
    ]
    write_text_atomically(out / "benchmark.md", _markdown("Benchmark results", header, table, notes))
    return table


def _write_few_shot(table: pd.DataFrame, out: Path, header: list[str]) -> None:
    """``few_shot.md``: mean ± standard error over the seeds that succeeded, per category, model and N.

    A failed run is counted as such and left out of the means and the plot, never averaged.
    """
    table = table.assign(model=table.model + " " + table.backbone)
    groups = table.groupby(["category", "model", "n_train"], sort=True)
    metrics = ["image_auroc", "pixel_auroc", "aupro"]
    points = groups[metrics].agg(["mean", "sem"])
    summary = points.index.to_frame(index=False)
    for metric in metrics:
        mean, error = points[(metric, "mean")], points[(metric, "sem")].fillna(0.0)  # one value: no spread
        cells = [f"{m:.3f} ± {e:.3f}" if pd.notna(m) else None for m, e in zip(mean, error, strict=True)]
        summary[metric] = cells
    summary["runs"] = groups.size().to_numpy()
    failures = [members.status[members.status != "ok"].tolist() for _, members in groups]
    summary["failed"] = [f"{len(failed)}: {failed[0][:100]}" if failed else "" for failed in failures]
    notes = ["Mean ± standard error over the seeds that succeeded; n/a: no run succeeded or no pixel labels."]
    write_text_atomically(out / "few_shot.md", _markdown("Few-shot results", header, summary, notes))


def _markdown(title: str, header: list[str], table: pd.DataFrame, notes: list[str]) -> str:
    """A markdown document: the run's description, the table (3 decimals, n/a for missing values), the notes.

    Written here because pandas' ``to_markdown`` needs the optional ``tabulate`` package.
    """
    lines = [f"# {title}", "", *[f"{line}  " for line in header], "", "| " + " | ".join(table.columns) + " |"]
    lines.append("|" + "---|" * len(table.columns))
    for values in table.itertuples(index=False):
        cells = [
            "n/a" if pd.isna(value) else f"{value:.3f}" if isinstance(value, float) else str(value) for value in values
        ]
        lines.append("| " + " | ".join(" ".join(cell.replace("|", "/").split())[:160] for cell in cells) + " |")
    return "\n".join([*lines, "", *notes]) + "\n"


def _header(started: datetime, args: argparse.Namespace, subsets: list[CategorySubset]) -> list[str]:
    """Lines for the markdown header: what ran, where, with which options, on which data (one line per category)."""
    versions = ", ".join(f"{name} {_version(name)}" for name in ("anomalib", "torch", "timm", "anomalib-contnet"))
    lines = [
        f"Run: {started:%Y-%m-%d %H:%M UTC} on {platform.machine()} with {os.cpu_count()} CPU cores "
        f"(Python {platform.python_version()}; {versions}).",
        "Options: " + ", ".join(f"{name}={value}" for name, value in vars(args).items() if name != "handler"),
        f"Protocol: input {args.image_size}x{args.image_size} px (resize, no crop) for every model; seed {args.seed}; "
        f"metrics on raw scores (no post-processing); Patchcore coreset ratio {args.coreset_ratio} (anomalib's "
        "default is 0.1).",
    ]
    for category, members in itertools.groupby(sorted(subsets, key=lambda s: s.category), lambda s: s.category):
        members = list(members)
        first = members[0]
        lines.append(
            f"Data `{category}`: {', '.join(str(n) for n in sorted({s.n_train for s in members}))} training images, "
            f"{first.n_test_normal} normal + {first.n_test_anomalous} anomalous test images, "
            + ("every image of" if first.root == first.source.parent else "seeded subset of")
            + f" `{first.source}`; "
            + ("pixel metrics from the masks." if first.pixel_labels else "image labels only (no pixel metrics).")
        )
    return lines


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"
