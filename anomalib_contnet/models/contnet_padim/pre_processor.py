"""One antialiased resize for fitting, testing, ``Engine.predict``, every export and both inferencers.

anomalib 2.7 resizes datamodule batches (fit, test, ``Engine.predict``) with
torchvision's antialiased ``Resize``, but ``PreProcessor.forward`` (the exported
graph and ``TorchInferencer``) runs a copy made by ``get_exportable_transform``,
which switches antialiasing off because ONNX export does not support it. On
1024 px images the two differ enough to move normalised scores by about 0.1 (docs/export.md,
"Parity on image files"), so thresholds learned while fitting mean something else in deployment.

:class:`AntialiasedResize` computes the antialiased resize with ordinary tensor
operations, which every export keeps; :class:`ConTNetPreProcessor` applies it on every path.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from anomalib.pre_processing import PreProcessor
from anomalib.pre_processing.utils.transform import get_exportable_transform
from torchvision import tv_tensors
from torchvision.transforms.v2 import Compose, InterpolationMode, Normalize, Resize

__all__ = ["DEFAULT_IMAGE_SIZE", "AntialiasedResize", "ConTNetPreProcessor"]

DEFAULT_IMAGE_SIZE = (224, 224)
"""The paper's input size, and ConTNet's ImageNet one."""


def resampling_matrix(input_size: int, output_size: int, like: torch.Tensor) -> torch.Tensor:
    """``(output_size, input_size)`` weights of antialiased bilinear resampling along one axis, dtype of ``like``.

    Output pixel ``i`` is centred at ``(i + 0.5) * scale`` in input coordinates
    (``scale = input_size / output_size``); input pixel ``j``, centred at ``j + 0.5``,
    gets the triangle weight ``max(0, 1 - |distance| / max(scale, 1))``, and each row
    is divided by its sum (which renormalises at the borders). Downscaling thus
    averages over the whole footprint of an output pixel instead of sampling two
    input pixels; upscaling is plain bilinear.

    The distance is computed times ``2 * output_size``, which makes it an exact
    integer: float32 centres near 1000 would carry rounding errors of 3e-5 pixels,
    and runtimes round them differently. Sizes may be symbolic (export).
    """
    outputs = torch.arange(output_size, device=like.device)
    inputs = torch.arange(input_size, device=like.device)
    scaled_distance = ((2 * inputs[None, :] + 1) * output_size - (2 * outputs[:, None] + 1) * input_size).abs()
    scaled_support = 2 * torch.sym_max(input_size, output_size)
    weights = (1.0 - scaled_distance.to(like.dtype) / scaled_support).clamp(min=0.0)
    return weights / weights.sum(dim=1, keepdim=True)


def antialiased_resize(images: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Resize the last two axes of a floating-point tensor ``(..., H, W)`` to ``size = (height, width)``."""
    height, width = size
    rows = resampling_matrix(images.shape[-2], height, images)
    columns = resampling_matrix(images.shape[-1], width, images)
    return rows @ images @ columns.transpose(0, 1)


class AntialiasedResize(Resize):
    """torchvision's ``Resize(size, antialias=True)`` for images, computed so that every export keeps it.

    Images (``tv_tensors.Image`` or plain tensors, any leading axes) go through
    :func:`antialiased_resize`; masks through torchvision's own kernel, which
    resizes them with nearest neighbour exactly as ``Resize`` does. Being a
    ``Resize``, it is what anomalib's datamodules apply to each dataset item.

    ``antialias`` always reads ``True`` and cannot be switched off: anomalib's
    ``get_exportable_transform`` sets it to ``False`` on every ``Resize`` of the
    exported copy, and keeping the fitted behaviour there is this class's purpose.

    Args:
        size: output ``(height, width)``.
    """

    def __init__(self, size: Sequence[int]) -> None:
        height, width = (int(side) for side in size)
        super().__init__([height, width], interpolation=InterpolationMode.BILINEAR, antialias=True)

    @property
    def antialias(self) -> bool:
        """Always ``True``: this resize has no aliased mode."""
        return True

    @antialias.setter
    def antialias(self, value: bool | None) -> None:
        """Ignored (see the class docstring): anomalib's export copy sets ``False`` here."""

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        """Resize an image, video or plain tensor antialiased; masks (nearest neighbour) and boxes as torchvision."""
        if isinstance(inpt, tv_tensors.Image | tv_tensors.Video):
            return tv_tensors.wrap(antialiased_resize(inpt.as_subclass(torch.Tensor), self.size), like=inpt)
        if isinstance(inpt, torch.Tensor) and not isinstance(inpt, tv_tensors.TVTensor):
            return antialiased_resize(inpt, self.size)
        return super().transform(inpt, params)


class ConTNetPreProcessor(PreProcessor):
    """anomalib's ``PreProcessor`` with :class:`AntialiasedResize` and ``Normalize(mean, std)`` on every path.

    The Lightning hooks (fit, validation, test, predict) and ``forward`` (exports,
    ``TorchInferencer``) apply the same transform. The checkpoint stores
    ``image_size``, ``mean`` and ``std`` as plain lists.

    Args:
        image_size: output ``(height, width)``.
        mean: per-channel mean subtracted after resizing.
        std: per-channel standard deviation divided by after that.
    """

    def __init__(self, image_size: Sequence[int], mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self._configure(image_size, mean, std)

    def _configure(
        self,
        image_size: Sequence[int],
        mean: Sequence[float],
        std: Sequence[float],
        resize: AntialiasedResize | None = None,
    ) -> None:
        """Set the settings and build the transform (and anomalib's export copy of it, the same computation).

        ``resize``, when given, is kept and set to ``image_size`` rather than replaced.
        """
        self.image_size = tuple(int(side) for side in image_size)
        self.mean = tuple(float(value) for value in mean)
        self.std = tuple(float(value) for value in std)
        if resize is None:
            resize = AntialiasedResize(self.image_size)
        resize.size = list(self.image_size)
        self.transform = Compose([resize, Normalize(mean=list(self.mean), std=list(self.std))])
        self.export_transform = get_exportable_transform(self.transform)

    def checkpoint_config(self) -> dict[str, Any]:
        """Plain data that rebuilds this pre-processor: ``image_size``, ``mean``, ``std``."""
        return {"image_size": list(self.image_size), "mean": list(self.mean), "std": list(self.std)}

    def load_checkpoint_config(self, config: Mapping[str, Any]) -> None:
        """Rebuild from :meth:`checkpoint_config`'s data, resizing with the same object at the checkpoint's size.

        anomalib's datamodules put this resize into their datasets' augmentations when they are
        set up, before ``--ckpt_path`` is loaded: a new object would leave them at the old size.
        """
        self._configure(config["image_size"], config["mean"], config["std"], resize=self.transform.transforms[0])
