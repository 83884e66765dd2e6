"""The benchmark's rows and their CSV / markdown renderings."""

from __future__ import annotations

import csv
import io
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # only for annotations: this module must stay importable without the job machinery
    from anomalib_contnet.benchmark.configs import JobWeights, ModelConfig
    from anomalib_contnet.benchmark.subsets import CategorySubset
    from anomalib_contnet.benchmark.worker import JobResult

__all__ = ["CSV_COLUMNS", "BenchmarkRow", "rows_to_csv", "rows_to_markdown"]

MIB = 1024 * 1024


@dataclass(frozen=True)
class BenchmarkRow:
    """One job's line in the table; metrics are None when they do not apply or the job failed."""

    category: str
    model: str
    backbone: str
    weights: str
    settings: str
    n_train: int
    n_test: int
    image_auroc: float | None
    pixel_auroc: float | None
    aupro: float | None
    fit_s: float | None
    predict_images_per_s: float | None
    peak_rss_mb: float | None
    checkpoint_mb: float | None
    status: str

    @classmethod
    def from_result(
        cls,
        config: ModelConfig,
        weights: JobWeights,
        subset: CategorySubset,
        result: JobResult,
        coreset_ratio: float,
    ) -> BenchmarkRow:
        """Combine what was planned (config, weights, data) with what the job measured."""
        settings = [f"layers={'+'.join(config.layers)}"]
        settings += [f"{key}={value}" for key, value in config.options.items()]
        if config.family == "patchcore":
            settings.append(f"coreset_ratio={coreset_ratio}")
        return cls(
            category=subset.category,
            model=config.display_model,
            backbone=config.backbone,
            weights=weights.label,
            settings=" ".join(settings),
            n_train=subset.n_train,
            n_test=subset.n_test_normal + subset.n_test_anomalous,
            image_auroc=result.image_auroc,
            pixel_auroc=result.pixel_auroc,
            aupro=result.aupro,
            fit_s=result.fit_s,
            predict_images_per_s=result.predict_images_per_s,
            peak_rss_mb=None if result.peak_rss_bytes is None else result.peak_rss_bytes / MIB,
            checkpoint_mb=None if result.checkpoint_bytes is None else result.checkpoint_bytes / MIB,
            status="ok" if result.status == "ok" else f"failed: {result.error}",
        )


CSV_COLUMNS: tuple[str, ...] = tuple(field.name for field in fields(BenchmarkRow))


def rows_to_csv(rows: list[BenchmarkRow]) -> str:
    """All columns, full precision, empty cells for values that do not apply."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({key: "" if value is None else value for key, value in asdict(row).items()})
    return buffer.getvalue()


def rows_to_markdown(rows: list[BenchmarkRow], header_lines: list[str]) -> str:
    """A markdown document: the run's description, then one table row per job."""
    columns = (
        "Category",
        "Model",
        "Backbone",
        "Weights",
        "Settings",
        "Image AUROC",
        "Pixel AUROC",
        "AUPRO",
        "Fit (s)",
        "Predict (img/s)",
        "Peak RSS (GB)",
        "Checkpoint (MB)",
        "Status",
    )
    lines = ["# Benchmark results", "", *[f"{line}  " for line in header_lines], ""]
    lines.append("| " + " | ".join(columns) + " |")
    lines.append("|" + "|".join("---" for _ in columns) + "|")
    for row in rows:
        cells = (
            row.category,
            row.model,
            row.backbone,
            row.weights,
            f"`{row.settings}`",
            _number(row.image_auroc, 3),
            _number(row.pixel_auroc, 3),
            _number(row.aupro, 3),
            _number(row.fit_s, 1),
            _number(row.predict_images_per_s, 1),
            _number(None if row.peak_rss_mb is None else row.peak_rss_mb / 1024, 2),
            _number(row.checkpoint_mb, 0),
            _cell_text(row.status, 160),
        )
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("n/a: not applicable (no pixel labels) or not measured (failed job).")
    return "\n".join(lines) + "\n"


def _cell_text(text: str, limit: int) -> str:
    """One table cell: no pipes or line breaks, long failure reasons shortened (the CSV keeps them whole)."""
    flat = " ".join(text.replace("|", "/").split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def _number(value: float | None, digits: int) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"
