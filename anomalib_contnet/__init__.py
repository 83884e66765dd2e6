"""anomalib-contnet: ConTNet-B + per-patch Gaussians (Dini & Rahtu, VISAPP 2023) as an anomalib plugin.

Importing this package registers ``ConTNetPaDiM`` (and the ``MVTec`` datamodule
alias) with anomalib; an installed copy does so automatically whenever
``anomalib.models`` is imported (see ``anomalib_contnet_autoload``).
"""

from anomalib_contnet.backbones import timm_contnet  # noqa: F401  (registers contnet_* with timm)
from anomalib_contnet.models import ConTNetPaDiM, ConTNetPaDiMModel, NonFiniteError, NotFittedError
from anomalib_contnet.registration import MVTec, register

__version__ = "0.1.0"
__all__ = ["ConTNetPaDiM", "ConTNetPaDiMModel", "MVTec", "NonFiniteError", "NotFittedError", "__version__"]

register()
