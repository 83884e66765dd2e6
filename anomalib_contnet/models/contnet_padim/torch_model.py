"""PyTorch model of ConTNetPaDiM: frozen backbone -> patch embedding -> Gaussian -> anomaly map."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F  # noqa: N812
from anomalib.data import InferenceBatch
from anomalib.models.components import DynamicBufferMixin
from torch import nn

from anomalib_contnet.models.contnet_padim.anomaly_map import AnomalyMapGenerator
from anomalib_contnet.models.contnet_padim.feature_extractor import build_feature_extractor
from anomalib_contnet.models.contnet_padim.gaussian import StreamingGaussian

__all__ = ["ConTNetPaDiMModel", "NotFittedError"]


class NotFittedError(RuntimeError):
    """Raised when a model is asked for predictions before its Gaussians were fitted."""


class ConTNetPaDiMModel(DynamicBufferMixin, nn.Module):
    """Patch features of chosen backbone stages, modelled by one Gaussian per patch position.

    Args:
        backbone: ``contnet_b`` (the paper), another ConTNet variant, or a timm model name.
        layers: stages whose features are concatenated per patch position; stages
            on a coarser grid are upsampled (nearest neighbour, i.e. each coarse
            patch is repeated over the finer patches it covers, PaDiM's choice) to the
            finest selected grid.
        pre_trained: load ImageNet weights for the backbone.
        weights: local path or URL of backbone weights (see ``anomalib_contnet.backbones.weights``).
        n_features: keep only this many randomly chosen embedding channels (all when ``None``).
        feature_seed: seed of that random choice; the chosen indices are saved with the model.
        epsilon: covariance regulariser.
        sigma: standard deviation of the anomaly-map smoothing.
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
    ) -> None:
        super().__init__()
        self.feature_extractor = build_feature_extractor(backbone, layers, pre_trained, weights)
        total_features = sum(self.feature_extractor.out_channels.values())
        self.register_buffer("feature_index", self._choose_features(total_features, n_features, feature_seed))
        self.feature_index: torch.Tensor
        self.gaussian = StreamingGaussian(epsilon)
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

    @property
    def embedding_dim(self) -> int:
        """Dimension of the per-patch embedding the Gaussians live in."""
        return self.feature_index.numel()

    @torch.no_grad()
    def extract_embedding(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) images -> (B, D, h, w) patch embeddings on the finest selected grid."""
        features = self.feature_extractor(images)
        maps = [features[layer] for layer in self.feature_extractor.layers]
        grid = max((feature.shape[-2:] for feature in maps), key=lambda size: size[0] * size[1])
        resized = [feature if feature.shape[-2:] == grid else F.interpolate(feature, size=grid) for feature in maps]
        embedding = torch.cat(resized, dim=1)
        if self.feature_index.numel() == embedding.shape[1]:
            return embedding
        return embedding.index_select(1, self.feature_index)

    def forward(self, images: torch.Tensor) -> InferenceBatch:
        """Anomaly map (B, 1, H, W) and image score (B, 1) = the map's maximum."""
        if not self.gaussian.is_fitted:
            msg = (
                "ConTNetPaDiM has not been fitted: train it on normal images first (engine.fit / anomalib train) "
                "or load a trained checkpoint (--ckpt_path / ConTNetPaDiM.load_from_checkpoint)."
            )
            raise NotFittedError(msg)
        embedding = self.extract_embedding(images)
        distances = self.gaussian(embedding)
        anomaly_map = self.anomaly_map_generator(distances, images.shape[-2:])
        pred_score = torch.amax(anomaly_map, dim=(-2, -1))
        return InferenceBatch(pred_score=pred_score, anomaly_map=anomaly_map)
