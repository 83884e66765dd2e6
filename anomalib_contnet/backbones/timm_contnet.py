"""ConTNet in timm's model registry, and the loading of its ImageNet weights.

Registered as timm's own model files do (``default_cfgs`` with the published downloads,
``register_model``, ``build_model_with_cfg``), ``contnet_ti/s/m/b`` work in every anomalib
model that takes a timm backbone name; ``features_only=True`` names the stages ``layer0`` .. ``layer4``.

``pretrained=True`` takes the file from :func:`~anomalib_contnet.backbones.weight_files.resolve_weights`
(``pretrained_cfg_overlay=dict(file=...)`` or ``url=...`` override it), never silently random.
The file's keys decide which shortcut network is built; timm reads it once (unwrapping
``{"model": ...}`` and ``module.``), and the checkpoint filter loads it strictly, or refuses it whole.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model, resolve_pretrained_cfg

from anomalib_contnet.backbones.contnet import ConTNet, contnet_from_config
from anomalib_contnet.backbones.contnet_configs import CONTNET_CFGS, shortcut_name, shortcut_of_state_dict
from anomalib_contnet.backbones.weight_files import (
    AUTHORS_REPOSITORY,
    PUBLISHED_URLS,
    WeightsError,
    checkpoint_keys,
    resolve_weights,
)
from anomalib_contnet.checkpoints import non_finite_counts

__all__: list[str] = []  # register_model appends the entry points

logger = logging.getLogger(__name__)


def _cfg(url: str | None = None) -> dict[str, Any]:
    """Default config of a ConTNet variant: the authors' ImageNet preprocessing and the 1000-class head."""
    return {
        "url": url,
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": (7, 7),
        "crop_pct": 0.875,  # resize 256, center crop 224
        "interpolation": "bilinear",
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": "layer0.conv.conv",
        "classifier": "fc",
        "origin_url": AUTHORS_REPOSITORY,
        "paper_ids": "arXiv:2104.13497",
    }


default_cfgs = generate_default_cfgs({name: _cfg(PUBLISHED_URLS.get(name)) for name in CONTNET_CFGS})


def _named_source(variant: str, pretrained_cfg: Any, overlay: dict[str, Any]) -> str | None:
    """The file or URL the caller named through timm's config arguments; None leaves the choice to the lookup."""
    cfg = resolve_pretrained_cfg(variant, pretrained_cfg=pretrained_cfg, pretrained_cfg_overlay=overlay)
    if cfg.state_dict is not None or cfg.hf_hub_id:
        msg = f"{variant}: state_dict and hf_hub_id sources are not supported; pass pretrained_cfg_overlay=dict(file=)"
        raise WeightsError(msg)
    if cfg.file:
        return str(cfg.file)
    return None if cfg.url == PUBLISHED_URLS.get(variant) else cfg.url


def _shortcut_to_build(path: Path, requested: bool | None) -> bool | None:
    """The ``avg_down`` that the file's keys spell; an explicit request may not contradict it (None: no such key)."""
    try:
        spelled = shortcut_of_state_dict(checkpoint_keys(path))
    except ValueError as error:
        msg = f"{path}: {error}"
        raise WeightsError(msg) from error
    if spelled is not None and requested is not None and spelled != requested:
        msg = (
            f"avg_down={requested} asks for the {shortcut_name(requested)} shortcut, but {path} holds the "
            f"{shortcut_name(spelled)} network: the two compute different features from the same tensors. "
            f"Pass avg_down=None to build the network of the file, or use a checkpoint of the other network."
        )
        raise WeightsError(msg)
    return requested if spelled is None else spelled


def _load_strictly(state_dict: dict[str, Any], model: ConTNet) -> dict[str, torch.Tensor]:
    """Timm's ``pretrained_filter_fn``: the one load of the file, strict, or a refusal naming what does not fit.

    A headless model's head is dropped first. A tensor holding NaN/Inf refuses the file;
    otherwise torch loads it strictly and names every missing, unexpected or wrong-shape
    key (timm's own load would be non-strict for headless models, which it adapts).
    The model's own tensors are returned, so timm's load after this filter copies
    each tensor onto itself, which torch skips.
    """
    path = model.pretrained_cfg["file"]
    if not model.config.num_classes:
        state_dict = {key: value for key, value in state_dict.items() if not key.startswith("fc.")}
    for key, count in non_finite_counts(state_dict).items():
        msg = f"{path}: {key} holds {count} NaN/Inf values; the file is damaged, fetch it again"
        raise WeightsError(msg)
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as error:
        config = model.config
        msg = (
            f"{path} does not fit this ConTNet (inplanes={config.inplanes}, layers={config.layers}, "
            f"num_classes={config.num_classes}). Is it a checkpoint of another variant? A mismatch only in 'fc' "
            f"means another classifier size: build the model with num_classes=0. {error}"
        )
        raise WeightsError(msg) from error
    return model.state_dict()


def _create_contnet(variant: str, pretrained: bool = False, **kwargs: Any) -> ConTNet:
    """Build a variant with timm's builder; ``features_only`` models are built without the head they would drop."""
    if kwargs.get("features_only"):
        kwargs.setdefault("num_classes", 0)
    if pretrained:
        overlay = kwargs.pop("pretrained_cfg_overlay", None) or {}
        path = resolve_weights(variant, _named_source(variant, kwargs.get("pretrained_cfg"), overlay))
        kwargs["avg_down"] = _shortcut_to_build(path, kwargs.get("avg_down"))
        kwargs["pretrained_cfg_overlay"] = {**overlay, "file": str(path)}
        shortcut = shortcut_name(CONTNET_CFGS[variant].avg_down if kwargs["avg_down"] is None else kwargs["avg_down"])
        logger.info("building %s with the %s shortcut of %s", variant, shortcut, path)
    try:
        return build_model_with_cfg(
            contnet_from_config,
            variant,
            pretrained,
            model_cfg=CONTNET_CFGS[variant],
            pretrained_filter_fn=_load_strictly,
            feature_cfg={"flatten_sequential": False},  # keep the stages whole: feature_info names layer0..layer4
            **kwargs,
        )
    except Exception as error:  # timm or torch reading a damaged file whose keys read fine: any error type
        if not pretrained or isinstance(error, WeightsError):
            raise
        path = kwargs["pretrained_cfg_overlay"]["file"]
        msg = f"{path} is damaged ({type(error).__name__}: {error}): delete it and fetch it again"
        raise WeightsError(msg) from error


@register_model
def contnet_ti(pretrained: bool = False, **kwargs: Any) -> ConTNet:
    """ConTNet-Ti (5.9 M parameters with the head); no stable download, weights from a file or the cache."""
    return _create_contnet("contnet_ti", pretrained, **kwargs)


@register_model
def contnet_s(pretrained: bool = False, **kwargs: Any) -> ConTNet:
    """ConTNet-S (10.1 M parameters with the head); no stable download, weights from a file or the cache."""
    return _create_contnet("contnet_s", pretrained, **kwargs)


@register_model
def contnet_m(pretrained: bool = False, **kwargs: Any) -> ConTNet:
    """ConTNet-M (19.5 M parameters with the head)."""
    return _create_contnet("contnet_m", pretrained, **kwargs)


@register_model
def contnet_b(pretrained: bool = False, **kwargs: Any) -> ConTNet:
    """ConTNet-B (36.0 M parameters with the head), the backbone of the paper; its download is the avg-down network."""
    return _create_contnet("contnet_b", pretrained, **kwargs)
