"""Backbones: a ConTNet implementation that loads the published checkpoints, and its weight management.

Modules: :mod:`.contnet_configs` (the variant table, no torch), :mod:`.contnet` (the network),
:mod:`.weight_files` (finding, downloading and caching checkpoint files, no torch), :mod:`.weights`
(reading, checking and loading them) and :mod:`.timm_contnet` (the timm registration, imported by
``import anomalib_contnet``). This package imports none of them itself, so ``anomalib-contnet weights
list`` runs without torch.
"""
