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

Fitting streams. While there are at most ``D`` samples they are kept as they came
(float32) in preallocated buffers, and centred on the final mean when fitting; beyond,
their ``D x D`` float64 scatter matrix, updated in place with Chan's rule (the scatter
of a union is the scatters plus ``n₁n₂/n · δδᵀ`` for the difference ``δ`` of the means).
Fit memory thus never exceeds either form and stays flat in ``N`` beyond the switch. The
same merge adds new images to a fitted model (``continue_from_fit``: exact pseudo-samples
with its mean and scatter) and combines the statistics of distributed processes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from anomalib.models.components import DynamicBufferMixin
from torch import distributed, nn
from torch.nn import functional as F  # noqa: N812

from anomalib_contnet.models.contnet_padim.neighbourhood import inside, offsets, refuse_bad_cells, shifted

__all__ = ["StreamingGaussian"]


def _positions_first(embedding: torch.Tensor) -> torch.Tensor:
    """(B, D, H, W) -> (H*W, B, D): one row of samples per patch position (a view, no copy)."""
    batch, channels = embedding.shape[:2]
    return embedding.reshape(batch, channels, -1).permute(2, 0, 1)


@dataclass
class _Moments:
    """Count, mean (float64) and scatter about the mean of a group of samples, per position.

    While there are at most ``D`` samples the samples themselves are kept, in their own
    precision (float32 embeddings as they came, half the bytes of float64 rows) and
    centred only when the scatter is needed, on the final mean (exact two-pass); beyond,
    the (P, D, D) float64 scatter matrix, updated in place by Chan et al.'s pairwise rule.
    Kept samples are copied into preallocated (P, rows, D) buffers of 64 MiB (or of all
    ``D`` rows, if less): nothing is concatenated or regrown while streaming (growing one
    tensor by ``torch.cat`` held two copies of all samples at every batch), and glibc maps
    blocks that large by mmap, so freeing them returns the memory to the system at once.
    """

    mean: torch.Tensor
    count: int = 0
    chunks: list[torch.Tensor] = field(default_factory=list)
    filled: list[int] = field(default_factory=list)
    matrix: torch.Tensor | None = None

    CHUNK_BYTES = 64 << 20  # above glibc's largest dynamic mmap threshold (32 MiB)

    @classmethod
    def of_rows(cls, count: int, mean: torch.Tensor, rows: torch.Tensor) -> _Moments:
        """The moments of ``count`` samples with mean (P, D) and scatter ``Σ RᵀR`` of rows ``R`` (P, m, D).

        With ``count <= D`` (then ``m = count - 1``) as samples: ``mean + H R`` with ``H``
        the (count, count - 1) Helmert contrasts, orthonormal columns that sum to zero,
        are ``count`` samples with exactly that mean and scatter. Else as the matrix.
        """
        if count > mean.shape[-1]:
            return cls(mean, count, matrix=rows.mT @ rows)
        steps = torch.arange(1, count, dtype=rows.dtype, device=rows.device)
        helmert = torch.ones(count, count - 1, dtype=rows.dtype, device=rows.device).triu()
        helmert[steps.long(), steps.long() - 1] = -steps
        samples = mean.unsqueeze(1) + (helmert / (steps * (steps + 1)).sqrt()) @ rows
        return cls(mean, count, [samples], [count])

    @property
    def dims(self) -> int:
        return self.mean.shape[-1]

    def blocks(self) -> list[torch.Tensor]:
        """The kept samples: (P, m, D) views of the filled part of every buffer."""
        return [chunk[:, :filled] for chunk, filled in zip(self.chunks, self.filled, strict=True)]

    def to(self, device: torch.device | str) -> _Moments:
        """The same moments on ``device``, without the unfilled rows of the last buffer (what gets pickled for DDP)."""
        blocks = [block.to(device).contiguous() for block in self.blocks()]
        matrix = None if self.matrix is None else self.matrix.to(device)
        return _Moments(self.mean.to(device), self.count, blocks, [block.shape[1] for block in blocks], matrix)

    def add(self, samples: torch.Tensor) -> None:
        """Add (P, b, D) samples in place: kept while there are at most ``D`` in all, else into the matrix."""
        size = samples.shape[1]
        if self.matrix is None and self.count + size <= self.dims:
            mean = samples.mean(dim=1, dtype=torch.float64)
            self._keep(samples)
        else:  # the batch's scatter from one float64 copy centred in place (float32 - float64: a cast, then a result)
            centred = samples.to(torch.float64, copy=True)
            mean = centred.mean(dim=1)
            centred -= mean.unsqueeze(1)
            self._matrix().baddbmm_(centred.mT, centred)
        self._merge_mean(size, mean)

    def merge(self, other: _Moments) -> None:
        """Add another group's moments in place (the statistics of another distributed process)."""
        if other.matrix is None:
            for block in other.blocks():
                self.add(block)
        else:
            self._matrix().add_(other.matrix)
            self._merge_mean(other.count, other.mean)

    def _keep(self, samples: torch.Tensor) -> None:
        """Copy samples into the free rows of the last buffer, starting new buffers as needed."""
        dtype = torch.promote_types(samples.dtype, torch.float32)
        positions, _, dims = samples.shape
        while samples.shape[1]:
            if not self.chunks or self.filled[-1] == self.chunks[-1].shape[1] or self.chunks[-1].dtype != dtype:
                rows = min(max(self.CHUNK_BYTES // (positions * dims * dtype.itemsize), 1), dims)
                self.chunks.append(samples.new_empty(positions, rows, dims, dtype=dtype))
                self.filled.append(0)
            start = self.filled[-1]
            taken = min(self.chunks[-1].shape[1] - start, samples.shape[1])
            self.chunks[-1][:, start : start + taken] = samples[:, :taken]
            self.filled[-1] += taken
            samples = samples[:, taken:]

    def _matrix(self) -> torch.Tensor:
        """The scatter matrix, formed from the kept samples (which are then freed) the first time."""
        if self.matrix is None:
            self.matrix, self.chunks, self.filled = self.scatter_matrix(), [], []
        return self.matrix

    def _merge_mean(self, count: int, mean: torch.Tensor) -> None:
        """Count and mean of the union with a group of ``count`` samples of mean ``mean``, whose scatter is in.

        Kept samples need nothing more (they are centred on the final mean); the matrix
        gets Chan's ``n₁n₂/n · δδᵀ`` for the difference ``δ`` of the means.
        """
        total = self.count + count
        delta = mean - self.mean
        if self.matrix is not None:
            shift = delta * (self.count * count / total) ** 0.5
            self.matrix.baddbmm_(shift.unsqueeze(2), shift.unsqueeze(1))
        self.mean += delta * (count / total)
        self.count = total

    def scatter_matrix(self) -> torch.Tensor:
        """The (P, D, D) scatter: the matrix, or a new one formed from the kept samples centred on the mean."""
        if self.matrix is not None:
            return self.matrix
        matrix = self.mean.new_zeros(*self.mean.shape, self.dims)
        for block in self.blocks():
            centred = block.to(torch.float64, copy=True).sub_(self.mean.unsqueeze(1))
            matrix.baddbmm_(centred.mT, centred)
        return matrix

    def transform_(self, matrix: torch.Tensor) -> None:
        """Replace every sample ``x`` by ``matrix @ x`` in place: the moments of the transformed samples.

        One position at a time, so that only one position's temporaries are added.
        """
        self.mean = self.mean @ matrix.mT
        for block in self.blocks():
            for position in range(block.shape[0]):
                block[position] = block[position] @ matrix.mT.to(block.dtype)
        if self.matrix is not None:
            for position in range(self.matrix.shape[0]):
                self.matrix[position] = matrix @ self.matrix[position] @ matrix.mT

    def principal_directions(self, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``rank`` leading eigenvectors (P, D, rank, float32) and eigenvalues (P, rank) of the scatter.

        One position at a time, so that only the results and one position's temporaries
        are added to the statistics (a batched eigh holds copies of all positions). From
        samples the eigenvectors come from the small (n x n) Gram matrix of the centred
        samples ``R``: ``R Rᵀ = V Λ Vᵀ`` gives ``U = Rᵀ V Λ^-½``; directions with a
        vanishing eigenvalue get a zero vector (and eigenvalue 0), which the distance
        then ignores.
        """
        positions, dims = self.mean.shape
        values = self.mean.new_empty(positions, rank)
        vectors = self.mean.new_empty(positions, dims, rank, dtype=torch.float32)
        blocks = self.blocks()
        for position in range(positions):
            if self.matrix is not None:
                ascending_values, ascending_vectors = torch.linalg.eigh(self.matrix[position])
                values[position] = ascending_values.flip(-1)[:rank]
                vectors[position] = ascending_vectors.flip(-1)[:, :rank]
                continue
            rows = torch.cat([block[position] for block in blocks]).double().sub_(self.mean[position])
            ascending_values, ascending_vectors = torch.linalg.eigh(rows @ rows.mT)
            top_values, top_vectors = ascending_values.flip(-1)[:rank], ascending_vectors.flip(-1)[:, :rank]
            negligible = top_values <= top_values[:1] * rank * torch.finfo(top_values.dtype).eps
            directions = rows.mT @ (top_vectors * top_values.masked_fill(negligible, 1).rsqrt())
            values[position] = top_values.masked_fill(negligible, 0)
            vectors[position] = directions.masked_fill_(negligible, 0)
        return vectors, values.clamp_min(0)


class StreamingGaussian(DynamicBufferMixin, nn.Module):
    """Gaussian per patch position, ``N(μ, Σ + εI)`` with the unbiased covariance (Eq. 2 of the paper).

    Saved state: ``mean`` (P, D), ``basis`` (P, D, K) and ``variances`` (P, K) with
    ``K = min(N - 1, D)``, and ``count`` (N, needed to continue a fit exactly).

    The defaults are the paper's head. Three levers go beyond it (docs/benchmarks.md, "Gaussian head",
    measures each); with all of them off every number is the paper head's, bit for bit.

    Args:
        epsilon: regulariser added to the covariance diagonal. With more feature
            dimensions than training images the covariance is singular and this
            value decides much of the result; 0.01 is PaDiM's choice.
        neighbourhood: ``r``; each position's Gaussian is fitted on the training patches of the
            ``(2r + 1)²`` positions within ``r`` cells (repeating border cells), so it models small
            misalignments and has ``(2r + 1)²`` samples per image. ``count`` counts those samples.
        shift_tolerance: ``s``; a test patch's distance is the smallest under the Gaussians of the
            positions within ``s`` cells (``(2s + 1)²`` distance evaluations).
        shared_covariance: regularise toward the covariance ``C`` of all training patches of all positions
            (shrunk by ``SHARED_SHRINKAGE`` toward its mean variance) instead of the identity: each position's
            covariance is ``Σ + εC``. With few images per position, ``Σ`` has rank ``N - 1`` and the regulariser
            measures every other direction, so ``C`` (estimated from ``N·P`` patches) makes those distances
            Mahalanobis instead of Euclidean. Computed as the paper's head on features whitened by ``C^-½``
            (one ``D x D`` product per patch); saved as ``whitening``, with ``shared_mean`` and
            ``shared_covariance_matrix`` (unshrunk) to continue a fit exactly.
    """

    SHARED_BUFFERS = ("whitening", "shared_mean", "shared_covariance_matrix")
    SHARED_SHRINKAGE = 0.07
    """MHPatchcore's covariance shrinkage: keeps ``C`` invertible when there are fewer patches than dimensions."""

    def __init__(
        self, epsilon: float = 0.01, neighbourhood: int = 0, shift_tolerance: int = 0, shared_covariance: bool = False
    ) -> None:
        super().__init__()
        if not 0 < epsilon < math.inf:
            msg = f"epsilon must be positive and finite (it makes the covariance invertible), got {epsilon}"
            raise ValueError(msg)
        refuse_bad_cells("neighbourhood", neighbourhood)
        refuse_bad_cells("shift_tolerance", shift_tolerance)
        if not isinstance(shared_covariance, bool):
            msg = f"shared_covariance must be True or False, got {shared_covariance!r}"
            raise ValueError(msg)
        self.epsilon = float(epsilon)
        self.neighbourhood = neighbourhood
        self.shift_tolerance = shift_tolerance
        self.shared_covariance = shared_covariance
        self.register_buffer("mean", torch.empty(0))
        self.register_buffer("basis", torch.empty(0))
        self.register_buffer("variances", torch.empty(0))
        self.register_buffer("count", torch.tensor(0))
        if shared_covariance:  # only then: the paper head's state (and every earlier checkpoint) keeps its keys
            for name in self.SHARED_BUFFERS:
                self.register_buffer(name, torch.empty(0))
        self.mean: torch.Tensor
        self.basis: torch.Tensor
        self.variances: torch.Tensor
        self.count: torch.Tensor
        self.whitening: torch.Tensor
        self.shared_mean: torch.Tensor
        self.shared_covariance_matrix: torch.Tensor
        self._moments: _Moments | None = None
        self._shared: _Moments | None = None  # all positions' patches as one group, with shared_covariance

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
        self._moments = self._shared = None
        if continue_from_fit and self.is_fitted:
            count = int(self.count)
            rows = (self.basis.double() * (self.variances.double() * (count - 1)).sqrt().unsqueeze(1)).mT
            self._moments = _Moments.of_rows(count, self.mean.double(), rows)
            if self.shared_covariance:  # back from the whitened space, and the shared group's moments
                self._moments.transform_(torch.linalg.inv(self.whitening.double()))
                shared_count = count // self.samples_per_image * self.mean.shape[0]
                scatter = self.shared_covariance_matrix.double() * max(shared_count - 1, 1)
                self._shared = _Moments(self.shared_mean.double().unsqueeze(0), shared_count, matrix=scatter[None])

    @torch.no_grad()
    def update(self, embedding: torch.Tensor) -> None:
        """Add a batch of embeddings (B, D, H, W) to the running statistics."""
        if embedding.shape[0] == 0:
            return
        own_patches = embedding  # before the neighbourhood's copies: the shared group counts each patch once
        if self.neighbourhood:
            embedding = torch.cat([shifted(embedding, *move) for move in offsets(self.neighbourhood)])
        samples = _positions_first(embedding)
        shape = (samples.shape[0], samples.shape[2])
        if self._moments is None:
            self._moments = _Moments(samples.new_zeros(shape, dtype=torch.float64))
        elif self._moments.mean.shape != shape:
            msg = (
                f"feature shape changed during fitting: {shape} vs {tuple(self._moments.mean.shape)} "
                "(positions, dims); every training image must have the same size after pre-processing, and a "
                "continued fit the image size and features of the first"
            )
            raise ValueError(msg)
        self._moments.add(samples)
        if self.shared_covariance:
            patches = own_patches.permute(0, 2, 3, 1).reshape(1, -1, own_patches.shape[1])  # all positions, one group
            if self._shared is None:
                self._shared = _Moments(patches.new_zeros(1, patches.shape[2], dtype=torch.float64))
            self._shared.add(patches)

    def _merge_across_processes(self, moments: _Moments | None) -> _Moments | None:
        """The moments of all distributed processes (DDP) together, on every process; None without samples.

        Every process gathers every other one's moments (``all_gather_object``, through
        the CPU) and merges them in rank order, so all end with the same Gaussians, those
        of one process fitted on all images. A process that saw no real sample (only
        DistributedSampler padding, e.g. 3 images on 4 processes) contributes nothing.
        """
        if not (distributed.is_available() and distributed.is_initialized()) or distributed.get_world_size() == 1:
            return moments
        gathered: list[_Moments | None] = [None] * distributed.get_world_size()
        distributed.all_gather_object(gathered, None if moments is None else moments.to("cpu"))
        merged = None
        for group in filter(None, gathered):
            if merged is None:
                merged = group
            else:
                merged.merge(group)
        return None if merged is None else merged.to(self.mean.device)

    @torch.no_grad()
    def fit(self) -> None:
        """Turn the accumulated statistics into the mean, principal directions and variances.

        The accumulators are freed whether fitting succeeds or not; a new fit starts
        from no samples unless :meth:`reset_statistics` is asked to continue.
        """
        try:
            moments = self._merge_across_processes(self._moments)
            shared = self._merge_across_processes(self._shared) if self.shared_covariance else None
        finally:
            self._moments = self._shared = None
        if moments is None:
            msg = "fitting needs at least 1 training image, got none: add normal images to the training data"
            raise ValueError(msg)
        if shared is not None:
            self._fit_whitening(shared)
            moments.transform_(self.whitening.double())
        count, dims = moments.count, moments.dims
        rank = min(count - 1, dims)
        directions, eigenvalues = moments.principal_directions(rank)
        self.mean = moments.mean.float()
        self.basis = directions.float()
        self.variances = (eigenvalues / max(count - 1, 1)).float()
        self.count = torch.tensor(count, device=self.mean.device)

    def _fit_whitening(self, shared: _Moments) -> None:
        """``whitening = C^-½`` (symmetric) of the shrunk covariance ``C`` of all patches, and the raw moments."""
        covariance = shared.scatter_matrix()[0] / max(shared.count - 1, 1)
        mean_variance = covariance.diagonal().mean()
        if not mean_variance > 0:
            msg = "shared_covariance needs patches that vary, but every training patch is the same: add varied images"
            raise ValueError(msg)
        shrunk = (1 - self.SHARED_SHRINKAGE) * covariance
        shrunk.diagonal().add_(self.SHARED_SHRINKAGE * mean_variance)
        values, vectors = torch.linalg.eigh(shrunk)
        self.whitening = ((vectors * values.rsqrt()) @ vectors.mT).float()
        self.shared_mean = shared.mean[0].float()
        self.shared_covariance_matrix = covariance.float()

    def refuse_inconsistent_state(self, state: Mapping[str, torch.Tensor], prefix: str, dims: int) -> None:
        """Raise ValueError naming the saved tensors (keys ``prefix`` + name) that do not fit together.

        anomalib's buffers take whatever shape a state dict has, so an edited or assembled
        checkpoint would otherwise load and fail at the first batch, or score wrongly.
        ``dims`` is the embedding's number of channels.
        """
        mean, basis, variances, count = (state.get(prefix + name) for name in ("mean", "basis", "variances", "count"))
        if any(tensor is None for tensor in (mean, basis, variances, count)):
            return  # strict loading names the missing keys
        problems = []
        if count.ndim or count.is_floating_point() or count.is_complex():
            problems.append(f"{prefix}count must be one integer, got shape {tuple(count.shape)} {count.dtype}")
        elif mean.numel() == 0:  # saved before any fit: nothing else may be there
            if basis.numel() or variances.numel() or int(count):
                problems.append(f"{prefix}mean is empty (not fitted), but basis, variances or count are not")
        elif int(count) < 1:
            problems.append(f"{prefix}count is {int(count)}; a fitted Gaussian has seen at least 1 image")
        else:
            positions, rank = mean.shape[0], min(int(count) - 1, dims)
            expected = {"mean": (positions, dims), "basis": (positions, dims, rank), "variances": (positions, rank)}
            for name, tensor in (("mean", mean), ("basis", basis), ("variances", variances)):
                if tuple(tensor.shape) != expected[name]:
                    problems.append(
                        f"{prefix}{name} has shape {tuple(tensor.shape)}, but {positions} positions, {dims} channels "
                        f"and count {int(count)} make it {expected[name]}"
                    )
            if variances.is_floating_point() and bool((variances < 0).any()):
                problems.append(f"{prefix}variances holds {int((variances < 0).sum())} negative values")
            for name in self.SHARED_BUFFERS if self.shared_covariance else ():
                tensor, shape = state.get(prefix + name), (dims,) if name == "shared_mean" else (dims, dims)
                if tensor is not None and tuple(tensor.shape) != shape:
                    problems.append(f"{prefix}{name} has shape {tuple(tensor.shape)}, {dims} channels make it {shape}")
        if problems:
            msg = (
                "the checkpoint's Gaussians do not fit together (the file was edited or assembled from several): "
                + "; ".join(problems)
                + ". Use the checkpoint as it was saved, or refit."
            )
            raise ValueError(msg)

    # --------------------------------------------------------------- inference
    @property
    def is_fitted(self) -> bool:
        """Whether fitted parameters are present (decided by shapes only, so it is export-safe)."""
        return self.mean.numel() > 0

    @property
    def samples_per_image(self) -> int:
        """Samples one training image gives each position: ``(2r + 1)²`` with ``neighbourhood`` r."""
        return (2 * self.neighbourhood + 1) ** 2

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        """Mahalanobis distance (Eq. 3) of every patch of ``embedding`` (B, D, H, W) -> (B, 1, H, W).

        With ``shift_tolerance`` s, the smallest distance under the Gaussians within s cells: the
        embedding is moved by ``-o`` so that each Gaussian sees the patch ``o`` away, and the
        distances are moved back; moves whose Gaussian lies outside the grid are left out.
        """
        if self.shared_covariance:
            embedding = F.conv2d(embedding, self.whitening[:, :, None, None])
        distances = self._distances(embedding)
        height, width = embedding.shape[-2:]
        for rows, columns in offsets(self.shift_tolerance)[1:]:
            moved = shifted(self._distances(shifted(embedding, -rows, -columns)), rows, columns)
            usable = inside(height, width, rows, columns, embedding.device)
            distances = torch.minimum(distances, torch.where(usable, moved, distances))
        return distances

    def _distances(self, embedding: torch.Tensor) -> torch.Tensor:
        """Distance of every patch under its own position's Gaussian, (B, D, H, W) -> (B, 1, H, W)."""
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
            else:  # eager: the CPU bmm is faster with the basis as the right operand (docs/performance.md, section 11)
                back = torch.bmm(scaled, self.basis.mT)
            whitened = residual - back
            squared = whitened.square().sum(dim=-1) / self.epsilon
        return squared.sqrt().transpose(0, 1).reshape(batch, 1, height, width)
