"""The demo's figures: a prediction grid and ROC curves.

Drawn on ``matplotlib.figure.Figure`` objects directly rather than through
pyplot, so no GUI backend is chosen or changed (importing this module has no
global effect) and figures are freed as soon as they are saved.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure

from anomalib_contnet.evaluation.metrics import RocCurve

__all__ = ["SamplePrediction", "render_prediction_grid", "render_roc_curves"]

MAX_CURVE_POINTS = 2000
"""Pixel ROCs have a point per distinct score (millions); this many are plenty for a 5-inch plot."""


@dataclass(frozen=True)
class SamplePrediction:
    """One test image with its ground truth and what the exported model predicted."""

    image: np.ndarray
    """(H, W, 3) float in [0, 1] at the anomaly map's resolution."""
    labelled_anomalous: bool
    """The image's ground-truth label (from its folder)."""
    ground_truth: np.ndarray | None
    """(H, W) bool defect mask, or None where the data has no pixel labels (normal images: all False)."""
    anomaly_map: np.ndarray
    """(H, W) normalised anomaly scores (the exported model's post-processed output)."""
    predicted_mask: np.ndarray
    """(H, W) bool."""
    score: float
    predicted_anomalous: bool
    title: str
    """What the image is, e.g. ``test/stain/003.png``."""


def render_prediction_grid(samples: list[SamplePrediction], target: Path) -> None:
    """One row per sample: image | ground truth | anomaly map over the image | predicted mask over the image."""
    if not samples:
        msg = "no samples to draw"
        raise ValueError(msg)
    figure = Figure(figsize=(12, 3.1 * len(samples)))
    axes = figure.subplots(len(samples), 4, squeeze=False)
    headers = ("Image", "Ground truth", "Anomaly map", "Predicted mask")
    for row, sample in enumerate(samples):
        height, width = sample.anomaly_map.shape
        truth = sample.ground_truth if sample.ground_truth is not None else np.zeros((height, width), dtype=bool)
        if sample.ground_truth is None:
            truth_caption = "image label: " + ("anomalous (no mask)" if sample.labelled_anomalous else "normal")
        else:
            truth_caption = f"{int(truth.sum())} defect pixels" if truth.any() else "no defect"
        verdict = "anomalous" if sample.predicted_anomalous else "normal"
        panels = (
            (sample.image, None, sample.title),
            (truth, "gray", truth_caption),
            (sample.image, None, f"score {sample.score:.2f}"),
            (sample.image, None, f"predicted {verdict}"),
        )
        for column, (picture, colour_map, caption) in enumerate(panels):
            axis = axes[row][column]
            axis.imshow(picture, cmap=colour_map, vmin=0, vmax=1)
            axis.set_title(f"{headers[column]}\n{caption}" if row == 0 else caption, fontsize=9)
            axis.axis("off")
        heat = axes[row][2].imshow(sample.anomaly_map, cmap="jet", alpha=0.5, vmin=0, vmax=1)
        figure.colorbar(heat, ax=axes[row][2], fraction=0.046, pad=0.02)
        overlay = np.zeros((height, width, 4))
        overlay[sample.predicted_mask] = (1.0, 0.0, 0.0, 0.45)
        axes[row][3].imshow(overlay)
        if truth.any():
            axes[row][3].contour(truth, levels=[0.5], colors="lime", linewidths=0.8)
    height_inches = figure.get_figheight()
    figure.suptitle("Exported model (OpenVINO) on test images; green outline: true defect", fontsize=11)
    figure.tight_layout(rect=(0, 0, 1, 1 - 0.45 / height_inches))  # leave the title its own strip
    _save(figure, target)


def render_roc_curves(image_roc: RocCurve, pixel_roc: RocCurve | None, target: Path) -> None:
    """Image-level and (when masks exist) pixel-level ROC curves of the raw scores."""
    panels = [("Image level (raw scores)", image_roc)]
    if pixel_roc is not None:
        panels.append(("Pixel level (raw anomaly maps)", pixel_roc))
    figure = Figure(figsize=(5.2 * len(panels), 5))
    axes = figure.subplots(1, len(panels), squeeze=False)
    for axis, (title, curve) in zip(axes[0], panels, strict=True):
        fpr, tpr = _thinned(curve)
        axis.plot(fpr, tpr, linewidth=1.8, label=f"AUROC {curve.auc:.3f}")
        axis.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1, label="chance")
        axis.set_xlim(0, 1)
        axis.set_ylim(0, 1.01)
        axis.set_xlabel("False positive rate")
        axis.set_ylabel("True positive rate")
        axis.set_title(title)
        axis.legend(loc="lower right")
        axis.set_aspect("equal")
    figure.tight_layout()
    _save(figure, target)


def _thinned(curve: RocCurve) -> tuple[np.ndarray, np.ndarray]:
    """At most MAX_CURVE_POINTS points of the curve, always including both ends."""
    count = curve.fpr.numel()
    if count <= MAX_CURVE_POINTS:
        return curve.fpr.numpy(), curve.tpr.numpy()
    keep = torch.linspace(0, count - 1, MAX_CURVE_POINTS).round().long()
    return curve.fpr[keep].numpy(), curve.tpr[keep].numpy()


def _save(figure: Figure, target: Path) -> None:
    """Render to PNG in memory, then write it whole (the demo publishes its folder atomically)."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(buffer.getvalue())
