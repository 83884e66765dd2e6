"""ConTNet in timm's model registry: ``timm.create_model("contnet_b", ...)`` as for any timm backbone.

Importing this module registers ``contnet_ti``, ``contnet_s``, ``contnet_m`` and
``contnet_b`` the way timm's own model files do: one default config per variant
(:data:`default_cfgs`, with the published download where one exists), a
``register_model`` entry point each, and timm's ``build_model_with_cfg`` with a
checkpoint filter. ``import anomalib_contnet`` imports it, and anomalib imports
the plugin whenever ``anomalib.models`` loads, so every anomalib model that takes
a timm backbone name (Padim, Patchcore, ...) accepts ``contnet_*``. It is not
imported by :mod:`anomalib_contnet.backbones` itself, so the ``weights`` commands
keep running without timm.

``feature_info`` names the five stages ``layer0`` .. ``layer4`` with their
channels and reductions (4, 8, 16, 32, 32), so
``timm.create_model("contnet_b", features_only=True, out_indices=(2, 3))`` gives
``layer2`` and ``layer3``; anomalib's ``TimmFeatureExtractor`` maps the names it
is given to those indices.

``pretrained=True`` never goes to the Hugging Face Hub and never falls back to
random weights. The file is found by the package's own lookup
(:func:`~anomalib_contnet.backbones.weights.resolve_weights`): an explicit
``pretrained_cfg_overlay=dict(file=...)`` (or ``url=...``), else
``$ANOMALIB_CONTNET_WEIGHTS``, the cache, the published URL (not when offline);
a missing file raises :class:`~anomalib_contnet.backbones.weights.WeightsError`
at once with the steps that fix it. The file's shortcut spelling decides which
of the two shortcut networks is built (see
:func:`~anomalib_contnet.backbones.contnet_configs.shortcut_of_state_dict`), and the
filter checks every key, shape and value before timm loads it.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from timm.models import (
    build_model_with_cfg,
    generate_default_cfgs,
    get_pretrained_cfg,
    register_model,
    resolve_pretrained_cfg,
)

from anomalib_contnet.backbones.contnet import ConTNet, checkpoint_filter_fn, contnet_from_config
from anomalib_contnet.backbones.contnet_configs import CONTNET_CFGS, SHORTCUT_LABELS
from anomalib_contnet.backbones.weight_files import AUTHORS_REPOSITORY, PUBLISHED_WEIGHTS, WeightsError
from anomalib_contnet.backbones.weights import locate_checkpoint, validated_state_dict

__all__: list[str] = []  # register_model appends the entry points

logger = logging.getLogger(__name__)


def _cfg(url: str | None = None, **kwargs: Any) -> dict[str, Any]:
    """Default config of a ConTNet variant: the authors' ImageNet preprocessing and the 1000-class head."""
    return {
        "url": url,
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": (7, 7),
        "crop_pct": 0.875,  # resize 256, center crop 224
        "interpolation": "bilinear",
        "mean": (0.485, 0.456, 0.406),
        "std": (0.229, 0.224, 0.225),
        "first_conv": "layer0.conv.conv",
        "classifier": "fc",
        "origin_url": AUTHORS_REPOSITORY,
        "paper_ids": "arXiv:2104.13497",
        **kwargs,
    }


default_cfgs = generate_default_cfgs(
    {
        "contnet_ti": _cfg(),
        "contnet_s": _cfg(),
        "contnet_m": _cfg(url=PUBLISHED_WEIGHTS["contnet_m"].url),
        "contnet_b": _cfg(url=PUBLISHED_WEIGHTS["contnet_b"].url),
    }
)
"""Ti and S have no stable download: their weights come from a file, the variable or the cache only."""


def _explicit_weights(variant: str, pretrained_cfg: Any, overlay: dict[str, Any] | None) -> str | None:
    """The file or URL the caller named through timm's config arguments; None means the package's default lookup."""
    cfg = resolve_pretrained_cfg(variant, pretrained_cfg=pretrained_cfg, pretrained_cfg_overlay=overlay)
    if cfg.state_dict is not None or cfg.hf_hub_id:
        msg = (
            f"{variant}: ConTNet weights load from a checkpoint file or URL only "
            f"(pretrained_cfg_overlay=dict(file=PATH)); state_dict and hf_hub_id sources are not supported"
        )
        raise WeightsError(msg)
    if cfg.file:
        return os.fspath(cfg.file)
    if cfg.url and cfg.url != get_pretrained_cfg(variant).url:
        return str(cfg.url)
    return None


def _create_contnet(variant: str, pretrained: bool = False, **kwargs: Any) -> ConTNet:
    """Build any variant with timm's builder; with ``pretrained`` the checkpoint is located and read first.

    Reading first is what lets the checkpoint choose the shortcut network
    (``avg_down``) before the model exists; timm then loads the same file
    through the validating filter. ``features_only`` models are built without
    the classifier, which they would drop anyway.
    """
    if kwargs.get("features_only"):
        kwargs.setdefault("num_classes", 0)
    checkpoint_filter = checkpoint_filter_fn
    if pretrained:
        overlay = kwargs.pop("pretrained_cfg_overlay", None)
        explicit = _explicit_weights(variant, kwargs.get("pretrained_cfg"), overlay)
        path, _, avg_down = locate_checkpoint(variant, explicit, avg_down=kwargs.get("avg_down"))
        kwargs["avg_down"] = CONTNET_CFGS[variant].avg_down if avg_down is None else avg_down
        logger.info("building %s with the %s shortcut for %s", variant, SHORTCUT_LABELS[kwargs["avg_down"]], path)
        kwargs["pretrained_cfg_overlay"] = dict(overlay or {}, file=str(path))

        def checkpoint_filter(state_dict: dict[str, Any], model: ConTNet) -> dict[str, Any]:
            return validated_state_dict(model, state_dict, path)

    return build_model_with_cfg(
        contnet_from_config,
        variant,
        pretrained,
        model_cfg=CONTNET_CFGS[variant],
        pretrained_filter_fn=checkpoint_filter,
        feature_cfg={"flatten_sequential": False},  # keep the stages whole: feature_info names layer0..layer4
        **kwargs,
    )


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
