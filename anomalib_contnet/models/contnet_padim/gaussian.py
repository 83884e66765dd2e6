"""Per-position multivariate Gaussians fitted from a stream of feature batches.

anomalib's Padim keeps every training embedding until the end of the epoch and
then loops over patch positions in Python. Here training samples are reduced to
float64 sums about a fixed reference point (the first batch's mean) as they
arrive, so memory does not grow with the number of training images and any split
into batches (or processes) gives the same Gaussian up to rounding. Samples are
gathered into a small buffer and added to the scatter matrices with one in-place
matrix product per :data:`SAMPLES_PER_UPDATE` samples, whatever the batch size:
the (positions, D, D) accumulator is read and written rarely, and no temporary of
its size is ever made.

After fitting, only what inference needs is kept: the mean and an upper-triangular
factor ``F`` of the precision matrix (``inv(Σ) = F Fᵀ``, from a Cholesky
decomposition per position). The squared Mahalanobis distance is then
``‖(x - μ) F‖²``: a sum of squares, never negative.

``F`` is stored packed (see :func:`unpack_factor`): column block ``j`` of ``F`` has
non-zeros only in the rows above its last column, so only those rows are kept,
one slab per block. That keeps 54 % of the full matrices at 1536 dimensions, in
storage and in the bytes read per prediction (the Mahalanobis step reads the whole
factor for every batch and is memory-bound), and each slab is used as it is by one
batched matrix product, in the exported graph too: nothing is unpacked, so no
second copy of the factor appears anywhere. ``factor_dtype="float16"`` halves the
stored bytes again; the factor is widened to float32 before use (see
:meth:`StreamingGaussian._compute_factor`), so arithmetic stays float32.
"""

from __future__ import annotations

import sys
import warnings
import weakref
from typing import Any

import torch
from anomalib.models.components import DynamicBufferMixin
from torch import distributed, nn

__all__ = [
    "FACTOR_BLOCK_WIDTH",
    "StreamingGaussian",
    "packed_factor_size",
    "unpack_factor",
]

FACTOR_BLOCK_WIDTH = 128
"""Columns per slab of the packed factor. Part of the saved format: changing it changes what checkpoints mean.

Slabs keep ``(k + 1) / 2k`` of the full matrix for ``k`` blocks (54 % at 1536
dimensions). Narrower blocks save a little more storage but multiply the small
matrix products: at batch 1 (49 positions, 1536 dimensions), 64 columns ran 15-20 % slower
than 128 on one thread of the development machine, 256 no faster than 128.
"""

SOLVE_WIDTH = 2 * FACTOR_BLOCK_WIDTH
"""Columns of the triangular inverse solved at once while fitting (a multiple of the block width)."""

SAMPLES_PER_UPDATE = 64
"""Centred samples gathered before they are added to the scatter matrices in one matrix product."""

FACTOR_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float16": torch.float16}
"""Storage types accepted for the precision factor."""


def _positions_first(embedding: torch.Tensor) -> torch.Tensor:
    """(B, D, H, W) -> (H*W, B, D): one row of samples per patch position (a view, no copy)."""
    batch, channels = embedding.shape[:2]
    return embedding.reshape(batch, channels, -1).permute(2, 0, 1)


def _column_blocks(dims: int) -> list[tuple[int, int]]:
    """(first, end) column of every block of the packed factor."""
    return [(first, min(first + FACTOR_BLOCK_WIDTH, dims)) for first in range(0, dims, FACTOR_BLOCK_WIDTH)]


def packed_factor_size(positions: int, dims: int) -> int:
    """Number of values the packed upper-triangular factor of ``positions`` (dims x dims) matrices holds."""
    return positions * sum(end * (end - first) for first, end in _column_blocks(dims))


def _slabs(packed: torch.Tensor, positions: int, dims: int) -> list[tuple[int, torch.Tensor]]:
    """(rows, slab view of shape (positions, rows, block width)) for every column block of a packed factor."""
    slabs = []
    offset = 0
    for first, end in _column_blocks(dims):
        size = positions * end * (end - first)
        slabs.append((end, packed[offset : offset + size].view(positions, end, end - first)))
        offset += size
    return slabs


def unpack_factor(packed: torch.Tensor, positions: int, dims: int) -> torch.Tensor:
    """Rebuild the full (P, D, D) upper-triangular matrices from the packed layout (for inspection and tests)."""
    factor = packed.new_zeros(positions, dims, dims)
    for (first, end), (_, slab) in zip(_column_blocks(dims), _slabs(packed, positions, dims), strict=True):
        factor[:, :end, first:end] = slab
    return factor.triu()


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


class StreamingGaussian(DynamicBufferMixin, nn.Module):
    """Gaussian per patch position, ``N(μ, Σ + εI)`` with the unbiased covariance (Eq. 2 of the paper).

    Args:
        epsilon: regulariser added to the covariance diagonal. With more feature
            dimensions than training images the covariance is singular and this
            value decides much of the result; 0.01 is PaDiM's choice.
        factor_dtype: storage type of the precision factor, ``"float32"`` or
            ``"float16"`` (half the size; distances then differ from float32 storage
            by rounding of the factor, about 1e-4 relative). Arithmetic is float32 either way.
    """

    def __init__(self, epsilon: float = 0.01, factor_dtype: str = "float32") -> None:
        super().__init__()
        if not epsilon > 0:
            msg = f"epsilon must be positive (it makes the covariance invertible), got {epsilon}"
            raise ValueError(msg)
        if factor_dtype not in FACTOR_DTYPES:
            msg = f"factor_dtype must be one of {sorted(FACTOR_DTYPES)}, got {factor_dtype!r}"
            raise ValueError(msg)
        self.epsilon = float(epsilon)
        self.factor_dtype = factor_dtype
        self.register_buffer("mean", torch.empty(0))
        self.register_buffer("precision_factor", torch.empty(0, dtype=FACTOR_DTYPES[factor_dtype]))
        self.mean: torch.Tensor
        self.precision_factor: torch.Tensor
        self._widened_factor: torch.Tensor | None = None
        self._widened_from: tuple[weakref.ref, int] | None = None
        self.reset_statistics()

    # ----------------------------------------------------------------- fitting
    def reset_statistics(self) -> None:
        """Forget accumulated training statistics (the fitted parameters stay)."""
        self.count = 0
        self._reference: torch.Tensor | None = None  # (P, D) float64, the point samples are centred on
        self._centred_sum: torch.Tensor | None = None  # (P, D) float64, Σ (x - reference)
        self._scatter: torch.Tensor | None = None  # (P, D, D) float64, Σ (x - reference)(x - reference)ᵀ
        self._pending: torch.Tensor | None = None  # (P, SAMPLES_PER_UPDATE, D) float64 centred samples
        self._pending_count = 0

    @torch.no_grad()
    def update(self, embedding: torch.Tensor) -> None:
        """Add a batch of embeddings (B, D, H, W) to the running statistics."""
        if embedding.shape[0] == 0:
            return
        samples = _positions_first(embedding)
        if self._reference is None:
            self._start_accumulators(samples)
        elif samples.shape[0] != self._reference.shape[0] or samples.shape[2] != self._reference.shape[1]:
            msg = (
                f"feature shape changed during fitting: {(samples.shape[0], samples.shape[2])} vs "
                f"{tuple(self._reference.shape)} (positions, dims); every training image must have the same size "
                "after pre-processing"
            )
            raise ValueError(msg)
        pending, reference = self._pending, self._reference
        taken = 0
        while taken < samples.shape[1]:
            room = min(SAMPLES_PER_UPDATE - self._pending_count, samples.shape[1] - taken)
            window = pending[:, self._pending_count : self._pending_count + room]
            window.copy_(samples[:, taken : taken + room])
            window.sub_(reference.unsqueeze(1))
            self._pending_count += room
            taken += room
            if self._pending_count == SAMPLES_PER_UPDATE:
                self._add_pending()
        self.count += samples.shape[1]

    def _start_accumulators(self, samples: torch.Tensor) -> None:
        """Allocate the accumulators; the first batch's mean becomes the reference point.

        Centring on a point near the mean keeps the float64 sums free of the
        cancellation that plain sums of squares suffer when features have a large offset.
        """
        positions, _, dims = samples.shape
        options = {"dtype": torch.float64, "device": samples.device}
        self._reference = samples.mean(dim=1, dtype=torch.float64)
        self._centred_sum = torch.zeros(positions, dims, **options)
        self._scatter = torch.zeros(positions, dims, dims, **options)
        self._pending = torch.empty(positions, SAMPLES_PER_UPDATE, dims, **options)

    def _add_pending(self) -> None:
        """Add the buffered centred samples to the sums, in place."""
        if self._pending is None or self._centred_sum is None or self._scatter is None or not self._pending_count:
            return
        block = self._pending[:, : self._pending_count]
        self._centred_sum += block.sum(dim=1)
        self._scatter.baddbmm_(block.transpose(1, 2), block)
        self._pending_count = 0

    def _mean_and_scatter(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Mean (P, D) and scatter about the mean (P, D, D) in float64, or None before any sample.

        The scatter is moved from the reference point to the mean in place
        (``S - n·d·dᵀ`` with ``d`` the mean offset), so no second (P, D, D) array is made.
        """
        self._add_pending()
        if self._reference is None or self._centred_sum is None or self._scatter is None:
            return None
        offset = self._centred_sum / self.count
        self._scatter.baddbmm_(offset.unsqueeze(2), offset.unsqueeze(1), alpha=-self.count)
        return self._reference + offset, self._scatter

    def _merge_across_processes(
        self, statistics: tuple[torch.Tensor, torch.Tensor] | None
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Combine the statistics of all distributed processes (DDP); every process gets those of all samples.

        The processes first agree on the total count and the statistics' shape. A
        process that saw no real sample (it got only DistributedSampler padding,
        e.g. 3 images on 4 processes) joins with zeros, so every process fits the
        Gaussians one process would fit on all the images. When all processes
        together saw fewer than 2 samples, every one of them returns None (and
        :meth:`_fit_from_statistics` raises the same error on each).
        """
        if not (distributed.is_available() and distributed.is_initialized()) or distributed.get_world_size() == 1:
            return statistics
        device = self.mean.device  # where the module lives: a device the process group can use
        local_count = self.count
        positions, dims = statistics[1].shape[:2] if statistics is not None else (0, 0)
        count = torch.tensor([float(local_count)], dtype=torch.float64, device=device)
        shape = torch.tensor([float(positions), float(dims)], dtype=torch.float64, device=device)
        distributed.all_reduce(count)
        distributed.all_reduce(shape, op=distributed.ReduceOp.MAX)
        self.count = int(count.item())
        if self.count < 2:
            return None
        positions, dims = int(shape[0].item()), int(shape[1].item())
        if statistics is None:
            options = {"dtype": torch.float64, "device": device}
            statistics = torch.zeros(positions, dims, **options), torch.zeros(positions, dims, dims, **options)
        mean, scatter = statistics
        weighted_sum = mean * local_count
        distributed.all_reduce(weighted_sum)
        global_mean = weighted_sum / self.count
        delta = mean - global_mean
        scatter.baddbmm_(delta.unsqueeze(2), delta.unsqueeze(1), alpha=local_count)
        distributed.all_reduce(scatter)
        return global_mean, scatter

    @torch.no_grad()
    def fit(self) -> None:
        """Turn the accumulated statistics into the mean and packed precision factor.

        The accumulators are consumed (overwritten in place to save memory) and
        freed, whether fitting succeeds or not; a new fit starts from no samples.
        """
        try:
            self._fit_from_statistics()
        finally:
            self.reset_statistics()

    def _fit_from_statistics(self) -> None:
        """The work of :meth:`fit`."""
        statistics = self._merge_across_processes(self._mean_and_scatter())
        if statistics is None or self.count < 2:
            msg = (
                f"fitting the Gaussian needs at least 2 training images, got {self.count}: the covariance of "
                "a single image is undefined. Add normal images to the training folder."
            )
            raise ValueError(msg)
        mean, scatter = statistics
        dims = mean.shape[-1]
        if self.count - 1 < dims:
            _warn_each_time(  # once per fit: Python's per-location deduplication would hide it in later fits
                f"{self.count} training images for {dims} feature dimensions: the sample covariance is singular "
                f"and only the regulariser epsilon={self.epsilon} makes it invertible, so epsilon strongly "
                "influences the scores. More training images, or n_features < number of images, reduce this.",
                stacklevel=4,  # the caller of fit() (past fit and its no_grad wrapper)
            )
        self.precision_factor = self._packed_precision_factor(scatter)
        self.mean = mean.float()

    def _packed_precision_factor(self, scatter: torch.Tensor) -> torch.Tensor:
        """Cholesky-factorise ``scatter / (n - 1) + εI = L Lᵀ`` position by position and pack ``F = inv(L)ᵀ``.

        ``inv(Σ) = inv(L)ᵀ inv(L) = F Fᵀ``. Columns ``first:end`` of the upper-triangular
        ``F`` are zero below row ``end``: their transpose solves only the leading
        ``end x end`` block of ``Y L = I[first:end]``. Solving :data:`SOLVE_WIDTH`
        columns at a time, the inverse costs about a third of one solve against the
        whole identity. (The right-hand solve also matters: LAPACK returns its result
        column-major, which makes ``Y`` transposed exactly the row-major slab, while
        copying a column-major ``F`` into slabs cost more than the factorisation.) One
        position at a time keeps the float64 temporaries at two (D, D) matrices; the
        scatter itself is overwritten by the covariance.
        """
        positions, dims, _ = scatter.shape
        identity = torch.eye(dims, dtype=scatter.dtype, device=scatter.device)
        packed = torch.empty(
            packed_factor_size(positions, dims), dtype=FACTOR_DTYPES[self.factor_dtype], device=scatter.device
        )
        slabs = list(zip(_column_blocks(dims), _slabs(packed, positions, dims), strict=True))
        for position in range(positions):
            covariance = scatter[position].div_(self.count - 1)
            covariance.diagonal().add_(self.epsilon)
            lower, info = torch.linalg.cholesky_ex(covariance)
            if info.item() != 0:
                raise ValueError(self._factorisation_failure(position, covariance, dims))
            for solve_first in range(0, dims, SOLVE_WIDTH):
                solve_end = min(solve_first + SOLVE_WIDTH, dims)
                columns = torch.linalg.solve_triangular(
                    lower[:solve_end, :solve_end], identity[solve_first:solve_end, :solve_end], upper=False, left=False
                ).T
                for (first, end), (rows, slab) in slabs:
                    if solve_first <= first < solve_end:
                        slab[position].copy_(columns[:rows, first - solve_first : end - solve_first])
        if not bool(torch.isfinite(packed).all()):
            msg = (
                f"the precision factor does not fit in {self.factor_dtype} (epsilon={self.epsilon} is too small for "
                "it); use factor_dtype='float32' or a larger epsilon"
            )
            raise ValueError(msg)
        return packed

    def _factorisation_failure(self, position: int, covariance: torch.Tensor, dims: int) -> str:
        """Why the regularised covariance at ``position`` could not be factorised, and what to do.

        In exact arithmetic ``Σ + εI`` is positive definite for any ``ε > 0``. It
        fails in float64 only when ``ε`` is negligible beside the feature variances
        while the sample covariance is singular or nearly so: fewer images than
        dimensions, features that are constant or copies of each other, or the same
        image several times. (NaN/Inf features are refused earlier, per batch.)
        """
        largest_variance = float(covariance.diagonal().max()) - self.epsilon
        return (
            f"the covariance at patch position {position} is not positive definite even with epsilon="
            f"{self.epsilon:g}, which is negligible beside the largest feature variance there "
            f"({largest_variance:.3g}). The sample covariance is singular: {self.count} training images for "
            f"{dims} feature dimensions (a covariance of n images has rank n - 1 at most), or features that are "
            "constant or copies of each other (identical or blank training images, a backbone giving the same output "
            "everywhere). Fix: "
            f"raise epsilon to {max(largest_variance * 1e-6, self.epsilon * 10):.2g} or more (1e-6 of that variance), "
            "use more and varied normal training images, or keep fewer dimensions than images with n_features."
        )

    # ------------------------------------------------------------ saved state
    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        """Refuse a saved factor whose size does not fit the saved mean.

        Such a factor would otherwise load and then fail, or mislead, at prediction time.
        """
        factor, mean = state_dict.get(prefix + "precision_factor"), state_dict.get(prefix + "mean")
        if factor is not None and mean is not None and mean.dim() == 2:
            positions, dims = mean.shape
            if factor.shape != (packed_factor_size(positions, dims),):
                msg = (
                    f"saved precision factor has shape {tuple(factor.shape)}, which does not fit a mean of shape "
                    f"{tuple(mean.shape)}; the checkpoint is damaged or from an incompatible version: refit the model"
                )
                raise ValueError(msg)
        super()._load_from_state_dict(state_dict, prefix, *args)

    # --------------------------------------------------------------- inference
    @property
    def is_fitted(self) -> bool:
        """Whether fitted parameters are present (decided by shapes only, so it is export-safe)."""
        return self.mean.numel() > 0

    def factor_matrices(self) -> torch.Tensor:
        """The precision factor as full (P, D, D) upper-triangular matrices in float64; for inspection and tests."""
        positions, dims = self.mean.shape
        return unpack_factor(self.precision_factor.double(), positions, dims)

    def covariance(self) -> torch.Tensor:
        """The fitted covariance ``Σ + εI`` per position (P, D, D), in float64; for inspection and tests."""
        factor = self.factor_matrices()
        return torch.linalg.inv(factor @ factor.transpose(1, 2))

    def _compute_factor(self) -> torch.Tensor:
        """The packed factor in the arithmetic type (float32).

        A float16 factor is widened once and the copy is kept for later eager
        calls (the Mahalanobis step is memory-bound, and widening on every call
        would read and write more bytes than the float32 product saves). Under
        ``torch.export`` the stored tensor is widened inside the graph (one cast
        of the whole tensor), so an ONNX file holds the float16 values and not the
        copy. (OpenVINO's ONNX front end folds that cast into a float32 constant;
        docs/performance.md has the sizes.)
        """
        stored = self.precision_factor
        if stored.dtype == self.mean.dtype or torch.compiler.is_compiling():
            return stored.to(self.mean.dtype)
        # The copy is valid for this very tensor (a weak reference: a refit, load or .to() makes a new one)
        # at this version (in-place writes, as load_state_dict does into the same storage, bump it).
        source, version = self._widened_from if self._widened_from is not None else (None, None)
        if self._widened_factor is None or source is None or source() is not stored or version != stored._version:
            self._widened_factor = None  # free the stale copy before making the new one
            self._widened_factor = stored.to(self.mean.dtype)
            self._widened_from = (weakref.ref(stored), stored._version)
        return self._widened_factor

    def __getstate__(self) -> dict[str, Any]:
        """Pickle (TorchInferencer, deepcopy) without the widened float32 copy of a float16 factor."""
        return {**super().__getstate__(), "_widened_factor": None, "_widened_from": None}

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        """Mahalanobis distance (Eq. 3) of every patch of ``embedding`` (B, D, H, W) -> (B, 1, H, W).

        ``(x - μ) F`` column block by column block: block ``j`` needs only the
        first ``rows`` entries of ``x - μ``, and its slab is used where it lies.
        """
        batch, _, height, width = embedding.shape
        positions, dims = self.mean.shape
        delta = (_positions_first(embedding).to(self.mean.dtype) - self.mean.unsqueeze(1)).contiguous()
        squared = torch.zeros_like(delta[..., 0])
        for rows, slab in _slabs(self._compute_factor(), positions, dims):
            whitened = torch.bmm(delta[..., :rows], slab)
            squared = squared + whitened.square().sum(dim=-1)
        return squared.sqrt().transpose(0, 1).reshape(batch, 1, height, width)
