"""CPU kernel choices for ConTNet's float32 inference in eager mode, kept apart from the architecture.

:mod:`~anomalib_contnet.backbones.contnet` calls :func:`linear` for every linear layer
of the encoders, :func:`prepare_input` on the image in the stem, and :func:`applies` where
an encoder folds its patches back (channels-last where it holds). When it is False they
compute exactly what the architecture reads as (``layer(tokens)``, exact GELU, the
image as given); when it is True they pick oneDNN's kernels and the channels-last
layout, which give the same values faster (docs/performance.md, section 11).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn
from torch.utils._python_dispatch import is_in_torch_dispatch_mode

__all__ = ["applies", "linear", "prepare_input"]

_ONEDNN_LINEAR = getattr(torch.ops.mkldnn, "_linear_pointwise", None)
"""oneDNN's linear primitive, a private operator (what Inductor emits for CPU linear layers); None where absent."""


def applies(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is in plain float32 CPU inference in eager mode with oneDNN on.

    False keeps the operators and layout as written: CUDA, other dtypes, autocast,
    ``torch.compile``, ``torch.export`` and ONNX tracing (their graphs stay standard),
    dispatch modes such as ``FlopCounterMode``, and ``torch.backends.mkldnn.flags(enabled=False)``,
    which switches every choice of this module off at once.
    """
    return (
        type(tensor) is torch.Tensor  # not the FakeTensor/FunctionalTensor of export or compile
        and tensor.device.type == "cpu"
        and tensor.dtype == torch.float32
        and torch.backends.mkldnn.is_available()
        and torch.backends.mkldnn.enabled
        and not is_in_torch_dispatch_mode()
        and not torch.is_autocast_enabled("cpu")
        and not torch.compiler.is_compiling()
        and not torch.jit.is_tracing()
    )


def prepare_input(image: torch.Tensor) -> torch.Tensor:
    """The image in the layout the stem should read: channels-last where :func:`applies`, else unchanged.

    oneDNN's convolutions and pooling read channels-last maps without reordering; the
    encoders fold patches back channels-last under the same condition, so every map after the stem keeps it.
    """
    return image.contiguous(memory_format=torch.channels_last) if applies(image) else image


def linear(tokens: torch.Tensor, layer: nn.Linear, *, gelu: bool = False) -> torch.Tensor:
    """``layer(tokens)``, then exact (erf) GELU when ``gelu``; one oneDNN call where :func:`applies` without autograd.

    torch's float32 ``F.linear`` on the CPU runs MKL's sgemm, which is slow on AMD
    CPUs, and oneDNN applies the GELU while the product is still in cache.
    """
    fused = (
        _ONEDNN_LINEAR is not None
        and applies(tokens)
        and layer.weight.dtype == torch.float32
        and not (torch.is_grad_enabled() and (tokens.requires_grad or layer.weight.requires_grad))
    )
    if fused:
        activation, algorithm = ("gelu", "none") if gelu else ("none", "")  # GELU algorithm "none": erf, not tanh
        return _ONEDNN_LINEAR(tokens, layer.weight, layer.bias, activation, [], algorithm)
    projected = layer(tokens)
    return F.gelu(projected) if gelu else projected
