"""The few-shot curve: image and pixel AUROC against the number of training images, mean and standard error over seeds.

Each point is one model configuration fitted on N training images drawn with several seeds and scored
on one fixed test set. A run that failed or was refused (a model that needs more images than N) is
kept as such: it appears in the table as "failed k of n" and is left out of the plot, never averaged.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from anomalib_contnet.atomic_files import write_bytes_atomically
from anomalib_contnet.evaluation.table import BenchmarkRow

__all__ = ["FewShotPoint", "few_shot_markdown", "few_shot_points", "plot_few_shot"]


@dataclass(frozen=True)
class FewShotPoint:
    """Mean and standard error over the seeds that succeeded, for one model, category and N."""

    category: str
    model: str
    """Model class and backbone, e.g. ``Padim efficientnet_lite0``."""
    n_train: int
    runs: int
    failed: list[str]
    """The reasons of the runs that failed (empty when all succeeded)."""
    image_auroc: tuple[float, float] | None
    """(mean, standard error) or None when no run succeeded."""
    pixel_auroc: tuple[float, float] | None


def _mean_and_error(values: list[float]) -> tuple[float, float] | None:
    """Mean and standard error of the mean (sample standard deviation over sqrt(n); 0 for one value)."""
    if not values:
        return None
    mean = sum(values) / len(values)
    if len(values) == 1:
        return mean, 0.0
    variance = sum((value - mean) ** 2 for value in values) / (len(values) - 1)
    return mean, math.sqrt(variance / len(values))


def few_shot_points(rows: list[BenchmarkRow]) -> list[FewShotPoint]:
    """Group job rows by category, model and N (in the order they appear) and summarise the seeds."""
    groups: dict[tuple[str, str, int], list[BenchmarkRow]] = {}
    for row in rows:
        groups.setdefault((row.category, f"{row.model} {row.backbone}", row.n_train), []).append(row)
    points = []
    for (category, model, n_train), members in groups.items():
        ok = [row for row in members if row.status == "ok"]
        pixel = [row.pixel_auroc for row in ok if row.pixel_auroc is not None]
        points.append(
            FewShotPoint(
                category=category,
                model=model,
                n_train=n_train,
                runs=len(members),
                failed=[row.status for row in members if row.status != "ok"],
                image_auroc=_mean_and_error([row.image_auroc for row in ok if row.image_auroc is not None]),
                pixel_auroc=_mean_and_error(pixel) if len(pixel) == len(ok) else None,
            )
        )
    return sorted(points, key=lambda point: (point.category, point.model, point.n_train))


def _cell(value: tuple[float, float] | None) -> str:
    return "n/a" if value is None else f"{value[0]:.3f} ± {value[1]:.3f}"


def few_shot_markdown(points: list[FewShotPoint], header_lines: list[str]) -> str:
    """One table row per category, model and N: image and pixel AUROC as mean ± standard error, and failures."""
    lines = ["# Few-shot results", "", *[f"{line}  " for line in header_lines], ""]
    lines += [
        "| Category | Model | N train | Image AUROC | Pixel AUROC | Runs | Failed |",
        "|---|---|---|---|---|---|---|",
    ]
    for point in points:
        failed = "" if not point.failed else f"{len(point.failed)}: {point.failed[0][:100]}"
        cells = (point.category, point.model, str(point.n_train), _cell(point.image_auroc), _cell(point.pixel_auroc))
        lines.append("| " + " | ".join([*cells, str(point.runs), failed.replace("|", "/")]) + " |")
    lines += ["", "Mean ± standard error over the seeds that succeeded; n/a: no run succeeded or no pixel labels."]
    return "\n".join(lines) + "\n"


def plot_few_shot(points: list[FewShotPoint], target: Path) -> bool:
    """Image (top) and pixel (bottom) AUROC against N, one column per category; False when nothing succeeded."""
    categories = list(dict.fromkeys(point.category for point in points))
    models = list(dict.fromkeys(point.model for point in points))
    if not any(point.image_auroc for point in points):
        return False
    figure = Figure(figsize=(5.0 * len(categories), 7.5), layout="constrained")
    FigureCanvasAgg(figure)
    grid = figure.subplots(2, len(categories), squeeze=False, sharex=True)
    counts = sorted({point.n_train for point in points})
    for column, category in enumerate(categories):
        for row, (metric, label) in enumerate((("image_auroc", "image AUROC"), ("pixel_auroc", "pixel AUROC"))):
            axes = grid[row][column]
            if not any(getattr(point, metric) for point in points if point.category == category):
                axes.text(
                    0.5, 0.5, "no pixel labels" if row else "no run succeeded", ha="center", transform=axes.transAxes
                )
                axes.set_yticks([])
            for index, model in enumerate(models):
                measured = [
                    (point.n_train, getattr(point, metric))
                    for point in points
                    if point.category == category and point.model == model and getattr(point, metric) is not None
                ]
                if measured:
                    present, values = zip(*measured, strict=True)
                    axes.errorbar(
                        present,
                        [mean for mean, _ in values],
                        yerr=[error for _, error in values],
                        marker="o",
                        capsize=3,
                        color=f"C{index}",
                        label=model,
                    )
            axes.set_xscale("log", base=2)
            axes.set_xticks(counts, labels=[str(count) for count in counts])
            axes.set_ylabel(f"{label} (mean ± s.e.)")
            axes.set_title(f"{category}: {label}", fontsize=10)
            axes.grid(visible=True, alpha=0.3)
        grid[1][column].set_xlabel("training images N (count, log scale)")
    handles = [
        grid[0][0].plot([], [], marker="o", color=f"C{index}", label=model)[0] for index, model in enumerate(models)
    ]
    figure.legend(handles=handles, loc="outside lower center", ncols=2, fontsize=9)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    write_bytes_atomically(target, buffer.getvalue())
    return True
