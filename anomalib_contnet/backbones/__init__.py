"""Backbones: ConTNet (:mod:`.contnet`, its variants in :mod:`.contnet_configs`) and its ImageNet weights.

:mod:`.cpu_inference` holds the network's CPU kernel choices, :mod:`.weight_files` finds, downloads
and caches the checkpoint files, :mod:`.timm_contnet` registers ConTNet with timm and loads them,
:mod:`.weights_cli` is ``anomalib-contnet weights``. This package imports none of them itself,
so ``anomalib-contnet weights list`` runs without torch.
"""
