"""Exports that replace an older export whole: written beside the target, then renamed into place.

anomalib's exporters (``Engine.export``, ``anomalib export``) write straight into
``<export_root>/weights/<type>/``. Re-exporting over an older export overwrites its
files one at a time (``model.xml`` before ``model.bin``, ``model.onnx`` before
``model.onnx.data``) and keeps any file the new export does not write, so an
interrupted or failed export leaves old and new files side by side, which may
still load and then give wrong scores.

Here the exporter writes into a fresh hidden folder next to the target, on the same
file system. Only when it has finished is a manifest added (name, size and SHA-256
of every file; :func:`anomalib_contnet.deploy.check_export` reads it) and the
folder renamed into place, after the older folder has been renamed out of the way.
Between those two renames the target is briefly absent, never mixed; a failed
export leaves the older one untouched. Programs that are loading from the folder
while it is replaced can still read one file from each export: serve from a
new folder per export rather than re-exporting under a running service.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from anomalib.deploy import CompressionType, ExportType
from anomalib.models.components.base.export_mixin import ExportMixin

from anomalib_contnet.atomic_files import file_sha256, replace_folder

__all__ = [
    "INT8_PTQ_REFUSAL",
    "MANIFEST_FORMAT",
    "MANIFEST_NAME",
    "ONNX_OPSET",
    "STAGING_PREFIX",
    "AtomicExportMixin",
    "export_folder",
    "staged_export",
]

MANIFEST_NAME = "export_manifest.json"
"""File, inside an export folder, listing the files that belong to that export."""
MANIFEST_FORMAT = 1
"""Bumped whenever the manifest changes meaning; :func:`check_export` refuses newer formats."""
STAGING_PREFIX = ".staging-"
"""Prefix of the hidden folders, beside the export folder, in which exports are written."""
ONNX_OPSET = 18
"""ONNX opset requested from ``torch.onnx.export``.

torch's exporter implements opset 18 and newer only. anomalib asks for 14, so torch
exports at 18 and then tries to convert down, which fails on ``Pad`` and keeps 18
after logging a long traceback. Asking for 18 gives the same model without that noise.
"""
INT8_PTQ_REFUSAL = (
    "compression_type INT8_PTQ is refused for this model: 8-bit activations perturb the patch features, the "
    "Mahalanobis distance amplifies that noise (up to 1/sqrt(epsilon) = 10x in directions the training images do "
    "not span), and the exported thresholds and min/max were learned on exact distances. Measured on textures "
    "(docs/export.md): scores off by ~80-95 % of their range and about half the image labels flipped. Use "
    "CompressionType.INT8 (8-bit weights only, 4x smaller than FP32) or CompressionType.FP16 (2x smaller, error ~2e-3)."
)


def export_folder(export_root: Path | str, export_type: ExportType | str) -> Path:
    """The folder that anomalib's exporters fill: ``<export_root>/weights/<type>``."""
    return Path(export_root) / "weights" / ExportType(export_type).value


def write_manifest(folder: Path, export_type: ExportType | str) -> Path:
    """Record name, size and SHA-256 of every file of the finished export in ``folder``."""
    entries = sorted(folder.iterdir())
    unexpected = [entry.name for entry in entries if not entry.is_file()]
    if unexpected:
        msg = f"the exporter wrote {unexpected} in {folder}, which are not plain files; refusing to publish this export"
        raise RuntimeError(msg)
    files = {
        entry.name: {"bytes": entry.stat().st_size, "sha256": file_sha256(entry)}
        for entry in entries
        if entry.name != MANIFEST_NAME
    }
    manifest: dict[str, Any] = {"format": MANIFEST_FORMAT, "export_type": ExportType(export_type).value, "files": files}
    path = folder / MANIFEST_NAME
    path.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return path


@contextmanager
def staged_export(export_root: Path | str, export_type: ExportType | str) -> Iterator[Path]:
    """Yield a temporary export root; on normal exit its export replaces ``export_folder(export_root, type)`` whole.

    The caller exports into the yielded folder exactly as into ``export_root``
    (anomalib's exporters add ``weights/<type>`` themselves). If the block raises,
    the older export is left as it was and the temporary folder is deleted.
    """
    export_type = ExportType(export_type)
    target = export_folder(export_root, export_type)
    if target.exists() and not target.is_dir():
        msg = f"{target} exists and is not a folder; move it away before exporting there"
        raise FileExistsError(msg)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{export_type.value}-", dir=target.parent))
    try:
        yield staging
        produced = export_folder(staging, export_type)
        if not produced.is_dir() or not any(produced.iterdir()):
            msg = f"the {export_type.value} exporter finished without writing any file into {produced}"
            raise RuntimeError(msg)
        write_manifest(produced, export_type)
        replace_folder(produced, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


class AtomicExportMixin(ExportMixin):
    """anomalib's ``to_torch`` / ``to_onnx`` / ``to_openvino``, each replacing an older export whole.

    ``Engine.export`` and the stock ``anomalib export`` command call these methods,
    so a model class that lists this mixin before ``AnomalibModule`` in its bases
    gets staged exports with a manifest from both, without any change on the caller's side.
    The ONNX opset defaults to :data:`ONNX_OPSET` (the one torch produces anyway). Meant for
    Mahalanobis-distance models like ConTNetPaDiM, whose exports refuse INT8 post-training quantisation.
    """

    def to_torch(self, export_root: Path | str, model_file_name: str = "model") -> Path:
        """Export the whole module as ``<export_root>/weights/torch/<name>.pt`` (for anomalib's TorchInferencer)."""
        with staged_export(export_root, ExportType.TORCH) as staging:
            written = super().to_torch(staging, model_file_name)
        return export_folder(export_root, ExportType.TORCH) / written.name

    def to_onnx(
        self,
        export_root: Path | str,
        model_file_name: str = "model",
        input_size: tuple[int, int] | None = None,
        **kwargs: Any,
    ) -> Path:
        """Export ``<export_root>/weights/onnx/<name>.onnx`` (with its external data file next to it)."""
        kwargs.setdefault("opset_version", ONNX_OPSET)
        with staged_export(export_root, ExportType.ONNX) as staging:
            written = super().to_onnx(staging, model_file_name, input_size, **kwargs)
        return export_folder(export_root, ExportType.ONNX) / written.name

    def to_openvino(
        self,
        export_root: Path | str,
        model_file_name: str = "model",
        **options: Any,
    ) -> Path:
        """Export ``<export_root>/weights/openvino/<name>.xml`` and ``.bin`` (options as anomalib's ``to_openvino``).

        ``INT8_PTQ`` is refused with the reason (:data:`INT8_PTQ_REFUSAL`): it would give
        wrong labels for Mahalanobis-distance models such as ConTNetPaDiM.
        """
        if options.get("compression_type") == CompressionType.INT8_PTQ:
            raise ValueError(INT8_PTQ_REFUSAL)
        onnx_kwargs = dict(options.pop("onnx_kwargs", None) or {})
        onnx_kwargs.setdefault("opset_version", ONNX_OPSET)
        with staged_export(export_root, ExportType.OPENVINO) as staging:
            written = super().to_openvino(staging, model_file_name, onnx_kwargs=onnx_kwargs, **options)
        return export_folder(export_root, ExportType.OPENVINO) / written.name
