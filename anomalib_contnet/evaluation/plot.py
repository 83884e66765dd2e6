"""AUROC against cost, one panel per category and cost: the picture next to the table.

Drawn with matplotlib's object API on the Agg canvas (no display, no global pyplot
state), rendered to memory and written atomically like every other result file.
"""

from __future__ import annotations

import io
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from anomalib_contnet.atomic_files import write_bytes_atomically
from anomalib_contnet.evaluation.table import MEAN_KIND, BenchmarkRow

__all__ = ["plot_auroc_against_cost"]

COSTS: tuple[tuple[str, str], ...] = (
    ("seconds_per_image", "predict time (s / image)"),
    ("peak_rss_gb", "peak memory (GiB)"),
)


def _cost(row: BenchmarkRow, name: str) -> float | None:
    if name == "seconds_per_image":
        return None if not row.predict_images_per_s else 1.0 / row.predict_images_per_s
    return None if row.peak_rss_mb is None else row.peak_rss_mb / 1024


def plot_auroc_against_cost(rows: list[BenchmarkRow], target: Path) -> bool:
    """Write a PNG of image (filled) and pixel (hollow) AUROC of every finished job against its costs.

    Returns False (and writes nothing) when no job has finished.
    """
    measured = [row for row in rows if row.kind != MEAN_KIND and row.status == "ok" and row.image_auroc is not None]
    categories = list(dict.fromkeys(row.category for row in measured))
    if not categories:
        return False
    backbones = list(dict.fromkeys(f"{row.model} {row.backbone} ({row.weights})" for row in measured))
    colours = {name: f"C{index % 10}" for index, name in enumerate(backbones)}
    figure = Figure(figsize=(6.0 * len(COSTS), 3.6 * len(categories)), layout="constrained")
    FigureCanvasAgg(figure)
    axes_grid = figure.subplots(len(categories), len(COSTS), squeeze=False)
    for axes_row, category in zip(axes_grid, categories, strict=True):
        for axes, (cost_name, cost_label) in zip(axes_row, COSTS, strict=True):
            for row in (row for row in measured if row.category == category):
                cost = _cost(row, cost_name)
                if cost is None:
                    continue
                colour = colours[f"{row.model} {row.backbone} ({row.weights})"]
                axes.scatter(cost, row.image_auroc, color=colour, marker="o")
                if row.pixel_auroc is not None:
                    axes.scatter(cost, row.pixel_auroc, facecolors="none", edgecolors=colour, marker="s")
            axes.set_xscale("log")
            axes.set_xlabel(cost_label)
            axes.set_ylabel("AUROC (o image, \u25a1 pixel)")
            axes.set_title(category, fontsize=9)
            axes.grid(visible=True, alpha=0.3)
    handles = [
        axes_grid[0][0].scatter([], [], color=colour, marker="o", label=name) for name, colour in colours.items()
    ]
    figure.legend(handles=handles, loc="outside lower center", fontsize=7, ncols=1)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    write_bytes_atomically(target, buffer.getvalue())
    return True
