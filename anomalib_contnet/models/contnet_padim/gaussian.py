"""Per-position multivariate Gaussians fitted from a stream of feature batches.

anomalib's Padim keeps every training embedding until the end of the epoch and
then loops over patch positions in Python. Here each batch is reduced at once to
its sufficient statistics (count, mean, scatter matrix) and merged into float64
accumulators with Chan et al.'s pairwise update, so memory does not grow with the
number of training images, and any split into batches (or processes) gives the
same Gaussian up to rounding.

After fitting, only what inference needs is kept: the mean and an upper-triangular
factor ``F`` of the precision matrix (``inv(Σ) = F Fᵀ``, from a batched Cholesky
decomposition). The squared Mahalanobis distance is then ``‖(x - μ) F‖²``: a
sum of squares, never negative, with one batched matrix product per batch.
"""

from __future__ import annotations

import warnings

import torch
from anomalib.models.components import DynamicBufferMixin
from torch import distributed, nn

__all__ = ["StreamingGaussian"]


def _positions_first(embedding: torch.Tensor) -> torch.Tensor:
    """(B, D, H, W) -> (H*W, B, D): one row of samples per patch position."""
    batch, channels = embedding.shape[:2]
    return embedding.reshape(batch, channels, -1).permute(2, 0, 1)


class StreamingGaussian(DynamicBufferMixin, nn.Module):
    """Gaussian per patch position, ``N(μ, Σ + εI)`` with the unbiased covariance (Eq. 2 of the paper).

    Args:
        epsilon: regulariser added to the covariance diagonal. With more feature
            dimensions than training images the covariance is singular and this
            value decides much of the result; 0.01 is PaDiM's choice.
    """

    def __init__(self, epsilon: float = 0.01) -> None:
        super().__init__()
        if not epsilon > 0:
            msg = f"epsilon must be positive (it makes the covariance invertible), got {epsilon}"
            raise ValueError(msg)
        self.epsilon = float(epsilon)
        self.register_buffer("mean", torch.empty(0))
        self.register_buffer("precision_factor", torch.empty(0))
        self.mean: torch.Tensor
        self.precision_factor: torch.Tensor
        self.reset_statistics()

    # ----------------------------------------------------------------- fitting
    def reset_statistics(self) -> None:
        """Forget accumulated training statistics (the fitted parameters stay)."""
        self.count = 0
        self._running_mean: torch.Tensor | None = None
        self._running_scatter: torch.Tensor | None = None

    @torch.no_grad()
    def update(self, embedding: torch.Tensor) -> None:
        """Merge a batch of embeddings (B, D, H, W) into the running statistics."""
        if embedding.shape[0] == 0:
            return
        samples = _positions_first(embedding).double()
        batch_count = samples.shape[1]
        batch_mean = samples.mean(dim=1)
        centered = samples - batch_mean.unsqueeze(1)
        batch_scatter = torch.bmm(centered.transpose(1, 2), centered)
        self._merge(batch_count, batch_mean, batch_scatter)

    def _merge(self, other_count: int, other_mean: torch.Tensor, other_scatter: torch.Tensor) -> None:
        """Chan's pairwise update of (count, mean, scatter)."""
        if self._running_mean is None or self._running_scatter is None or self.count == 0:
            self.count, self._running_mean, self._running_scatter = other_count, other_mean, other_scatter
            return
        if other_mean.shape != self._running_mean.shape:
            msg = (
                f"feature shape changed during fitting: {tuple(other_mean.shape)} vs {tuple(self._running_mean.shape)} "
                "(positions, dims); every training image must have the same size after pre-processing"
            )
            raise ValueError(msg)
        total = self.count + other_count
        delta = other_mean - self._running_mean
        self._running_mean = self._running_mean + delta * (other_count / total)
        weight = self.count * other_count / total
        self._running_scatter = self._running_scatter + other_scatter + weight * delta.unsqueeze(2) * delta.unsqueeze(1)
        self.count = total

    def _merge_across_processes(self) -> None:
        """Combine the statistics of all distributed processes (DDP) with two all-reduces.

        Every process ends with the statistics of the union of all their samples,
        exactly as if one process had seen them all.
        """
        if not (distributed.is_available() and distributed.is_initialized()) or distributed.get_world_size() == 1:
            return
        if self._running_mean is None or self._running_scatter is None:
            msg = "this process saw no training images; cannot merge Gaussian statistics across processes"
            raise RuntimeError(msg)
        count = torch.tensor([float(self.count)], dtype=torch.float64, device=self._running_mean.device)
        weighted_sum = self._running_mean * count
        distributed.all_reduce(count)
        distributed.all_reduce(weighted_sum)
        global_mean = weighted_sum / count
        delta = self._running_mean - global_mean
        scatter = self._running_scatter + self.count * delta.unsqueeze(2) * delta.unsqueeze(1)
        distributed.all_reduce(scatter)
        self.count, self._running_mean, self._running_scatter = int(count.item()), global_mean, scatter

    @torch.no_grad()
    def fit(self) -> None:
        """Turn the accumulated statistics into the mean and precision factor, then free the accumulators."""
        self._merge_across_processes()
        if self._running_mean is None or self._running_scatter is None or self.count < 2:
            msg = (
                f"fitting the Gaussian needs at least 2 training images, got {self.count}: the covariance of "
                "a single image is undefined. Add normal images to the training folder."
            )
            raise ValueError(msg)
        dims = self._running_mean.shape[-1]
        if self.count - 1 < dims:
            warnings.warn(
                f"{self.count} training images for {dims} feature dimensions: the sample covariance is singular "
                f"and only the regulariser epsilon={self.epsilon} makes it invertible, so epsilon strongly "
                "influences the scores. More training images, or n_features < number of images, reduce this.",
                UserWarning,
                stacklevel=2,
            )
        identity = torch.eye(dims, dtype=torch.float64, device=self._running_mean.device)
        covariance = self._running_scatter / (self.count - 1) + self.epsilon * identity
        cholesky, info = torch.linalg.cholesky_ex(covariance)
        if bool((info != 0).any()):
            msg = (
                "covariance is not positive definite at some patch positions (non-finite features?); "
                "check the training images and backbone weights"
            )
            raise ValueError(msg)
        # inv(Σ) = inv(L)ᵀ inv(L), so F = inv(L)ᵀ is an upper-triangular factor with inv(Σ) = F Fᵀ.
        inverse_cholesky = torch.linalg.solve_triangular(cholesky, identity.expand_as(cholesky), upper=False)
        self.mean = self._running_mean.float()
        self.precision_factor = inverse_cholesky.transpose(1, 2).float().contiguous()
        self.reset_statistics()

    # --------------------------------------------------------------- inference
    @property
    def is_fitted(self) -> bool:
        """Whether fitted parameters are present (decided by shapes only, so it is export-safe)."""
        return self.mean.numel() > 0

    def covariance(self) -> torch.Tensor:
        """The fitted covariance ``Σ + εI`` per position (P, D, D), in float64; for inspection and tests."""
        factor = self.precision_factor.double()
        return torch.linalg.inv(factor @ factor.transpose(1, 2))

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        """Mahalanobis distance (Eq. 3) of every patch of ``embedding`` (B, D, H, W) -> (B, 1, H, W)."""
        batch, _, height, width = embedding.shape
        delta = _positions_first(embedding) - self.mean.unsqueeze(1)
        whitened = torch.bmm(delta, self.precision_factor)
        squared = whitened.square().sum(dim=-1)
        return squared.sqrt().transpose(0, 1).reshape(batch, 1, height, width)
