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

__all__ = ["ConTNetPaDiMModel", "NonFiniteError", "NotFittedError"]


class NotFittedError(RuntimeError):
    """Raised when a model is asked for predictions before its Gaussians were fitted."""


class NonFiniteError(FloatingPointError):
    """Raised instead of returning NaN/Inf features, maps or scores; the message names where they first appear."""


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
        factor_dtype: storage type of the Gaussians' precision factor: ``"float32"``
            (default), or ``"float16"``, which halves the checkpoint and the exported
            model again while distances move by about 1e-4 relative (rounding of the
            factor); arithmetic is float32 either way. See docs/performance.md.
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
        factor_dtype: str = "float32",
    ) -> None:
        super().__init__()
        self.feature_extractor = build_feature_extractor(backbone, layers, pre_trained, weights)
        total_features = sum(self.feature_extractor.out_channels.values())
        self.register_buffer("feature_index", self._choose_features(total_features, n_features, feature_seed))
        self.feature_index: torch.Tensor
        self.gaussian = StreamingGaussian(epsilon, factor_dtype)
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

    @staticmethod
    def not_fitted_message() -> str:
        """What to do when a model without fitted Gaussians is asked to predict or be exported."""
        return (
            "ConTNetPaDiM has not been fitted: train it on normal images first (engine.fit / anomalib train) "
            "or load a trained checkpoint (--ckpt_path / ConTNetPaDiM.load_from_checkpoint)."
        )

    def raise_if_non_finite(self, values: torch.Tensor, images: torch.Tensor) -> None:
        """Raise NonFiniteError when ``values`` (computed from ``images``) hold NaN or Inf.

        One reduction over ``values`` on the normal path; only when it fails are
        the images run through the backbone again, stage by stage, to name the
        first stage whose output is not finite.
        """
        if bool(torch.isfinite(values).all()):
            return
        msg = f"ConTNetPaDiM computed NaN/Inf values: {self._locate_non_finite(images)}"
        raise NonFiniteError(msg)

    @torch.no_grad()
    def _locate_non_finite(self, images: torch.Tensor) -> str:
        """Describe where NaN/Inf first appear for ``images``: the input, a backbone stage, or the Gaussian."""
        total = images.shape[0]

        def count_bad(tensor: torch.Tensor) -> int:
            return int((~torch.isfinite(tensor)).flatten(1).any(dim=1).sum())

        if bad := count_bad(images):
            return (
                f"the input images already hold NaN/Inf ({bad} of {total} images). Check the image files and "
                "any custom pre-processing."
            )
        for stage, output in self.feature_extractor.stage_outputs(images).items():
            if bad := count_bad(output):
                return (
                    f"they first appear in the output of backbone stage {stage!r} ({bad} of {total} images). The "
                    "backbone weights are damaged or overflow on these inputs: reload the ImageNet weights "
                    "(anomalib-contnet weights --help) and check that the images are ordinary 8-bit pictures."
                )
        gaussian = self.gaussian
        if not (bool(torch.isfinite(gaussian.mean).all()) and bool(torch.isfinite(gaussian.precision_factor).all())):
            return "the fitted Gaussian parameters hold NaN/Inf; refit the model or load an intact checkpoint."
        return (
            "the backbone features are finite but their Mahalanobis distance overflows float32: these inputs lie "
            "extremely far from the training images. Check the images and the pre-processing."
        )

    def forward(self, images: torch.Tensor) -> InferenceBatch:
        """Anomaly map (B, 1, H, W) and image score (B, 1) = the map's maximum.

        In eager mode, NaN/Inf in the scores raise :class:`NonFiniteError` (a
        reduction over B numbers). Under ``torch.export``/``torch.compile`` the
        check is left out, because a data-dependent branch cannot be exported;
        exported graphs come from models whose weights were checked on load.
        """
        if not self.gaussian.is_fitted:
            raise NotFittedError(self.not_fitted_message())
        embedding = self.extract_embedding(images)
        distances = self.gaussian(embedding)
        anomaly_map = self.anomaly_map_generator(distances, images.shape[-2:])
        pred_score = torch.amax(anomaly_map, dim=(-2, -1))  # NaN anywhere in a map propagates to its score
        if not torch.compiler.is_compiling():  # True while torch.export / torch.onnx.export(dynamo=True) trace
            self.raise_if_non_finite(pred_score, images)
        return InferenceBatch(pred_score=pred_score, anomaly_map=anomaly_map)
