"""``export_model``: anomalib's ``Engine.export`` with an export folder that is always whole."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from anomalib.deploy import CompressionType, ExportType

from anomalib_contnet.models.staged_export import ONNX_OPSET, AtomicExportMixin, export_folder, staged_export

if TYPE_CHECKING:
    from anomalib.data import AnomalibDataModule
    from anomalib.engine import Engine
    from anomalib.models import AnomalibModule

__all__ = ["export_model"]

_CALIBRATED = {CompressionType.INT8_PTQ, CompressionType.INT8_ACQ}


def export_model(
    model: AnomalibModule,
    export_type: ExportType | str,
    export_root: Path | str,
    *,
    compression_type: CompressionType | str | None = None,
    datamodule: AnomalibDataModule | None = None,
    input_size: tuple[int, int] | None = None,
    model_file_name: str = "model",
    engine: Engine | None = None,
    onnx_kwargs: dict[str, Any] | None = None,
    ov_kwargs: dict[str, Any] | None = None,
) -> Path:
    """Export a trained model into ``<export_root>/weights/<type>/``, replacing an older export there whole.

    The files are those of ``Engine.export`` (pre-processing, model and post-processing
    in one graph; with ``input_size=None`` the graph takes any image size and batch
    size and resizes inside), plus ``export_manifest.json`` for
    :func:`~anomalib_contnet.deploy.check_export`. Works for any anomalib model;
    ConTNetPaDiM stages its own exports, so ``Engine.export`` and ``anomalib export``
    behave the same for it.

    Args:
        model: the trained model (e.g. ``ConTNetPaDiM.load_from_checkpoint(path)``).
        export_type: ``torch``, ``onnx`` or ``openvino``.
        export_root: folder that receives ``weights/<type>/``.
        compression_type: OpenVINO only: ``fp16`` (half-size weights), ``int8`` (8-bit weights),
            ``int8_ptq`` / ``int8_acq`` (8-bit activations too; need ``datamodule``). See docs/export.md
            for what each does to ConTNetPaDiM's scores.
        datamodule: calibration data for ``int8_ptq`` / ``int8_acq``.
        input_size: fix the input height and width instead of accepting any size.
        model_file_name: file name without extension.
        engine: the Engine to export with (a quiet default one otherwise).
        onnx_kwargs: extra ``torch.onnx.export`` options (the opset defaults to 18).
        ov_kwargs: extra ``openvino.convert_model`` options.

    Returns:
        Path of the exported model file (``.pt``, ``.onnx`` or ``.xml``), ready for anomalib's inferencers.
    """
    export_type = ExportType(export_type)
    compression = None if compression_type is None else CompressionType(compression_type)
    if compression is not None and export_type != ExportType.OPENVINO:
        msg = f"compression_type={compression.value!r} applies to OpenVINO exports only, not {export_type.value!r}"
        raise ValueError(msg)
    if compression in _CALIBRATED and datamodule is None:
        msg = f"compression_type={compression.value!r} calibrates on images: pass datamodule=<your datamodule>"
        raise ValueError(msg)
    if engine is None:
        from anomalib.engine import Engine  # noqa: PLC0415 (heavy; only needed when the caller has none)

        engine = Engine(default_root_dir=export_root, logger=False, enable_progress_bar=False)
    options: dict[str, Any] = {
        "model": model,
        "export_type": export_type,
        "model_file_name": model_file_name,
        "input_size": input_size,
        "compression_type": compression,
        "datamodule": datamodule,
        "ov_kwargs": ov_kwargs,
        "onnx_kwargs": {"opset_version": ONNX_OPSET, **(onnx_kwargs or {})},
    }
    if isinstance(model, AtomicExportMixin):
        written = engine.export(export_root=export_root, **options)
    else:
        with staged_export(export_root, export_type) as staging:
            written = engine.export(export_root=staging, **options)
    if written is None:
        msg = f"Engine.export wrote no {export_type.value} model (see the log above)"
        raise RuntimeError(msg)
    return export_folder(export_root, export_type) / Path(written).name
