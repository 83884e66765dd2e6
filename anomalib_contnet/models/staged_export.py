"""Exports that replace an older export whole: written beside the target, then renamed into place.

anomalib's exporters (``Engine.export``, ``anomalib export``) write straight into
``<export_root>/weights/<type>/``, file by file, so a failed re-export leaves old and new
files side by side, which may still load and give wrong scores. Here the exporter writes
into a hidden folder beside the target, swapped in once the export has finished.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from anomalib.deploy import CompressionType, ExportType
from anomalib.models.components.base.export_mixin import ExportMixin

from anomalib_contnet.atomic_files import replace_folder

__all__ = ["AtomicExportMixin"]

ONNX_EXPORT_DEFAULTS = {"opset_version": 18, "verbose": False}
"""What ``torch.onnx.export`` is asked for unless the caller says otherwise.

torch's exporter implements opset 18 and newer only. anomalib asks for 14, so torch
exports at 18 and then tries to convert down, which fails on ``Pad`` and keeps 18
after logging a long traceback: asking for 18 gives the same model without that noise.
``verbose=False`` leaves out its progress lines, which nobody can act on.
"""
INT8_PTQ_REFUSAL = (
    "compression_type INT8_PTQ is refused for this model: 8-bit activations perturb the patch features, the "
    "Mahalanobis distance amplifies that noise (up to 1/sqrt(epsilon) = 10x in directions the training images do "
    "not span), and the exported thresholds and min/max were learned on exact distances. Measured on textures "
    "(docs/export.md): scores off by ~80-95 % of their range and about half the image labels flipped. Use "
    "CompressionType.INT8 (8-bit weights only, 4x smaller than FP32) or CompressionType.FP16 (2x smaller, error ~2e-3)."
)


STAGING_PREFIX = ".staging-"
"""Staging folders are named ``.staging-<type>-<process id>-<random>`` beside the export folders."""


def _remove_abandoned_staging(folder: Path) -> None:
    """Delete the staging folders under ``folder`` whose export process has gone (killed before its clean-up).

    The process id in the name tells a running export (another process) from an abandoned
    one; without POSIX process ids (Windows) nothing is removed.
    """
    if os.name != "posix":
        return
    for staging in folder.glob(f"{STAGING_PREFIX}*"):
        fields = staging.name.removeprefix(STAGING_PREFIX).split("-")
        if len(fields) < 3 or not fields[1].isdigit():
            continue
        try:
            os.kill(int(fields[1]), 0)  # signal 0: only asks whether the process exists
        except ProcessLookupError:
            shutil.rmtree(staging, ignore_errors=True)
        except PermissionError:  # it exists, under another user
            continue


def _export_staged(export: Callable[[Path], Path], export_root: Path | str, export_type: ExportType) -> Path:
    """Run ``export(staging_root)``, then swap the ``weights/<type>`` it wrote in for the one under ``export_root``."""
    target = Path(export_root) / "weights" / export_type.value
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_abandoned_staging(target.parent)
    prefix = f"{STAGING_PREFIX}{export_type.value}-{os.getpid()}-"
    with tempfile.TemporaryDirectory(prefix=prefix, dir=target.parent) as staging:
        written = export(Path(staging))
        replace_folder(Path(staging) / "weights" / export_type.value, target)
    return target / written.name


class AtomicExportMixin(ExportMixin):
    """anomalib's ``to_torch`` / ``to_onnx`` / ``to_openvino``, each replacing an older export whole.

    ``Engine.export`` and the stock ``anomalib export`` command call these methods, so
    both get staged exports. ONNX and OpenVINO exports use :data:`ONNX_EXPORT_DEFAULTS`,
    and ``INT8_PTQ`` is refused (:data:`INT8_PTQ_REFUSAL`).
    """

    def to_torch(self, export_root: Path | str, model_file_name: str = "model") -> Path:
        """Export the whole module as ``<export_root>/weights/torch/<name>.pt`` (for anomalib's TorchInferencer)."""
        export = partial(super().to_torch, model_file_name=model_file_name)
        return _export_staged(export, export_root, ExportType.TORCH)

    def to_onnx(
        self,
        export_root: Path | str,
        model_file_name: str = "model",
        input_size: tuple[int, int] | None = None,
        **kwargs: Any,
    ) -> Path:
        """Export ``<export_root>/weights/onnx/<name>.onnx`` (with its external data file next to it)."""
        kwargs = ONNX_EXPORT_DEFAULTS | kwargs
        export = partial(super().to_onnx, model_file_name=model_file_name, input_size=input_size, **kwargs)
        return _export_staged(export, export_root, ExportType.ONNX)

    def to_openvino(self, export_root: Path | str, model_file_name: str = "model", **options: Any) -> Path:
        """Export ``<export_root>/weights/openvino/<name>.xml`` and ``.bin`` (options as anomalib's ``to_openvino``)."""
        if options.get("compression_type") == CompressionType.INT8_PTQ:
            raise ValueError(INT8_PTQ_REFUSAL)
        onnx_kwargs = ONNX_EXPORT_DEFAULTS | dict(options.pop("onnx_kwargs", None) or {})
        export = partial(super().to_openvino, model_file_name=model_file_name, onnx_kwargs=onnx_kwargs, **options)
        return _export_staged(export, export_root, ExportType.OPENVINO)
