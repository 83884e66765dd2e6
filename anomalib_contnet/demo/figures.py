"""The demo's figure: a grid of the exported model's predictions on test images.

Drawn on ``matplotlib.figure.Figure`` objects directly rather than through pyplot, so no GUI backend
is chosen or changed and figures are freed as soon as they are saved.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

__all__ = ["render_prediction_grid"]


def render_prediction_grid(samples: list[dict[str, Any]], target: Path) -> None:
    """One row per sample: image | ground truth | anomaly map over the image | predicted mask over the image."""
    figure = Figure(figsize=(12, 3.1 * len(samples)), layout="constrained")
    figure.suptitle("Exported model (OpenVINO) on test images; green outline: true defect")
    axes = figure.subplots(len(samples), 4, squeeze=False)
    for row, sample in enumerate(samples):
        truth = sample["truth"] if sample["truth"] is not None else np.zeros(sample["anomaly_map"].shape, dtype=bool)
        if sample["truth"] is None:
            truth_caption = "image label: " + ("anomalous (no mask)" if sample["labelled_anomalous"] else "normal")
        else:
            truth_caption = f"{int(truth.sum())} defect pixels" if truth.any() else "no defect"
        captions = (
            f"Image\n{sample['image']}",
            f"Ground truth\n{truth_caption}",
            f"Anomaly map\nscore {sample['score']:.2f}",
            f"Predicted mask\npredicted {'anomalous' if sample['anomalous'] else 'normal'}",
        )
        for column, caption in enumerate(captions):
            axes[row][column].imshow(truth if column == 1 else sample["picture"], cmap="gray", vmin=0, vmax=1)
            axes[row][column].set_title(caption, fontsize=9)
            axes[row][column].axis("off")
        heat = axes[row][2].imshow(sample["anomaly_map"], cmap="jet", alpha=0.5, vmin=0, vmax=1)
        figure.colorbar(heat, ax=axes[row][2], fraction=0.046, pad=0.02)
        overlay = np.zeros((*truth.shape, 4))
        overlay[sample["predicted_mask"]] = (1.0, 0.0, 0.0, 0.45)
        axes[row][3].imshow(overlay)
        if truth.any():
            axes[row][3].contour(truth, levels=[0.5], colors="lime", linewidths=0.8)
    figure.savefig(target, dpi=100)
