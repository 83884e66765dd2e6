"""From per-patch distances to a full-resolution anomaly map (Section 4.2 of the paper)."""

from __future__ import annotations

import torch
import torch.nn.functional as F  # noqa: N812
from anomalib.models.components.filters import GaussianBlur2d
from torch import nn

__all__ = ["AnomalyMapGenerator"]


class AnomalyMapGenerator(nn.Module):
    """Upsample the distance map bilinearly to the image size, then smooth it with a Gaussian.

    Args:
        sigma: standard deviation of the smoothing kernel in pixels (4 in the paper
            and in PaDiM). The kernel spans ``2 * int(4 * sigma + 0.5) + 1`` pixels
            with reflected borders, exactly as anomalib's Padim, so both models'
            maps agree for the same distances.
    """

    def __init__(self, sigma: float = 4.0) -> None:
        super().__init__()
        if not sigma > 0:
            msg = f"sigma must be positive, got {sigma}"
            raise ValueError(msg)
        kernel_size = 2 * int(4.0 * sigma + 0.5) + 1
        self.blur = GaussianBlur2d(sigma=(sigma, sigma), channels=1, kernel_size=(kernel_size, kernel_size))

    def forward(self, distances: torch.Tensor, image_size: tuple[int, int] | torch.Size) -> torch.Tensor:
        """Map (B, 1, h, w) patch distances to a smoothed (B, 1, H, W) anomaly map."""
        upsampled = F.interpolate(distances, size=tuple(image_size), mode="bilinear", align_corners=False)
        return self.blur(upsampled)
