"""PyTorch model of ConTNetPaDiM: frozen backbone -> patch embedding -> Gaussian -> anomaly map.

Tiling (anomalib's ``TilerConfigurationCallback``) works as in anomalib's Padim: the
pre-processed image is cut into tiles, every tile goes through the backbone, and the
tiles' embeddings are put back together (``Tiler.untile``) into one embedding on the
grid of the whole image, so there is one Gaussian per patch position of that grid.
With 224 px tiles of a 448 px input, ``layer3``/``layer4`` give 7x7 cells per tile and
a 14x14 grid of Gaussians, against 7x7 for the same image resized to 224 px.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F  # noqa: N812
from anomalib.data import InferenceBatch
from anomalib.data.utils.tiler import ImageUpscaleMode, Tiler
from anomalib.models.components import DynamicBufferMixin
from torch import nn

from anomalib_contnet.models.contnet_padim.anomaly_map import AnomalyMapGenerator
from anomalib_contnet.models.contnet_padim.feature_extractor import build_feature_extractor
from anomalib_contnet.models.contnet_padim.gaussian import StreamingGaussian
from anomalib_contnet.models.contnet_padim.neighbourhood import offsets, refuse_bad_cells, shifted

__all__ = ["ConTNetPaDiMModel", "NonFiniteError", "NotFittedError"]

NOT_FITTED_MESSAGE = (
    "ConTNetPaDiM has not been fitted: train it on normal images first (engine.fit / anomalib train) "
    "or load a trained checkpoint (--ckpt_path / ConTNetPaDiM.load_from_checkpoint)."
)


class NotFittedError(RuntimeError):
    """Raised when a model is asked for predictions before its Gaussians were fitted."""


class NonFiniteError(FloatingPointError):
    """Raised instead of fitting NaN/Inf features or returning NaN/Inf maps and scores."""


class ConTNetPaDiMModel(DynamicBufferMixin, nn.Module):
    """Patch features of chosen backbone stages, modelled by one Gaussian per patch position.

    Arguments as :class:`~anomalib_contnet.models.contnet_padim.lightning_model.ConTNetPaDiM`'s. Stages on
    a coarser grid are upsampled to the finest selected one by nearest neighbour (PaDiM's choice).

    Lightning's ``precision`` trainer setting (``"bf16-mixed"``, ``"16-mixed"``) runs the
    backbone under autocast; the Gaussians and the anomaly map stay float32 whatever it says.

    Attributes:
        tiler: an anomalib ``Tiler`` (set by ``TilerConfigurationCallback``) or ``None``.
            Fitting memory grows with the grid of the whole tiled image (per position, the
            centred float64 samples while fewer than ``D``, then one ``D x D`` scatter matrix):
            docs/performance.md has the tables.
    """

    def __init__(
        self,
        backbone: str = "contnet_b",
        layers: Sequence[str] = ("layer3", "layer4"),
        pre_trained: bool = True,
        weights: str | None = None,
        n_features: int | None = None,
        feature_seed: int = 0,
        epsilon: float = 0.01,
        sigma: float = 4.0,
        neighbourhood: int = 0,
        shift_tolerance: int = 0,
        shared_covariance: bool = False,
        patch_context: int = 0,
    ) -> None:
        super().__init__()
        refuse_bad_cells("patch_context", patch_context)
        self.patch_context = patch_context
        self._tiler: Tiler | None = None
        self.feature_extractor = build_feature_extractor(backbone, layers, pre_trained, weights)
        total_features = sum(self.feature_extractor.out_channels.values())
        self.register_buffer("feature_index", self._choose_features(total_features, n_features, feature_seed))
        self.feature_index: torch.Tensor
        self.gaussian = StreamingGaussian(epsilon, neighbourhood, shift_tolerance, shared_covariance)
        self.anomaly_map_generator = AnomalyMapGenerator(sigma)

    @staticmethod
    def _choose_features(total: int, n_features: int | None, seed: int) -> torch.Tensor:
        """Sorted random subset of channel indices, or all channels."""
        if n_features is None:
            return torch.arange(total)
        if not 0 < n_features <= total:
            msg = f"n_features must be in 1..{total} (the embedding has {total} channels), got {n_features}"
            raise ValueError(msg)
        generator = torch.Generator().manual_seed(seed)
        return torch.randperm(total, generator=generator)[:n_features].sort().values

    def refuse_inconsistent_state(self, state: Mapping[str, torch.Tensor], prefix: str = "") -> None:
        """Raise ValueError naming the saved channel subset or Gaussian tensors that this model cannot hold."""
        index = state.get(f"{prefix}feature_index")
        if index is None:
            return  # strict loading names the missing key
        total = sum(self.feature_extractor.out_channels.values())
        if index.ndim != 1 or index.is_floating_point() or not bool(((index >= 0) & (index < total)).all()):
            msg = (
                f"the checkpoint's {prefix}feature_index must list channel numbers of the {total}-channel embedding, "
                f"got shape {tuple(index.shape)} {index.dtype}: the file was edited; use it as saved, or refit"
            )
            raise ValueError(msg)
        dims = index.numel() * len(offsets(self.patch_context))
        self.gaussian.refuse_inconsistent_state(state, f"{prefix}gaussian.", dims=dims)

    @property
    def tiler(self) -> Tiler | None:
        """The anomalib ``Tiler`` the input is cut with, or ``None`` (no tiling)."""
        return self._tiler

    @tiler.setter
    def tiler(self, tiler: Tiler | None) -> None:
        """Accept the tiler settings whose untiled embedding lines up with the image; refuse the others at setup.

        ``Tiler.untile`` applies ``remove_border_count`` to the embedding's cells (32 px
        each for ``layer3``/``layer4``), not to pixels, and in ``interpolation`` mode it
        resizes the embedding to the input's size in pixels (one D x D Gaussian per pixel).
        """
        if tiler is not None and tiler.mode != ImageUpscaleMode.PADDING:
            msg = (
                f"ConTNetPaDiM tiles only in ImageUpscaleMode.PADDING mode, got {tiler.mode}: in interpolation mode "
                "anomalib's Tiler.untile resizes the embedding to the image size in pixels, which would fit one "
                "Gaussian per pixel. Use mode=ImageUpscaleMode.PADDING (the default)."
            )
            raise ValueError(msg)
        if tiler is not None and tiler.remove_border_count != 0:
            msg = (
                f"ConTNetPaDiM does not support remove_border_count={tiler.remove_border_count}: anomalib's "
                "Tiler.untile would remove that many embedding cells (not pixels) from every tile and leave zero "
                "embeddings there. Use remove_border_count=0 and overlapping tiles (stride < tile_size) instead."
            )
            raise ValueError(msg)
        self._tiler = tiler

    def _tiles(self, images: torch.Tensor) -> torch.Tensor:
        """The images cut into tiles when a tiler is set (records the layout in the tiler), else the images."""
        return images if self.tiler is None else self.tiler.tile(images)

    @torch.no_grad()
    def extract_embedding(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) images -> (B, D, h, w) float32 patch embeddings on the finest selected grid of the image."""
        return self._embed(images)[0]

    def _embed(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """The embedding, and the size in pixels its grid covers (the image's, or more when padded tiles stick out)."""
        features = self.feature_extractor(self._tiles(images))
        maps = [features[layer] for layer in self.feature_extractor.layers]
        grid = max((feature.shape[-2:] for feature in maps), key=lambda size: size[0] * size[1])
        resized = [feature if feature.shape[-2:] == grid else F.interpolate(feature, size=grid) for feature in maps]
        embedding = torch.cat(resized, dim=1)
        if self.feature_index.numel() != embedding.shape[1]:
            embedding = embedding.index_select(1, self.feature_index)
        embedding, covered_size = embedding.float(), (int(images.shape[-2]), int(images.shape[-1]))
        if self.tiler is not None:
            embedding, covered_size = self._untile(embedding, self.tiler, images.shape[-2:])
        if self.patch_context:  # after untiling, so that neighbours across tile borders are the image's
            # Zeros beyond the border, as in Patchcore's and MHPatchcore's padded 3x3 patches: on brick with one
            # training image they scored defects far better than repeated border cells (docs/benchmarks.md).
            moves = offsets(self.patch_context)
            embedding = torch.cat([shifted(embedding, *move, zeros=True) for move in moves], dim=1)
        return embedding, covered_size

    @staticmethod
    def _untile(embedding: torch.Tensor, tiler: Tiler, image_size: torch.Size) -> tuple[torch.Tensor, tuple[int, int]]:
        """Tiles' embeddings -> one embedding of the whole image, cut to the cells that cover the image.

        ``Tiler.untile`` places every tile's cells where the tile was cut (averaging
        where tiles overlap). Padded tiles can stick out past the image's bottom and
        right edges; cells wholly in that padding are dropped, so no Gaussian is
        fitted to padding. Tiles and strides must be whole numbers of cells.
        """
        cells = embedding.shape[-2:]
        cell_size = (tiler.tile_size_h // cells[0], tiler.tile_size_w // cells[1])
        steps = (tiler.tile_size_h, tiler.tile_size_w, tiler.stride_h, tiler.stride_w)
        if any(step % size for step, size in zip(steps, cell_size * 2, strict=True)) or min(cell_size) == 0:
            msg = (
                f"tile size {(tiler.tile_size_h, tiler.tile_size_w)} and stride {(tiler.stride_h, tiler.stride_w)} "
                f"must be multiples of the backbone's patch cell of {cell_size} px (a tile gives {tuple(cells)} "
                "cells); choose tile_size and stride accordingly"
            )
            raise ValueError(msg)
        rows, columns = (math.ceil(image_size[0] / cell_size[0]), math.ceil(image_size[1] / cell_size[1]))
        untiled = tiler.untile(embedding)[..., :rows, :columns]
        return untiled, (rows * cell_size[0], columns * cell_size[1])

    @staticmethod
    def raise_if_non_finite(values: torch.Tensor, what: str) -> None:
        """Raise NonFiniteError when ``values`` hold NaN or Inf: one reduction, and a message saying what to check."""
        if not bool(torch.isfinite(values).all()):
            msg = (
                f"ConTNetPaDiM computed NaN/Inf {what}. Check that the inputs are finite, ordinary 8-bit pictures "
                "(custom pre-processing included) and that the backbone weights are intact (anomalib-contnet weights "
                "--help); a fitted model: refit it or load an intact checkpoint."
            )
            raise NonFiniteError(msg)

    def _validate_embedding(self, embedding: torch.Tensor) -> None:
        """Refuse an unfitted model, and inputs whose grid is not the fitted one (shapes only: export-safe)."""
        if not self.gaussian.is_fitted:
            raise NotFittedError(NOT_FITTED_MESSAGE)
        fitted_positions = self.gaussian.mean.shape[0]
        if embedding.shape[-2] * embedding.shape[-1] != fitted_positions:
            msg = (
                f"the Gaussians were fitted on {fitted_positions} patch positions, but these inputs give a "
                f"{embedding.shape[-2]}x{embedding.shape[-1]} grid (tiling {'on' if self.tiler else 'off'}): predict "
                "with the image size and tiling (TilerConfigurationCallback) the model was trained with"
            )
            raise ValueError(msg)

    def forward(self, images: torch.Tensor) -> InferenceBatch:
        """Anomaly map (B, 1, H, W) and image score (B, 1) = the map's maximum.

        NaN/Inf scores raise :class:`NonFiniteError` in eager mode only: a data-dependent branch
        cannot be exported, and exported graphs come from models whose weights were checked on load.
        """
        with torch.no_grad():
            embedding, covered_size = self._embed(images)
        self._validate_embedding(embedding)
        with _float32(images.device.type):
            distances = self.gaussian(embedding)
            anomaly_map = self.anomaly_map_generator(distances, covered_size)[
                ..., : images.shape[-2], : images.shape[-1]
            ]
        pred_score = torch.amax(anomaly_map, dim=(-2, -1))  # NaN anywhere in a map propagates to its score
        if not torch.compiler.is_compiling():  # True while torch.export / torch.onnx.export(dynamo=True) trace
            self.raise_if_non_finite(pred_score, "anomaly scores")
        return InferenceBatch(pred_score=pred_score, anomaly_map=anomaly_map)


def _float32(device_type: str) -> contextlib.AbstractContextManager:
    """Autocast off where Lightning's mixed precision turned it on: only the backbone runs in 16 bits.

    Distances in bfloat16 would lose their third significant digit. Exports trace without
    autocast, so the graph holds no context.
    """
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()
