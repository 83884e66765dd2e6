"""Check an exported model before loading it, with errors that say what is wrong and what to do.

Exports themselves are anomalib's (``Engine.export``, ``anomalib export``), and so are
the inferencers (``OpenVINOInferencer``, ``TorchInferencer``). Those pass files straight
to OpenVINO or ``torch.load``, whose errors name C++ source lines ("Error parsing
element attribute at offset 5001") rather than the problem. :func:`check_export`
names it: a missing companion (``.bin`` of an ``.xml``, the external data of an
``.onnx``), a truncated or unparsable file, a damaged torch archive.
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from xml.etree import ElementTree

__all__ = ["ExportCheckError", "check_export"]

_REEXPORT_HINT = (
    "Export the model again (`anomalib export --model ConTNetPaDiM --ckpt_path <checkpoint> --export_type <type>` "
    "or Engine.export) and load the new files."
)


class ExportCheckError(RuntimeError):
    """An exported model is missing, incomplete or corrupted."""


def check_export(path: Path | str) -> Path:
    """Check the exported model at ``path`` and return the file to give to anomalib's inferencer.

    Args:
        path: ``model.xml`` or ``model.bin`` (OpenVINO), ``model.onnx``, or ``model.pt`` (torch).

    Raises:
        ExportCheckError: the export cannot be loaded as it is; the message says why and what to do.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in {".xml", ".bin", ".onnx", ".pt", ".pth"}:
        msg = f"{path}: not an exported model file; expected model.xml / model.bin (OpenVINO), model.onnx or model.pt"
        raise ExportCheckError(msg)
    model_file = path.with_suffix(".xml") if suffix == ".bin" else path
    if not model_file.is_file():
        present = sorted(entry.name for entry in model_file.parent.iterdir()) if model_file.parent.is_dir() else []
        msg = f"{model_file} does not exist (its folder holds {present or 'nothing'}). {_REEXPORT_HINT}"
        raise ExportCheckError(msg)
    if model_file.suffix.lower() == ".xml":
        _check_openvino_ir(model_file)
    elif model_file.suffix.lower() == ".onnx":
        _check_onnx(model_file)
    else:
        _check_torch_archive(model_file)
    return model_file


def _check_openvino_ir(xml_file: Path) -> None:
    """The XML parses, its ``.bin`` exists and holds every constant the XML points into."""
    bin_file = xml_file.with_suffix(".bin")
    if not bin_file.is_file():
        msg = f"{bin_file} is missing: an OpenVINO model needs both {xml_file.name} and {bin_file.name}. "
        raise ExportCheckError(msg + _REEXPORT_HINT)
    try:
        root = ElementTree.parse(xml_file).getroot()
    except ElementTree.ParseError as error:
        msg = f"{xml_file} is not valid XML ({error}): it is truncated or corrupted. {_REEXPORT_HINT}"
        raise ExportCheckError(msg) from error
    constants = (data for data in root.iter("data") if "offset" in data.attrib and "size" in data.attrib)
    needed = max((int(data.get("offset", 0)) + int(data.get("size", 0)) for data in constants), default=0)
    size = bin_file.stat().st_size
    if root.tag != "net" or size < needed:
        msg = (
            f"{bin_file} has {size} bytes but {xml_file.name} reads up to byte {needed}, or {xml_file.name} is no "
            f"OpenVINO model: the files are truncated or belong to different exports. {_REEXPORT_HINT}"
        )
        raise ExportCheckError(msg)


def _check_onnx(onnx_file: Path) -> None:
    """The graph parses and every external-data file it names exists and is long enough."""
    import onnx  # noqa: PLC0415 (only needed for ONNX exports)
    from google.protobuf.message import DecodeError  # noqa: PLC0415

    try:
        model = onnx.load(onnx_file, load_external_data=False)
    except (DecodeError, ValueError, OSError) as error:
        msg = f"{onnx_file} is not a readable ONNX model ({error}): it is truncated or corrupted. {_REEXPORT_HINT}"
        raise ExportCheckError(msg) from error
    for tensor in model.graph.initializer:
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {entry.key: entry.value for entry in tensor.external_data}
        data_file = onnx_file.parent / info["location"]
        end = int(info.get("offset", 0)) + int(info.get("length", 0))
        if not data_file.is_file() or data_file.stat().st_size < end:
            msg = f"{data_file} is missing or truncated: {onnx_file.name} keeps its weights there. {_REEXPORT_HINT}"
            raise ExportCheckError(msg)


def _check_torch_archive(torch_file: Path) -> None:
    """``torch.save`` writes a zip archive: it must open, and every member must match its CRC."""
    try:
        with zipfile.ZipFile(torch_file) as archive:
            damaged = archive.testzip()
    except (zipfile.BadZipFile, OSError) as error:
        msg = f"{torch_file} is not a complete torch.save archive ({error}): it is truncated or corrupted. "
        raise ExportCheckError(msg + _REEXPORT_HINT) from error
    if damaged is not None:
        msg = f"{torch_file} is corrupted (member {damaged} fails its CRC check). {_REEXPORT_HINT}"
        raise ExportCheckError(msg)
