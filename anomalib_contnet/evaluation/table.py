"""The benchmark's rows, their averages over categories, and the CSV / markdown renderings."""

from __future__ import annotations

import csv
import io
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields, replace
from typing import TYPE_CHECKING

from anomalib_contnet.evaluation.paper import MVTEC_AD_OBJECTS, MVTEC_AD_TEXTURES, PAPER_AUROC_PERCENT, category_kind

if TYPE_CHECKING:  # only for annotations: this module must stay importable without the job machinery
    from anomalib_contnet.evaluation.configs import JobWeights, ModelConfig
    from anomalib_contnet.evaluation.subsets import CategorySubset
    from anomalib_contnet.evaluation.worker import JobResult

__all__ = ["CSV_COLUMNS", "MEAN_KIND", "BenchmarkRow", "category_means", "rows_to_csv", "rows_to_markdown"]

MIB = 1024 * 1024
MEAN_KIND = "mean"
"""The ``kind`` of a row that averages other rows."""


@dataclass(frozen=True)
class BenchmarkRow:
    """One job's line in the table (or an average of several); None where a value does not apply or failed."""

    category: str
    kind: str
    """``texture`` / ``object`` (MVTec AD's split), ``other``, or ``mean`` for an average row."""
    model: str
    backbone: str
    weights: str
    settings: str
    n_train: int
    n_test: int
    image_auroc: float | None
    paper_image_auroc: float | None
    """The paper's Table 2 value for this category, on rows of the paper's configuration only."""
    pixel_auroc: float | None
    paper_pixel_auroc: float | None
    """The paper's Table 3 value for this category, on rows of the paper's configuration only."""
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
        settings: str,
        paper_configuration: bool,
    ) -> BenchmarkRow:
        """Combine what was planned (config, weights, data) with what the job measured."""
        paper = PAPER_AUROC_PERCENT.get(subset.category) if paper_configuration else None
        return cls(
            category=subset.category,
            kind=category_kind(subset.category),
            model=config.display_model,
            backbone=config.backbone,
            weights=weights.label,
            settings=settings,
            n_train=subset.n_train,
            n_test=subset.n_test_normal + subset.n_test_anomalous,
            image_auroc=result.image_auroc,
            paper_image_auroc=None if paper is None else paper[0] / 100,
            pixel_auroc=result.pixel_auroc,
            paper_pixel_auroc=None if paper is None else paper[1] / 100,
            aupro=result.aupro,
            fit_s=result.fit_s,
            predict_images_per_s=result.predict_images_per_s,
            peak_rss_mb=None if result.peak_rss_bytes is None else result.peak_rss_bytes / MIB,
            checkpoint_mb=None if result.checkpoint_bytes is None else result.checkpoint_bytes / MIB,
            status=result.status if result.status == "ok" else f"failed: {result.error}",
        )


CSV_COLUMNS: tuple[str, ...] = tuple(field.name for field in fields(BenchmarkRow))
AVERAGED = ("image_auroc", "paper_image_auroc", "pixel_auroc", "paper_pixel_auroc", "aupro")


def category_means(rows: list[BenchmarkRow]) -> list[BenchmarkRow]:
    """Per model configuration: the mean over MVTec AD's textures, its objects, and all categories.

    A mean is given only where every averaged row has the value (a failed job makes it n/a,
    never a mean of the rest). Textures / objects rows appear when the run has such
    categories, the "all" row when it has more than one category.
    """
    groups: dict[tuple[str, ...], list[BenchmarkRow]] = {}
    for row in rows:
        groups.setdefault((row.model, row.backbone, row.weights, row.settings), []).append(row)
    means = []
    selections: tuple[tuple[str, Callable[[BenchmarkRow], bool]], ...] = (
        ("textures", lambda row: row.category in MVTEC_AD_TEXTURES),
        ("objects", lambda row: row.category in MVTEC_AD_OBJECTS),
        ("all", lambda _row: True),
    )
    for members in groups.values():
        for label, selected in selections:
            chosen = [row for row in members if selected(row)]
            if not chosen or (label == "all" and len(chosen) < 2):
                continue
            values = {name: _mean([getattr(row, name) for row in chosen]) for name in AVERAGED}
            means.append(
                replace(
                    chosen[0],
                    category=f"mean ({label})",
                    kind=MEAN_KIND,
                    n_train=sum(row.n_train for row in chosen),
                    n_test=sum(row.n_test for row in chosen),
                    fit_s=None,
                    predict_images_per_s=None,
                    peak_rss_mb=None,
                    checkpoint_mb=None,
                    status=f"mean of {len(chosen)} categor{'y' if len(chosen) == 1 else 'ies'}",
                    **values,
                )
            )
    return means


def _mean(values: list[float | None]) -> float | None:
    present = [value for value in values if value is not None]
    return sum(present) / len(present) if present and len(present) == len(values) else None


def rows_to_csv(rows: list[BenchmarkRow]) -> str:
    """All columns, full precision, empty cells for values that do not apply."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({key: "" if value is None else value for key, value in asdict(row).items()})
    return buffer.getvalue()


MARKDOWN_COLUMNS = (
    "Category",
    "Train",
    "Test",
    "Model",
    "Backbone",
    "Weights",
    "Image AUROC",
    "Paper image",
    "Pixel AUROC",
    "Paper pixel",
    "AUPRO",
    "Fit (s)",
    "Predict (img/s)",
    "Peak RSS (GiB)",
    "Checkpoint (MiB)",
    "Status",
)


def rows_to_markdown(rows: list[BenchmarkRow], header_lines: list[str]) -> str:
    """A markdown document: the run's description, one table row per job, then the averages."""
    lines = ["# Benchmark results", "", *[f"{line}  " for line in header_lines], ""]
    lines.append("| " + " | ".join(MARKDOWN_COLUMNS) + " |")
    lines.append("|" + "|".join("---" for _ in MARKDOWN_COLUMNS) + "|")
    for row in rows:
        cells = (
            row.category,
            str(row.n_train),
            str(row.n_test),
            row.model,
            row.backbone,
            row.weights,
            _number(row.image_auroc, 3),
            _number(row.paper_image_auroc, 3, missing=""),
            _number(row.pixel_auroc, 3),
            _number(row.paper_pixel_auroc, 3, missing=""),
            _number(row.aupro, 3),
            _number(row.fit_s, 1, missing="" if row.kind == MEAN_KIND else "n/a"),
            _number(row.predict_images_per_s, 1, missing="" if row.kind == MEAN_KIND else "n/a"),
            _number(None if row.peak_rss_mb is None else row.peak_rss_mb / 1024, 2, missing=""),
            _number(row.checkpoint_mb, 0, missing=""),
            _cell_text(row.status, 160),
        )
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(
        "n/a: not applicable (no pixel labels) or not measured (failed or not yet run job). "
        "Paper columns: Dini & Rahtu (2023), Tables 2 and 3, shown on rows of the paper's configuration "
        "(ConTNet, layer3+layer4, 224 px) on MVTec AD categories; a row's Weights column says whether "
        "it ran with the paper's ImageNet weights. Settings of each row: the CSV's `settings` column."
    )
    return "\n".join(lines) + "\n"


def _cell_text(text: str, limit: int) -> str:
    """One table cell: no pipes or line breaks, long failure reasons shortened (the CSV keeps them whole)."""
    flat = " ".join(text.replace("|", "/").split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def _number(value: float | None, digits: int, missing: str = "n/a") -> str:
    return missing if value is None else f"{value:.{digits}f}"
