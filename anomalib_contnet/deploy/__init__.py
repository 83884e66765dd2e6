"""Export and deployment helpers around anomalib's own exporters and inferencers.

- :func:`export_model`: ``Engine.export`` that replaces an older export whole and
  records a manifest; ConTNetPaDiM's ``Engine.export`` / ``anomalib export`` do
  the same through :class:`~anomalib_contnet.models.staged_export.AtomicExportMixin`.
- :func:`check_export`: clear errors for missing, truncated, corrupted or mixed
  export files, to call before ``OpenVINOInferencer`` / ``TorchInferencer``.

Inference itself uses anomalib's ``OpenVINOInferencer`` and ``TorchInferencer``
unchanged; see docs/export.md for the OpenVINO precision setting to pass.
"""

from anomalib_contnet.deploy.check import ExportCheckError, check_export
from anomalib_contnet.deploy.export import export_model
from anomalib_contnet.models.staged_export import MANIFEST_NAME

__all__ = ["MANIFEST_NAME", "ExportCheckError", "check_export", "export_model"]
