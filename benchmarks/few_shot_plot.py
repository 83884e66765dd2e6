"""Plot a few-shot benchmark: image and pixel AUROC against the number of training images, per category.

Reads the ``benchmark.csv`` that ``anomalib-contnet benchmark --few-shot ...`` wrote; every point is the
mean over the seeds that succeeded, with its standard error as the error bar; failed runs are left out.

    python benchmarks/few_shot_plot.py results/few-shot/benchmark.csv docs/benchmarks_few_shot.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure

METRICS = {"image_auroc": "image AUROC", "pixel_auroc": "pixel AUROC"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("table", type=Path, help="benchmark.csv of a --few-shot run")
    parser.add_argument("output", type=Path, help="PNG to write")
    args = parser.parse_args()
    table = pd.read_csv(args.table)
    table = table[table.status == "ok"].assign(label=lambda rows: rows.model + " " + rows.backbone)
    categories, labels = list(dict.fromkeys(table.category)), sorted(set(table.label))
    counts = sorted(set(table.n_train))
    figure = Figure(figsize=(4.2 * len(categories), 7.0), layout="constrained")
    axes = figure.subplots(len(METRICS), len(categories), squeeze=False)
    for column, category in enumerate(categories):
        rows = table[table.category == category]
        for row, (metric, title) in enumerate(METRICS.items()):
            axis = axes[row][column]
            if rows[metric].isna().all():
                axis.text(0.5, 0.5, f"{category} has no pixel labels", ha="center", va="center")
                axis.set_axis_off()
                continue
            for label in labels:
                points = rows[rows.label == label].groupby("n_train")[metric].agg(["mean", "sem"])
                axis.errorbar(
                    points.index, points["mean"], yerr=points["sem"].fillna(0), marker="o", capsize=3, label=label
                )
            axis.set_xscale("log", base=2)
            axis.set_xticks(counts, [str(count) for count in counts])
            axis.set_xlabel("training images N (log scale)")
            axis.set_ylabel(title)
            axis.set_title(f"{category}: {title}")
            axis.grid(alpha=0.3)
    handles, names = axes[0][0].get_legend_handles_labels()
    figure.legend(handles, names, loc="outside lower center", ncols=min(len(names), 3))
    figure.savefig(args.output, dpi=110)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
