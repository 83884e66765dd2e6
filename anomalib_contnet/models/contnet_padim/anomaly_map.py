"""From per-patch distances to a full-resolution anomaly map (Section 4.2 of the paper).

Bilinear upsampling and Gaussian smoothing with reflected borders are both linear and
separable, so their composition is ``A · D · Bᵀ`` for the (h, w) distance map ``D`` and
(H, h), (W, w) matrices ``A``, ``B`` obtained by upsampling and blurring identity matrices:
two small products per image instead of a 33x33 convolution over every pixel (which cost
more than the Mahalanobis step). The map is the same up to float32 rounding.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F  # noqa: N812
from anomalib.models.components.filters import GaussianBlur2d
from anomalib.models.components.filters.blur import compute_kernel_size
from torch import nn

__all__ = ["AnomalyMapGenerator", "refuse_bad_sigma"]


def refuse_bad_sigma(sigma: float, image_size: tuple[int, int] | None = None) -> None:
    """Raise ValueError unless ``sigma`` is positive, finite and its kernel fits an ``image_size`` map.

    Reflected borders need a kernel radius (``int(4 * sigma + 0.5)``, anomalib's) below both map sides.
    """
    if not 0 < sigma < math.inf:
        msg = f"sigma must be positive and finite, got {sigma}"
        raise ValueError(msg)
    radius = compute_kernel_size(sigma) // 2
    if image_size is not None and radius >= min(image_size):
        msg = (
            f"sigma={sigma} needs a smoothing kernel of radius {radius} px, but the anomaly map is only "
            f"{image_size[0]}x{image_size[1]} px (reflected borders need a radius below both sides): choose "
            f"sigma below {(min(image_size) - 0.5) / 4:.2f} or a larger image_size"
        )
        raise ValueError(msg)


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
        refuse_bad_sigma(sigma)
        kernel_size = compute_kernel_size(sigma)
        # anomalib's 2-D kernel (kept as the source of truth and in the saved state) is an outer product of
        # two normalised 1-D Gaussians, so its row sums are the vertical 1-D kernel.
        self.blur = GaussianBlur2d(sigma=(sigma, sigma), channels=1, kernel_size=(kernel_size, kernel_size))

    def _axis_operator(self, source: int, target: int, kernel: torch.Tensor) -> torch.Tensor:
        """(target, source) matrix: linear upsampling from ``source`` to ``target`` samples, then the 1-D blur."""
        identity = torch.eye(source, dtype=kernel.dtype, device=kernel.device).unsqueeze(1)
        upsampled = F.interpolate(identity, size=target, mode="linear", align_corners=False)
        padding = kernel.shape[-1] // 2
        blurred = F.conv1d(F.pad(upsampled, (padding, padding), mode="reflect"), kernel.view(1, 1, -1))
        return blurred.squeeze(1).transpose(0, 1)

    def forward(self, distances: torch.Tensor, image_size: tuple[int, int] | torch.Size) -> torch.Tensor:
        """Map (B, 1, h, w) patch distances to a smoothed (B, 1, H, W) anomaly map."""
        kernel = self.blur.kernel[0, 0]
        rows = self._axis_operator(distances.shape[-2], int(image_size[0]), kernel.sum(dim=1))
        columns = self._axis_operator(distances.shape[-1], int(image_size[1]), kernel.sum(dim=0))
        return rows @ distances @ columns.transpose(0, 1)
