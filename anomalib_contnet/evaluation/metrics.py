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

import torch
from anomalib.data import ImageBatch
from anomalib.metrics import AUPRO

__all__ = ["RawScores", "RocCurve", "localisation_aupro", "raw_test_scores", "roc_curve"]


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
    masks: torch.Tensor
    """(N, H, W) True for anomalous pixels (whole images where the data has image labels only)."""


@torch.no_grad()
def raw_test_scores(model: torch.nn.Module, batches: Iterable[ImageBatch]) -> RawScores:
    """Scores straight from the torch model of an anomalib module, before any post-processor sees them.

    Images and masks go through the module's own pre-processor, as in its Lightning test step.
    """
    model.eval()
    scores, labels, maps, masks = [], [], [], []
    for batch in batches:
        images, truth = model.pre_processor.transform(batch.image, batch.gt_mask)
        output = model.model(images)
        maps.append(output.anomaly_map.reshape(images.shape[0], *output.anomaly_map.shape[-2:]).float())
        scores.append(output.pred_score.reshape(-1).float())
        labels.append(batch.gt_label.reshape(-1).bool())
        masks.append(truth.reshape(maps[-1].shape).bool())
    if not scores:
        msg = "no predictions to evaluate (empty test split)"
        raise ValueError(msg)
    return RawScores(torch.cat(scores), torch.cat(labels), torch.cat(maps), torch.cat(masks))


def localisation_aupro(anomaly_maps: torch.Tensor, masks: torch.Tensor, fpr_limit: float = 0.3) -> float:
    """Area under the per-region-overlap curve up to ``fpr_limit``, normalised to [0, 1] (anomalib's AUPRO)."""
    metric = AUPRO(fields=["anomaly_map", "gt_mask"], fpr_limit=fpr_limit)
    batch = ImageBatch(image=torch.zeros(masks.shape[0], 3, 1, 1), anomaly_map=anomaly_maps, gt_mask=masks)
    metric.update(batch)
    return float(metric.compute())
