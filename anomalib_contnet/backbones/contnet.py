"""ConTNet: convolution + patch-wise transformer backbone (Yan et al. 2021, arXiv 2104.13497).

A clean-room implementation of the architecture of the paper and the authors' code
(:data:`~anomalib_contnet.backbones.weight_files.AUTHORS_REPOSITORY`) whose parameter names,
shapes and order equal the authors' released checkpoints (``tests/data/contnet_keys``), so
those load strictly. Variants are rows of
:data:`~anomalib_contnet.backbones.contnet_configs.CONTNET_CFGS`; :func:`contnet_from_config`
builds one, called by timm's builder (:mod:`anomalib_contnet.backbones.timm_contnet`).

The down-sampling blocks have two shortcut options (a strided 1x1 convolution, or
``avg_down``: 2x2 average pooling, then a 1x1 convolution): two networks whose checkpoints
differ only in the spelling of three keys, so keys are never renamed from one into the other.

Any input of at least 32x32 pixels runs (the encoders pad to whole patches and mask the
padding out of attention); multiples of 224 compute exactly the published network.

CPU kernel choices live in :mod:`~anomalib_contnet.backbones.cpu_inference`; this module
calls its :func:`~anomalib_contnet.backbones.cpu_inference.linear`,
:func:`~anomalib_contnet.backbones.cpu_inference.prepare_input` (the stem) and
:func:`~anomalib_contnet.backbones.cpu_inference.applies` (the encoders' fold-back layout) only.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace
from itertools import accumulate
from operator import mul
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from anomalib_contnet.backbones.contnet_configs import STAGE_STRIDES, ConTNetConfig
from anomalib_contnet.backbones.cpu_inference import applies, linear, prepare_input

__all__ = [
    "STAGE_NAMES",
    "STAGE_REDUCTIONS",
    "ConTBlock",
    "ConTNet",
    "PatchwiseTransformerEncoder",
    "contnet_from_config",
]

STAGE_NAMES: tuple[str, ...] = ("layer0", "layer1", "layer2", "layer3", "layer4")
"""Names of the stages whose outputs can be requested, in execution order."""

STEM_REDUCTION = 4
"""Reduction of ``layer0``: a stride-2 convolution, then stride-2 max pooling."""

STAGE_REDUCTIONS: tuple[int, ...] = tuple(accumulate(STAGE_STRIDES, mul, initial=STEM_REDUCTION))
"""How many input pixels one cell of each stage's map spans per side (timm's ``feature_info`` reduction)."""

MIN_INPUT_SIDE = STAGE_REDUCTIONS[-1]
"""Smallest image side accepted: a smaller side leaves the deepest stages less than one cell."""

STAGE_PATCH_SIZES: tuple[tuple[int, int], ...] = ((7, 14), (7, 14), (7, 14), (7, 7))
"""Patch sizes of the two encoders (``ste1``, ``ste2``) in every block of stages 1..4."""


class ConvUnit(nn.Module):
    """A bias-free convolution kept under the attribute ``conv``.

    The authors wrap every convolution in a module of this shape, which is why
    the checkpoint keys read ``layer0.conv.conv.weight`` and ``out_conv.conv.weight``.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int, padding: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the convolution."""
        return self.conv(x)


class AvgDownShortcut(nn.Module):
    """Shortcut of the ``avg_down`` option in down-sampling blocks: average pooling, then a 1x1 convolution.

    Pooling before the projection keeps every input pixel in the shortcut,
    where a strided 1x1 convolution would drop three of every four.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.pool = nn.AvgPool2d(stride, stride, ceil_mode=True, count_include_pad=False)
        self.conv = ConvUnit(in_channels, out_channels, kernel_size=1, stride=1, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pool, then project."""
        return self.conv(self.pool(x))


class MultiHeadSelfAttention(nn.Module):
    """Standard multi-head self-attention; heads are contiguous channel chunks of a fused ``qkv`` projection."""

    def __init__(self, dim: int, num_heads: int, dropout: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.dropout = dropout

    def forward(self, tokens: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Attend within each sequence of ``tokens`` (shape N, L, C).

        ``key_mask`` (N, 1, 1, L, boolean, True = real token) keeps padding
        tokens out of every softmax; None (no padding) runs plain attention.
        """
        batch, length, dim = tokens.shape
        qkv = linear(tokens, self.qkv).reshape(batch, length, 3, self.num_heads, dim // self.num_heads)
        query, key, value = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        attended = F.scaled_dot_product_attention(
            query, key, value, attn_mask=key_mask, dropout_p=self.dropout if self.training else 0.0
        )  # default scale is head_dim ** -0.5, as in ConTNet
        return linear(attended.transpose(1, 2).reshape(batch, length, dim), self.proj)


class FeedForward(nn.Module):
    """Two-layer MLP with exact (erf) GELU."""

    def __init__(self, dim: int, hidden_dim: int, dropout: float) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Expand, activate, project back."""
        return self.drop(linear(self.drop(linear(tokens, self.fc1, gelu=True)), self.fc2))


class PatchwiseTransformerEncoder(nn.Module):
    """Post-norm transformer layer applied independently inside non-overlapping ``patch_size`` patches.

    Each PxP patch of the map is one sequence of P*P tokens; a separable learned position
    encoding (rows on the first half of the channels, columns on the second) is added first.

    Maps whose sides are not multiples of P are padded at the bottom and right to whole
    patches, encoded and cropped back. The padding is masked out of attention as keys, so a
    border patch is encoded exactly as a transformer over its real tokens alone; unmasked,
    padding would enter the softmax like image content and the features would change with
    the input size. Maps needing no padding take the unmasked path, the published computation.
    """

    def __init__(self, dim: int, patch_size: int, num_heads: int, mlp_dim: int, dropout: float) -> None:
        super().__init__()
        self.patch_size = patch_size
        half = dim // 2
        self.pe = nn.ParameterList(
            [nn.Parameter(torch.zeros(1, patch_size, 1, half)), nn.Parameter(torch.zeros(1, 1, patch_size, half))]
        )
        self.attn = MultiHeadSelfAttention(dim, num_heads, dropout)
        self.mlp = FeedForward(dim, mlp_dim, dropout)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.drop = nn.Dropout(dropout)
        nn.init.trunc_normal_(self.pe[0], std=0.02)
        nn.init.trunc_normal_(self.pe[1], std=0.02)

    def position_encoding(self) -> torch.Tensor:
        """Full (1, P, P, C) encoding built from the row and column halves."""
        rows, cols = self.pe[0], self.pe[1]
        size = self.patch_size
        return torch.cat((rows.expand(1, size, size, -1), cols.expand(1, size, size, -1)), dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Run the encoder on every patch of ``x`` (B, C, H, W), padding to whole patches when needed."""
        height, width = x.shape[-2:]
        pad_bottom, pad_right = -height % self.patch_size, -width % self.patch_size
        if not (pad_bottom or pad_right):
            return self.encode_patches(x)
        padded = F.pad(x, (0, pad_right, 0, pad_bottom))
        real = self.real_token_mask(height, width, padded.shape[-2], padded.shape[-1], x.device)
        return self.encode_patches(padded, real)[..., :height, :width]

    def real_token_mask(
        self, height: int, width: int, padded_height: int, padded_width: int, device: torch.device
    ) -> torch.Tensor:
        """(rows*cols, P*P) boolean mask, per patch in row-major patch order: True for tokens inside the map."""
        size = self.patch_size
        inside = (torch.arange(padded_height, device=device) < height)[:, None] & (
            torch.arange(padded_width, device=device) < width
        )[None, :]
        rows, cols = padded_height // size, padded_width // size
        return inside.reshape(rows, size, cols, size).permute(0, 2, 1, 3).reshape(rows * cols, size * size)

    def encode_patches(self, x: torch.Tensor, real: torch.Tensor | None = None) -> torch.Tensor:
        """Encode a map whose sides are multiples of P; ``real`` (from :meth:`real_token_mask`) masks padding keys."""
        batch, channels, height, width = x.shape
        size = self.patch_size
        rows, cols = height // size, width // size
        patches = (
            x.reshape(batch, channels, rows, size, cols, size)
            .permute(0, 2, 4, 3, 5, 1)
            .reshape(batch * rows * cols, size, size, channels)
        )
        tokens = (patches + self.position_encoding()).reshape(batch * rows * cols, size * size, channels)
        key_mask = None if real is None else real.expand(batch, -1, -1).reshape(batch * rows * cols, 1, 1, -1)
        tokens = self.norm1(tokens + self.drop(self.attn(tokens, key_mask)))
        tokens = self.norm2(tokens + self.mlp(tokens))
        grid = tokens.reshape(batch, rows, cols, size, size, channels)
        if applies(tokens):  # channels-last where the CPU speed paths apply
            return grid.transpose(2, 3).reshape(batch, height, width, channels).permute(0, 3, 1, 2)
        return grid.permute(0, 5, 1, 3, 2, 4).reshape(batch, channels, height, width)


class ConTBlock(nn.Module):
    """One ConT block: BN-ReLU, two patch-wise encoders, a convolution, and a residual shortcut.

    The last block of a stage doubles the width (and halves the resolution in
    stages 1-3); its shortcut is then a projection of the pre-activated input.
    """

    def __init__(
        self,
        planes: int,
        mlp_dim: int,
        num_heads: int,
        patch_sizes: tuple[int, int],
        *,
        expand: bool,
        stride: int,
        dropout: float = 0.0,
        final_dropout: float = 0.0,
        avg_down: bool = False,
    ) -> None:
        super().__init__()
        out_planes = 2 * planes if expand else planes
        # Registration order fixes the state_dict key order: downsample, bn, ste1, ste2, out_conv.
        if expand:
            self.downsample: nn.Module | None = (
                AvgDownShortcut(planes, out_planes, stride)
                if avg_down and stride > 1
                else ConvUnit(planes, out_planes, kernel_size=1, stride=stride, padding=0)
            )
        else:
            self.downsample = None
        self.bn = nn.BatchNorm2d(planes)
        self.ste1 = PatchwiseTransformerEncoder(planes, patch_sizes[0], num_heads, mlp_dim, dropout)
        self.ste2 = PatchwiseTransformerEncoder(planes, patch_sizes[1], num_heads, mlp_dim, dropout)
        if not expand:
            self.out_conv = ConvUnit(planes, out_planes, kernel_size=3, stride=1, padding=1)
        elif stride > 1:
            self.out_conv = ConvUnit(planes, out_planes, kernel_size=3, stride=stride, padding=1)
        else:
            self.out_conv = ConvUnit(planes, out_planes, kernel_size=1, stride=1, padding=0)
        self.final_drop = nn.Dropout(final_dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the block."""
        activated = F.relu(self.bn(x))
        shortcut = x if self.downsample is None else self.downsample(activated)
        out = self.out_conv(self.ste2(self.ste1(activated)))
        return self.final_drop(out + shortcut)


class Stem(nn.Module):
    """7x7 stride-2 convolution then 3x3 stride-2 max pooling; no normalisation or activation."""

    def __init__(self, out_channels: int) -> None:
        super().__init__()
        self.conv = ConvUnit(3, out_channels, kernel_size=7, stride=2, padding=3)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Reduce the image by :data:`STEM_REDUCTION` (sides of at least :data:`MIN_INPUT_SIDE`)."""
        height, width = x.shape[-2:]
        if height < MIN_INPUT_SIDE or width < MIN_INPUT_SIDE:
            msg = (
                f"ConTNet needs image sides of at least {MIN_INPUT_SIDE} pixels (its deepest stages reduce by that); "
                f"got {height}x{width}. Resize the input first (anomalib's PreProcessor does with image_size)."
            )
            raise ValueError(msg)
        return self.maxpool(self.conv(prepare_input(x)))


class ConTStage(nn.Sequential):
    """A stage: blocks named ``ConTBlock0``, ``ConTBlock1``, ... as in the published checkpoints."""

    def __init__(self, blocks: Iterable[ConTBlock]) -> None:
        super().__init__()
        for index, block in enumerate(blocks):
            self.add_module(f"ConTBlock{index}", block)


class ConTNet(nn.Module):
    """The ConTNet classifier; ``feature_info`` names its stages for timm's ``features_only`` networks.

    Args:
        config: architecture of the variant (a row of :data:`~anomalib_contnet.backbones.contnet_configs.CONTNET_CFGS`).
    """

    def __init__(self, config: ConTNetConfig) -> None:
        super().__init__()
        self.config = config
        self.layer0 = Stem(config.inplanes)
        for stage in range(4):
            planes = config.inplanes * 2**stage
            stride = STAGE_STRIDES[stage]
            blocks = [
                ConTBlock(
                    planes,
                    config.mlp_dim[stage],
                    config.head_num[stage],
                    STAGE_PATCH_SIZES[stage],
                    expand=index == config.layers[stage] - 1,
                    stride=stride,
                    dropout=config.dropout[stage],
                    final_dropout=config.last_dropout if stage == 3 and index == config.layers[stage] - 1 else 0.0,
                    avg_down=config.avg_down,
                )
                for index in range(config.layers[stage])
            ]
            self.add_module(f"layer{stage + 1}", ConTStage(blocks))
        self.num_features = config.inplanes * 2**4
        self.feature_info = [
            {"num_chs": config.inplanes * 2**index, "reduction": reduction, "module": name}
            for index, (name, reduction) in enumerate(zip(STAGE_NAMES, STAGE_REDUCTIONS, strict=True))
        ]
        self.fc: nn.Module = nn.Linear(self.num_features, config.num_classes) if config.num_classes else nn.Identity()
        self._init_weights()

    def _init_weights(self) -> None:
        """Initialise like the authors: Kaiming for convolutions, truncated normal for linear layers."""
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The (B, C, H/32, W/32) map of ``layer4``; timm's ``features_only`` networks return the others."""
        for name in STAGE_NAMES:
            x = getattr(self, name)(x)
        return x

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        """Global average pooling then the classifier (identity when built without classes)."""
        return self.fc(features.mean(dim=(-2, -1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Classify ``x`` (B, 3, H, W), sides of at least 32 (multiples of 224 run the published computation)."""
        return self.forward_head(self.forward_features(x))


def contnet_from_config(cfg: ConTNetConfig, *, in_chans: int = 3, **fields: Any) -> ConTNet:
    """Build an untrained ConTNet of ``cfg`` with some fields replaced (None keeps the config's value).

    timm's ``build_model_with_cfg`` calls it (see :mod:`anomalib_contnet.backbones.timm_contnet`),
    passing the variant's row as ``cfg``, ``in_chans``, and the caller's keyword arguments.
    """
    if in_chans != 3:
        msg = f"ConTNet's stem and published weights take RGB images (in_chans=3); got in_chans={in_chans}"
        raise ValueError(msg)
    changes = {key: value for key, value in fields.items() if value is not None}
    unknown = sorted(set(changes).difference(ConTNetConfig.__dataclass_fields__))
    if unknown:
        msg = f"unknown ConTNet argument(s) {unknown}; accepted: {sorted(ConTNetConfig.__dataclass_fields__)}"
        raise TypeError(msg)
    return ConTNet(replace(cfg, **changes))
