"""Anomaly models provided by this plugin."""

from anomalib_contnet.models.contnet_padim import ConTNetPaDiM, ConTNetPaDiMModel, NonFiniteError, NotFittedError

__all__ = ["ConTNetPaDiM", "ConTNetPaDiMModel", "NonFiniteError", "NotFittedError"]
