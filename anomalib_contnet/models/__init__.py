"""Anomaly models provided by this plugin."""

from anomalib_contnet.models.contnet_padim import ConTNetPaDiM, ConTNetPaDiMModel, NotFittedError

__all__ = ["ConTNetPaDiM", "ConTNetPaDiMModel", "NotFittedError"]
