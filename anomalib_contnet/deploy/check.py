"""Check an exported model before loading it, with errors that say what is wrong and what to do.

anomalib's inferencers pass files straight to OpenVINO or ``torch.load``, whose
errors name C++ source lines ("Error parsing element attribute at offset 5001",
"Invalid usage of method for externally stored data") rather than the problem,
and a weight file damaged without changing its size loads silently and gives
wrong scores. :func:`check_export` finds missing companions (``.bin`` of an
``.xml``, the external data of an ``.onnx``), truncated or unparsable files and,
for exports that carry a manifest (written by :mod:`anomalib_contnet.deploy`),
any file whose size or SHA-256 differs from what the export wrote.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from xml.etree import ElementTree

from anomalib_contnet.atomic_files import file_sha256
from anomalib_contnet.models.staged_export import MANIFEST_FORMAT, MANIFEST_NAME, STAGING_PREFIX

__all__ = ["ExportCheckError", "check_export"]

_REEXPORT_HINT = (
    "Export the model again (`anomalib export --model ConTNetPaDiM --ckpt_path <checkpoint> --export_type <type>` "
    "or anomalib_contnet.deploy.export_model) and load the new files."
)


class ExportCheckError(RuntimeError):
    """An exported model is missing, incomplete, corrupted or mixed with files of another export."""


def check_export(path: Path | str, *, verify_checksums: bool = True) -> Path:
    """Check the exported model at ``path`` and return the file to give to anomalib's inferencer.

    Args:
        path: ``model.xml`` or ``model.bin`` (OpenVINO), ``model.onnx``, or ``model.pt`` (torch).
        verify_checksums: also compare every file's SHA-256 with the manifest (about a second
            per gigabyte); without a manifest, torch archives are still checked against their CRCs.

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
        raise ExportCheckError(_missing_message(model_file))
    manifest = model_file.parent / MANIFEST_NAME
    if manifest.exists():
        _check_against_manifest(model_file, manifest, verify_checksums)
    if model_file.suffix.lower() == ".xml":
        _check_openvino_ir(model_file)
    elif model_file.suffix.lower() == ".onnx":
        _check_onnx(model_file)
    else:
        _check_torch_archive(model_file, verify_checksums)
    return model_file


def _missing_message(model_file: Path) -> str:
    folder = model_file.parent
    interrupted = sorted(folder.parent.glob(f"{STAGING_PREFIX}*")) if folder.parent.is_dir() else []
    detail = f"{model_file} does not exist"
    if interrupted:
        detail += f" and {interrupted[0]} is left from an export that did not finish"
    elif folder.is_dir():
        present = sorted(entry.name for entry in folder.iterdir())
        detail += f" (the folder holds {present or 'nothing'})"
    return f"{detail}. {_REEXPORT_HINT}"


def _check_against_manifest(model_file: Path, manifest: Path, verify_checksums: bool) -> None:
    """Every file the export wrote is present, unchanged, and the model file is one of them."""
    try:
        content = json.loads(manifest.read_text(encoding="utf-8"))
        files = content["files"]
        version = content["format"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        msg = f"{manifest} is unreadable ({error}): the export in {model_file.parent} is incomplete. {_REEXPORT_HINT}"
        raise ExportCheckError(msg) from error
    if not isinstance(version, int) or version > MANIFEST_FORMAT:
        msg = (
            f"{manifest} has format {version!r}, newer than this anomalib-contnet reads ({MANIFEST_FORMAT}); "
            "upgrade anomalib-contnet: pip install -U anomalib-contnet"
        )
        raise ExportCheckError(msg)
    if model_file.name not in files:
        msg = (
            f"{model_file.name} is not one of the files of the export recorded in {manifest} ({sorted(files)}): "
            f"it comes from another export. {_REEXPORT_HINT}"
        )
        raise ExportCheckError(msg)
    for name, expected in sorted(files.items()):
        file = model_file.parent / name
        if not file.is_file():
            msg = f"{file} is missing, but the export wrote it. {_REEXPORT_HINT}"
            raise ExportCheckError(msg)
        size = file.stat().st_size
        if size != expected["bytes"]:
            msg = f"{file} has {size} bytes, the export wrote {expected['bytes']}: it is truncated or replaced. "
            raise ExportCheckError(msg + _REEXPORT_HINT)
        if verify_checksums and file_sha256(file) != expected["sha256"]:
            msg = f"{file} differs from the file the export wrote (SHA-256 mismatch): it is corrupted. {_REEXPORT_HINT}"
            raise ExportCheckError(msg)


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
    if root.tag != "net":
        msg = f"{xml_file} is XML but not an OpenVINO model (root element <{root.tag}>, expected <net>)"
        raise ExportCheckError(msg)
    constants = (data for data in root.iter("data") if "offset" in data.attrib and "size" in data.attrib)
    needed = max((int(data.get("offset", 0)) + int(data.get("size", 0)) for data in constants), default=0)
    size = bin_file.stat().st_size
    if size < needed:
        msg = (
            f"{bin_file} has {size} bytes but {xml_file.name} reads up to byte {needed}: the weights are truncated "
            f"or belong to another export. {_REEXPORT_HINT}"
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
    needed: dict[str, int] = {}
    for tensor in model.graph.initializer:
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {entry.key: entry.value for entry in tensor.external_data}
        end = int(info.get("offset", 0)) + int(info.get("length", 0))
        needed[info["location"]] = max(needed.get(info["location"], 0), end)
    for location, end in sorted(needed.items()):
        data_file = onnx_file.parent / location
        if not data_file.is_file():
            msg = f"{data_file} is missing: {onnx_file.name} keeps its weights there. {_REEXPORT_HINT}"
            raise ExportCheckError(msg)
        size = data_file.stat().st_size
        if size < end:
            msg = f"{data_file} has {size} bytes but {onnx_file.name} reads up to byte {end}: it is truncated. "
            raise ExportCheckError(msg + _REEXPORT_HINT)


def _check_torch_archive(torch_file: Path, verify_checksums: bool) -> None:
    """``torch.save`` writes a zip archive: it must open, and with checksums on, every member must match its CRC."""
    try:
        with zipfile.ZipFile(torch_file) as archive:
            damaged = archive.testzip() if verify_checksums else None
    except (zipfile.BadZipFile, OSError) as error:
        msg = f"{torch_file} is not a complete torch.save archive ({error}): it is truncated or corrupted. "
        raise ExportCheckError(msg + _REEXPORT_HINT) from error
    if damaged is not None:
        msg = f"{torch_file} is corrupted (member {damaged} fails its CRC check). {_REEXPORT_HINT}"
        raise ExportCheckError(msg)
