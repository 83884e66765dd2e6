"""Detection and localisation metrics on raw anomaly scores.

Why not anomalib's ``AUROC`` as is: it is torchmetrics' ``BinaryROC``, which treats
any score outside [0, 1] as a logit and applies a sigmoid. Raw Mahalanobis or
nearest-neighbour distances are mostly above ~17, where the float32 sigmoid is
exactly 1.0, so most scores tie and the area collapses towards 0.5 (measured:
scores ``[20, 25, 30, 18, 22, 40]`` with labels ``[0, 0, 1, 0, 1, 1]`` give 0.5
instead of 0.889). Normalising first (anomalib's default ``PostProcessor``) avoids
the sigmoid but clamps to [0, 1], which creates ties of its own. The ROC here is
therefore computed in float64 on the scores as the model produced them, with tied
scores handled as one threshold (equal to the Mann-Whitney statistic with midranks).

AUPRO uses anomalib's implementation, which sorts the raw scores without any
squashing (FPR limit 0.3, the MVTec AD convention).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812  (PyTorch's usual name)
from anomalib.data import ImageBatch
from anomalib.metrics import AUPRO
from PIL import Image

__all__ = [
    "RawScores",
    "RocCurve",
    "collect_raw_scores",
    "localisation_aupro",
    "native_size_pixel_roc",
    "roc_curve",
]


@dataclass(frozen=True)
class RocCurve:
    """False- and true-positive rates at every distinct score threshold, from (0, 0) to (1, 1)."""

    fpr: torch.Tensor
    tpr: torch.Tensor

    @property
    def auc(self) -> float:
        """Area under the curve (trapezoidal; exact for a step-free ROC with ties as diagonal segments)."""
        return float(torch.trapezoid(self.tpr, self.fpr))


def roc_curve(scores: torch.Tensor, labels: torch.Tensor) -> RocCurve:
    """ROC of ``scores`` (higher = more anomalous) against binary ``labels``, in float64, ties as one threshold.

    Raises:
        ValueError: when the inputs differ in size or hold only one class (the ROC is undefined).
    """
    scores = scores.detach().reshape(-1).to(torch.float64)
    positives = labels.detach().reshape(-1).to(torch.bool)
    if scores.numel() != positives.numel():
        msg = f"{scores.numel()} scores but {positives.numel()} labels"
        raise ValueError(msg)
    n_positive = int(positives.sum())
    n_negative = positives.numel() - n_positive
    if n_positive == 0 or n_negative == 0:
        msg = f"the ROC needs both classes; got {n_positive} anomalous and {n_negative} normal samples"
        raise ValueError(msg)
    if not torch.isfinite(scores).all():
        msg = "scores contain NaN or infinite values; the ROC would depend on how they sort"
        raise ValueError(msg)
    order = torch.argsort(scores, descending=True, stable=True)
    sorted_scores = scores[order]
    sorted_positive = positives[order].to(torch.float64)
    true_positives = torch.cumsum(sorted_positive, 0)
    false_positives = torch.cumsum(1.0 - sorted_positive, 0)
    # A threshold sits after the last sample of each run of equal scores: tied samples move together.
    last_of_run = torch.ones_like(sorted_scores, dtype=torch.bool)
    last_of_run[:-1] = sorted_scores[:-1] != sorted_scores[1:]
    zero = torch.zeros(1, dtype=torch.float64)
    tpr = torch.cat([zero, true_positives[last_of_run] / n_positive])
    fpr = torch.cat([zero, false_positives[last_of_run] / n_negative])
    return RocCurve(fpr=fpr, tpr=tpr)


@dataclass(frozen=True)
class RawScores:
    """All test predictions of one model, as the model produced them (no normalisation, no thresholds)."""

    image_scores: torch.Tensor
    """(N,) image anomaly scores."""
    image_labels: torch.Tensor
    """(N,) True for anomalous images."""
    anomaly_maps: torch.Tensor
    """(N, H, W) pixel anomaly scores."""
    masks: torch.Tensor | None
    """(N, H, W) True for anomalous pixels, or None when the data has no masks."""
    image_paths: tuple[str, ...]


def collect_raw_scores(batches: Iterable[ImageBatch]) -> RawScores:
    """Concatenate the predicted batches of ``Engine.predict`` (run with ``post_processor=False``)."""
    scores, labels, maps, masks, paths = [], [], [], [], []
    for batch in batches:
        if batch.pred_score is None or batch.anomaly_map is None or batch.gt_label is None:
            msg = "predictions lack pred_score, anomaly_map or gt_label; predict on a labelled test split"
            raise ValueError(msg)
        scores.append(batch.pred_score.reshape(-1).float())
        labels.append(batch.gt_label.reshape(-1).bool())
        anomaly_map = batch.anomaly_map.float()
        maps.append(anomaly_map.reshape(anomaly_map.shape[0], *anomaly_map.shape[-2:]))
        masks.append(None if batch.gt_mask is None else batch.gt_mask.reshape(maps[-1].shape).bool())
        paths.extend(str(path) for path in (batch.image_path or []))
    if not scores:
        msg = "no predictions to evaluate (empty test split)"
        raise ValueError(msg)
    have_masks = all(mask is not None for mask in masks)
    return RawScores(
        image_scores=torch.cat(scores),
        image_labels=torch.cat(labels),
        anomaly_maps=torch.cat(maps),
        masks=torch.cat(masks) if have_masks else None,  # type: ignore[arg-type]  (None excluded by have_masks)
        image_paths=tuple(paths),
    )


def localisation_aupro(anomaly_maps: torch.Tensor, masks: torch.Tensor, fpr_limit: float = 0.3) -> float:
    """Area under the per-region-overlap curve up to ``fpr_limit``, normalised to [0, 1] (anomalib's AUPRO)."""
    metric = AUPRO(fields=["anomaly_map", "gt_mask"], fpr_limit=fpr_limit)
    batch = ImageBatch(image=torch.zeros(masks.shape[0], 3, 1, 1), anomaly_map=anomaly_maps, gt_mask=masks)
    metric.update(batch)
    return float(metric.compute())


def native_size_pixel_roc(scores: RawScores) -> RocCurve:
    """Pixel ROC at each test image's own size: maps upsampled bilinearly, masks read from disk unresized.

    The model's maps have the input size (224x224 by default) and the pre-processor resizes
    the masks to it (nearest), which thickens or drops thin defects; MVTec AD's masks are
    700-1024 px. Here every map is upsampled to its image's size instead, and compared with
    ``ground_truth/<defect>/<name>_mask.png`` (all normal for ``test/good``) as stored.
    """
    if len(scores.image_paths) != scores.anomaly_maps.shape[0]:
        msg = "native-size pixel metrics need the image path of every prediction"
        raise ValueError(msg)
    all_scores, all_labels = [], []
    for anomaly_map, image_path in zip(scores.anomaly_maps, scores.image_paths, strict=True):
        image = Path(image_path)
        with Image.open(image) as opened:
            width, height = opened.size
        if image.parent.name == "good":
            mask = torch.zeros(height, width, dtype=torch.bool)
        else:
            mask_path = image.parents[2] / "ground_truth" / image.parent.name / f"{image.stem}_mask.png"
            with Image.open(mask_path) as opened:
                mask = torch.from_numpy(np.asarray(opened.convert("L")) > 0)
            if mask.shape != (height, width):
                msg = f"{mask_path} is {mask.shape[1]}x{mask.shape[0]} px but its image is {width}x{height} px"
                raise ValueError(msg)
        upsampled = F.interpolate(anomaly_map[None, None], size=(height, width), mode="bilinear", align_corners=False)
        all_scores.append(upsampled.reshape(-1))
        all_labels.append(mask.reshape(-1))
    return roc_curve(torch.cat(all_scores), torch.cat(all_labels))
