"""ConTNetPaDiM: ConTNet-B patch features with per-position Gaussians (Dini & Rahtu, VISAPP 2023)."""

from anomalib_contnet.models.contnet_padim.lightning_model import ConTNetPaDiM
from anomalib_contnet.models.contnet_padim.torch_model import ConTNetPaDiMModel, NonFiniteError, NotFittedError

__all__ = ["ConTNetPaDiM", "ConTNetPaDiMModel", "NonFiniteError", "NotFittedError"]
