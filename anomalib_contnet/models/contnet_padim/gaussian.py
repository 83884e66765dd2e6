"""Per-position multivariate Gaussians at their exact minimal size, fitted from a stream of feature batches.

The regularised covariance of ``N`` training samples in ``D`` dimensions is
``Σ = εI + U diag(λ) Uᵀ`` with ``U`` the ``K = min(N - 1, D)`` principal directions of
the samples (orthonormal columns) and ``λ`` their variances: the sample covariance has
rank ``N - 1`` at most. Storing ``U`` and ``λ`` takes ``D·K`` values per position
instead of a ``D x D`` matrix: for ConTNet-B (D = 1536) and the 60-391 training images
of an MVTec AD category, 4-25 % of a full matrix.

The squared Mahalanobis distance of a residual ``r = x - μ`` is a sum of squares,
never negative and free of cancellation:

    d² = ‖r - U (a ⊙ Uᵀr)‖² / ε   with   a = 1 - sqrt(ε / (λ + ε)),

because ``(I - U diag(a) Uᵀ) / sqrt(ε)`` is the symmetric square root of ``inv(Σ)``
(Woodbury; ``r`` outside the span of ``U`` is measured by ``ε`` alone). With a full
basis (``K = D``) the residual outside the span is zero and one product suffices:
``d² = Σ_k (u_kᵀr)² / (λ_k + ε)``. One training image gives ``K = 0``: ``Σ = εI``,
a Euclidean distance to that image scaled by ``1/sqrt(ε)``.

Fitting streams: every batch is reduced to its count, mean and centred samples, and
groups are merged with Chan's update (the scatter of a union is the scatters plus
``n₁n₂/n · δδᵀ`` for the difference ``δ`` of the means). While there are fewer
centred rows than dimensions the rows themselves are kept (float64), afterwards their
``D x D`` scatter matrix, so fit memory never exceeds either form and stays flat in
``N`` beyond the switch. The same merge adds new images to a fitted model
(``continue_from_fit``: its principal directions scaled by ``sqrt(λ(N - 1))`` are rows
with exactly its scatter) and combines the statistics of distributed processes.
"""

from __future__ import annotations

import sys
import warnings
from dataclasses import dataclass

import torch
from anomalib.models.components import DynamicBufferMixin
from torch import distributed, nn

__all__ = ["StreamingGaussian"]


def _positions_first(embedding: torch.Tensor) -> torch.Tensor:
    """(B, D, H, W) -> (H*W, B, D): one row of samples per patch position (a view, no copy)."""
    batch, channels = embedding.shape[:2]
    return embedding.reshape(batch, channels, -1).permute(2, 0, 1)


def _warn_each_time(message: str, stacklevel: int = 2) -> None:
    """Issue a UserWarning every time it is called, on the first distributed process only.

    ``warnings.warn`` shows a message once per code location and process under
    Python's default filters, so a second fit in the same process (a benchmark
    over categories, a notebook) would stay silent about its own problem. Passing
    no registry to ``warn_explicit`` keeps that deduplication out, while user
    filters (``-W error``, ``filterwarnings``) still apply.
    """
    if distributed.is_available() and distributed.is_initialized() and distributed.get_rank() != 0:
        return
    frame = sys._getframe(stacklevel)  # the caller's location, as warnings.warn would report it
    warnings.warn_explicit(
        message,
        UserWarning,
        filename=frame.f_code.co_filename,
        lineno=frame.f_lineno,
        module=frame.f_globals.get("__name__", "<unknown>"),
        registry=None,
        module_globals=frame.f_globals,
    )


@dataclass
class _Moments:
    """Count, mean and scatter about the mean of a group of samples, per position, in float64.

    The scatter is held as rows ``R`` (P, m, D) with ``Σ RᵀR`` equal to it while
    ``m <= D``, else as the matrix itself (P, D, D): whichever is smaller.
    """

    count: int
    mean: torch.Tensor
    rows: torch.Tensor | None = None
    matrix: torch.Tensor | None = None

    @classmethod
    def of_batch(cls, samples: torch.Tensor) -> _Moments:
        """The moments of (P, B, D) samples."""
        samples = samples.double()
        mean = samples.mean(dim=1)
        return cls(samples.shape[1], mean, rows=samples - mean.unsqueeze(1))

    def to(self, device: torch.device | str) -> _Moments:
        """The same moments on ``device``."""
        rows = None if self.rows is None else self.rows.to(device)
        matrix = None if self.matrix is None else self.matrix.to(device)
        return _Moments(self.count, self.mean.to(device), rows=rows, matrix=matrix)

    @property
    def dims(self) -> int:
        return self.mean.shape[-1]

    def scatter_matrix(self) -> torch.Tensor:
        """The (P, D, D) scatter; built from the rows when held as rows."""
        return self.matrix if self.matrix is not None else self.rows.transpose(1, 2) @ self.rows

    def merged(self, other: _Moments) -> _Moments:
        """The moments of the union of both groups (Chan et al.'s pairwise update), exact in exact arithmetic."""
        count = self.count + other.count
        delta = other.mean - self.mean
        mean = self.mean + delta * (other.count / count)
        shift = delta * (self.count * other.count / count) ** 0.5  # one row carrying the means' difference
        if self.matrix is None and other.matrix is None and self.rows.shape[1] + other.rows.shape[1] < self.dims:
            return _Moments(count, mean, rows=torch.cat([self.rows, other.rows, shift.unsqueeze(1)], dim=1))
        matrix = self.scatter_matrix()  # a new tensor from rows; the matrix itself is updated in place
        if other.matrix is None:  # a batch's rows go straight in: no second (P, D, D) tensor
            matrix.baddbmm_(other.rows.transpose(1, 2), other.rows)
        else:
            matrix += other.matrix
        matrix.baddbmm_(shift.unsqueeze(2), shift.unsqueeze(1))
        return _Moments(count, mean, matrix=matrix)

    def principal_directions(self, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``rank`` leading eigenvectors (P, D, rank) and eigenvalues (P, rank) of the scatter.

        From rows ``R`` the eigenvectors come from the small (m x m) Gram matrix:
        ``R Rᵀ = V Λ Vᵀ`` gives ``U = Rᵀ V Λ^-½``. Directions with a vanishing eigenvalue
        get a zero vector (and eigenvalue 0), which the distance then ignores. From the
        matrix the eigenvectors come in float32, the precision they are stored in.
        """
        if self.matrix is not None:  # one position at a time: a batched eigh holds two more (P, D, D) copies
            values = self.mean.new_empty(self.mean.shape[0], rank)
            vectors = self.matrix.new_empty(*self.matrix.shape[:2], rank, dtype=torch.float32)
            for position, scatter in enumerate(self.matrix):
                ascending_values, ascending_vectors = torch.linalg.eigh(scatter)
                values[position] = ascending_values.flip(-1)[:rank]
                vectors[position] = ascending_vectors.flip(-1)[:, :rank]
            return vectors, values.clamp_min(0)
        values, vectors = torch.linalg.eigh(self.rows @ self.rows.transpose(1, 2))
        values, vectors = values.flip(-1)[..., :rank], vectors.flip(-1)[..., :rank]
        negligible = values <= values[..., :1] * values.shape[-1] * torch.finfo(values.dtype).eps
        directions = self.rows.transpose(1, 2) @ vectors  # scaled in place: it is the largest tensor of the fit
        directions.mul_(values.masked_fill(negligible, 1).rsqrt().unsqueeze(1))
        return directions.masked_fill_(negligible.unsqueeze(1), 0), values.masked_fill(negligible, 0)


class StreamingGaussian(DynamicBufferMixin, nn.Module):
    """Gaussian per patch position, ``N(μ, Σ + εI)`` with the unbiased covariance (Eq. 2 of the paper).

    Saved state: ``mean`` (P, D), ``basis`` (P, D, K) and ``variances`` (P, K) with
    ``K = min(N - 1, D)``, and ``count`` (N, needed to continue a fit exactly).

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
        self.register_buffer("basis", torch.empty(0))
        self.register_buffer("variances", torch.empty(0))
        self.register_buffer("count", torch.tensor(0))
        self.mean: torch.Tensor
        self.basis: torch.Tensor
        self.variances: torch.Tensor
        self.count: torch.Tensor
        self._moments: _Moments | None = None

    # ----------------------------------------------------------------- fitting
    @property
    def samples_seen(self) -> int:
        """Samples accumulated since the last :meth:`reset_statistics`, the continued fit's included."""
        return 0 if self._moments is None else self._moments.count

    def reset_statistics(self, continue_from_fit: bool = False) -> None:
        """Start accumulating anew: from no samples, or (``continue_from_fit``) from the fitted Gaussians.

        Continuing turns the fitted state back into exact moments (rows
        ``sqrt(λ(N - 1)) u`` have the fitted scatter), so a later :meth:`fit` gives the
        Gaussians of one fit on the earlier and the new images together.
        """
        self._moments = None
        if continue_from_fit and self.is_fitted:
            rows = (self.basis.double() * (self.variances.double() * (int(self.count) - 1)).sqrt().unsqueeze(1)).mT
            moments = _Moments(int(self.count), self.mean.double(), rows=rows.contiguous())
            if rows.shape[1] >= self.mean.shape[-1]:
                moments = _Moments(moments.count, moments.mean, matrix=moments.scatter_matrix())
            self._moments = moments

    @torch.no_grad()
    def update(self, embedding: torch.Tensor) -> None:
        """Add a batch of embeddings (B, D, H, W) to the running statistics."""
        if embedding.shape[0] == 0:
            return
        batch = _Moments.of_batch(_positions_first(embedding))
        if self._moments is not None and self._moments.mean.shape != batch.mean.shape:
            msg = (
                f"feature shape changed during fitting: {tuple(batch.mean.shape)} vs {tuple(self._moments.mean.shape)} "
                "(positions, dims); every training image must have the same size after pre-processing, and a "
                "continued fit the image size and features of the first"
            )
            raise ValueError(msg)
        self._moments = batch if self._moments is None else self._moments.merged(batch)

    def _merge_across_processes(self) -> _Moments | None:
        """The moments of all distributed processes (DDP) together, on every process; None without samples.

        Every process gathers every other one's moments (``all_gather_object``, through
        the CPU) and merges them in rank order, so all end with the same Gaussians, those
        of one process fitted on all images. A process that saw no real sample (only
        DistributedSampler padding, e.g. 3 images on 4 processes) contributes nothing.
        """
        if not (distributed.is_available() and distributed.is_initialized()) or distributed.get_world_size() == 1:
            return self._moments
        gathered: list[_Moments | None] = [None] * distributed.get_world_size()
        distributed.all_gather_object(gathered, None if self._moments is None else self._moments.to("cpu"))
        merged = None
        for group in filter(None, gathered):
            merged = group if merged is None else merged.merged(group)
        return None if merged is None else merged.to(self.mean.device)

    @torch.no_grad()
    def fit(self) -> None:
        """Turn the accumulated statistics into the mean, principal directions and variances.

        The accumulators are freed whether fitting succeeds or not; a new fit starts
        from no samples unless :meth:`reset_statistics` is asked to continue.
        """
        try:
            moments = self._merge_across_processes()
        finally:
            self._moments = None
        if moments is None:
            msg = "fitting needs at least 1 training image, got none: add normal images to the training data"
            raise ValueError(msg)
        count, dims = moments.count, moments.dims
        rank = min(count - 1, dims)
        if rank < dims:
            _warn_each_time(self._few_images_message(count, dims), stacklevel=4)  # the caller of fit()
        directions, eigenvalues = moments.principal_directions(rank)
        self.mean = moments.mean.float()
        self.basis = directions.float()
        self.variances = (eigenvalues / max(count - 1, 1)).float()
        self.count = torch.tensor(count, device=self.mean.device)

    def _few_images_message(self, count: int, dims: int) -> str:
        """What the scores mean when there are fewer training images than feature dimensions."""
        if count == 1:
            return (
                f"1 training image: the covariance is epsilon*I (epsilon={self.epsilon}), so the scores are Euclidean "
                "distances to that image's features divided by sqrt(epsilon); they rank images, but normal variation "
                "is not modelled. Add normal images for a Gaussian model."
            )
        return (
            f"{count} training images for {dims} feature dimensions: the Gaussians span only {count - 1} directions, "
            f"and distances in the other {dims - count + 1} are Euclidean divided by sqrt(epsilon={self.epsilon}), "
            "so epsilon strongly influences the scores. More training images, or n_features below the number of "
            "images, reduce this."
        )

    # --------------------------------------------------------------- inference
    @property
    def is_fitted(self) -> bool:
        """Whether fitted parameters are present (decided by shapes only, so it is export-safe)."""
        return self.mean.numel() > 0

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        """Mahalanobis distance (Eq. 3) of every patch of ``embedding`` (B, D, H, W) -> (B, 1, H, W)."""
        batch, dims, height, width = embedding.shape
        residual = _positions_first(embedding) - self.mean.unsqueeze(1)  # (P, B, D)
        projected = torch.bmm(residual, self.basis)  # (P, B, K)
        if self.basis.shape[-1] == dims:  # full basis: nothing lies outside its span
            squared = (projected.square() / (self.variances + self.epsilon).unsqueeze(1)).sum(dim=-1)
        else:
            shrink = 1 - (self.epsilon / (self.variances + self.epsilon)).sqrt()
            scaled = projected * shrink.unsqueeze(1)
            if torch.compiler.is_compiling():  # export: transposing activations keeps one copy of the basis
                back = torch.bmm(self.basis, scaled.mT).mT
            else:  # eager: torch's CPU bmm runs 3.5x faster (batch 1) with the basis as the right operand
                back = torch.bmm(scaled, self.basis.mT)
            whitened = residual - back
            squared = whitened.square().sum(dim=-1) / self.epsilon
        return squared.sqrt().transpose(0, 1).reshape(batch, 1, height, width)
