"""Export ConTNetPaDiM to torch / ONNX / OpenVINO and run the exports with anomalib's inferencers.

One ONNX export (Engine.export), one OpenVINO FP32 model converted from it exactly as
anomalib's ``to_openvino`` does, one FP16 export through the stock ``anomalib export``
command and one torch export serve every test; they all come from the session's
``trained_model`` (contnet_ti, random weights, 1152-dimensional Gaussians).

The reference is always the path a model is fitted and tested on: Lightning's batch
hooks (pre-processor callback, ``predict_step``, post-processor callback), and for image
files on disk ``Engine.predict`` itself, never the export path (``model.forward``).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import openvino as ov
import pytest
import torch
from anomalib.data import ImageBatch, PredictDataset
from anomalib.data.utils import read_image
from anomalib.deploy import CompressionType, ExportType, OpenVINOInferencer, TorchInferencer
from PIL import Image
from sklearn.metrics import roc_auc_score

from anomalib_contnet.data.textures import load_texture, render_defective, render_normal, texture_bands
from anomalib_contnet.deploy import ExportCheckError, check_export

pytestmark = pytest.mark.slow

ANOMALIB = str(Path(sys.executable).with_name("anomalib"))
EXACT = {"INFERENCE_PRECISION_HINT": "f32"}
RELATIVE_TOLERANCE = 1e-4
Outputs = dict[str, np.ndarray]


# ------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def test_image_paths(trained_model) -> list[Path]:
    return sorted((trained_model.dataset_root / trained_model.category / "test").glob("*/*.png"))


@pytest.fixture(scope="module")
def test_images(test_image_paths) -> torch.Tensor:
    return torch.stack([read_image(path, as_tensor=True) for path in test_image_paths])


@pytest.fixture(scope="module")
def test_labels(test_image_paths) -> np.ndarray:
    return np.array([path.parent.name != "good" for path in test_image_paths], dtype=int)


@pytest.fixture(scope="module")
def test_masks(test_image_paths) -> np.ndarray:
    """Ground-truth masks at the 224x224 output size (nearest neighbour keeps them binary)."""
    masks = []
    for path in test_image_paths:
        mask_path = path.parents[2] / "ground_truth" / path.parent.name / f"{path.stem}_mask.png"
        mask = Image.open(mask_path).convert("L") if mask_path.exists() else Image.new("L", Image.open(path).size)
        masks.append(np.asarray(mask.resize((224, 224), Image.NEAREST)) > 0)
    return np.stack(masks)


@pytest.fixture(scope="module")
def export_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("exports")


@pytest.fixture(scope="module")
def onnx_path(trained_model, export_root, cli_fp16_export) -> Path:  # noqa: ARG001 (starts the CLI export first)
    """Engine.export to ONNX into a folder that already holds an older, different export."""
    older = export_root / "weights" / "onnx"
    older.mkdir(parents=True)
    (older / "model.onnx").write_bytes(b"an older export")
    (older / "stale_from_older_export.onnx.data").write_bytes(b"x" * 1000)
    path = trained_model.engine.export(trained_model.model, ExportType.ONNX, export_root=export_root)
    assert path == older / "model.onnx"
    return path


@pytest.fixture(scope="module")
def openvino_path(onnx_path, export_root) -> Path:
    """FP32 OpenVINO IR from the ONNX export: the same convert/save calls as anomalib's ``to_openvino``."""
    folder = export_root / "weights" / "openvino"
    folder.mkdir(parents=True)
    ov.save_model(ov.convert_model(onnx_path), folder / "model.xml", compress_to_fp16=False)
    return folder / "model.xml"


@pytest.fixture(scope="module")
def cli_fp16_export(trained_model, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[subprocess.Popen, Path]]:
    """Start an FP16 OpenVINO export by the stock ``anomalib export`` command, from the fixture's checkpoint.

    It runs in its own process while this one exports ONNX: both are mostly single-threaded tracing.
    """
    work = tmp_path_factory.mktemp("cli_export")
    arguments = [
        *("export", "--model", "ConTNetPaDiM", "--model.backbone", "contnet_ti", "--model.pre_trained", "false"),
        *("--ckpt_path", str(trained_model.checkpoint), "--export_type", "openvino", "--compression_type", "FP16"),
        *("--export_root", str(work / "exported")),
    ]
    environment = os.environ | {"HF_HUB_OFFLINE": "1", "ANOMALIB_CONTNET_OFFLINE": "1"}
    log = (work / "export.log").open("w")
    process = subprocess.Popen([ANOMALIB, *arguments], cwd=work, env=environment, stdout=log, stderr=subprocess.STDOUT)
    yield process, work
    process.kill()
    process.wait()
    log.close()


@pytest.fixture(scope="module")
def fp16_path(cli_fp16_export) -> Path:
    process, work = cli_fp16_export
    returncode = process.wait(timeout=600)
    assert returncode == 0, (work / "export.log").read_text()[-5000:]
    return work / "exported" / "weights" / "openvino" / "model.xml"


@pytest.fixture(scope="module")
def torch_path(trained_model, export_root) -> Path:
    return trained_model.engine.export(trained_model.model, ExportType.TORCH, export_root=export_root)


@pytest.fixture(scope="module")
def compiled(openvino_path, onnx_path, fp16_path) -> dict[str, Callable[[np.ndarray], Outputs]]:
    """Runtimes under test, each a function from an image batch to named outputs."""
    core = ov.Core()

    def openvino_runner(path: Path, config: dict[str, str]) -> Callable[[np.ndarray], Outputs]:
        model = core.compile_model(core.read_model(path), "CPU", config)
        return lambda images: {next(iter(port.names)): value for port, value in model(images).items()}

    session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    names = [output.name for output in session.get_outputs()]
    return {
        "onnxruntime": lambda images: dict(zip(names, session.run(None, {"input": images}), strict=True)),
        "openvino-f32": openvino_runner(openvino_path, EXACT),
        "openvino-default": openvino_runner(openvino_path, {}),
        "openvino-fp16-weights-f32": openvino_runner(fp16_path, EXACT),
        "openvino-fp16-weights-default": openvino_runner(fp16_path, {}),
    }


def fitted_path(trained_model, images: torch.Tensor) -> Outputs:
    """What ``Engine.predict`` computes for a batch (not ``model.forward``, which is the export path).

    The pre-processor's and post-processor's batch hooks around ``predict_step``, as Lightning calls them.
    """
    model = trained_model.model
    batch = ImageBatch(image=images.clone())
    with torch.no_grad():
        model.pre_processor.on_predict_batch_start(trained_model.engine.trainer, model, batch, 0)
        outputs = model.predict_step(batch, 0)
        model.post_processor.on_predict_batch_end(trained_model.engine.trainer, model, outputs, batch, 0)
    fields = ("pred_score", "pred_label", "anomaly_map", "pred_mask")
    shapes = {
        "pred_score": (-1, 1),
        "pred_label": (-1, 1),
        "anomaly_map": (-1, 1, 224, 224),
        "pred_mask": (-1, 1, 224, 224),
    }
    return {name: getattr(outputs, name).reshape(shapes[name]).numpy() for name in fields}


def relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
    """Largest absolute difference relative to the largest reference value."""
    return float(np.abs(actual.astype(np.float64) - expected).max() / np.abs(expected).max())


def assert_matches_reference(actual: Outputs, expected: Outputs, pixel_threshold: float) -> None:
    """Scores and maps within 1e-4 relative, labels identical, masks identical away from the threshold.

    A pixel whose reference map value lies within the tolerance of the threshold may land on
    either side after float32 reordering; no other pixel may differ.
    """
    assert set(actual) == set(expected)
    for name in ("pred_score", "anomaly_map"):
        assert actual[name].shape == expected[name].shape, name
        scale = np.abs(expected[name]).max()
        tolerance = RELATIVE_TOLERANCE * scale
        np.testing.assert_allclose(actual[name], expected[name], rtol=RELATIVE_TOLERANCE, atol=tolerance, err_msg=name)
    np.testing.assert_array_equal(actual["pred_label"], expected["pred_label"])
    differing = actual["pred_mask"] != expected["pred_mask"]
    tolerance = RELATIVE_TOLERANCE * np.abs(expected["anomaly_map"]).max()
    on_threshold = np.abs(expected["anomaly_map"] - pixel_threshold) <= tolerance
    assert not (differing & ~on_threshold).any(), f"{int((differing & ~on_threshold).sum())} mask pixels differ"


# --------------------------------------------------------------- export layout
def test_engine_export_replaces_an_older_export_whole(onnx_path) -> None:
    folder = onnx_path.parent
    assert sorted(entry.name for entry in folder.iterdir()) == ["model.onnx", "model.onnx.data"]
    assert not list(folder.parent.glob(".staging-*")), "staging folder left behind"
    assert check_export(onnx_path) == onnx_path


def test_onnx_graph_takes_any_batch_and_image_size_and_resizes_inside(onnx_path) -> None:
    graph = onnx.load(onnx_path, load_external_data=False).graph
    (image_input,) = graph.input
    dims = image_input.type.tensor_type.shape.dim
    assert [dim.dim_param != "" for dim in dims] == [True, False, True, True]  # (batch, 3, height, width)
    operators = {node.op_type for node in graph.node}
    assert "Resize" not in operators  # anomalib's own export puts an aliased Resize here
    assert {"Range", "MatMul"} <= operators  # the resampling matrices, built from the input's height and width
    assert {output.name for output in graph.output} == {"pred_score", "pred_label", "anomaly_map", "pred_mask"}


# --------------------------------------------------------------------- parity
@pytest.mark.parametrize("runtime", ["onnxruntime", "openvino-f32"])
@pytest.mark.parametrize("case", ["batch-1", "batch-4", "300x257-batch-2"])
def test_export_matches_fitted_path(trained_model, test_images, compiled, runtime: str, case: str) -> None:
    if case == "batch-1":
        images = test_images[4:5]
    elif case == "batch-4":
        images = test_images[2:6]
    else:
        images = torch.nn.functional.interpolate(test_images[3:5], size=(300, 257), mode="bilinear")
    expected = fitted_path(trained_model, images)
    assert expected["anomaly_map"].shape == (images.shape[0], 1, 224, 224)
    threshold = float(trained_model.model.post_processor.normalized_pixel_threshold)
    assert_matches_reference(compiled[runtime](images.numpy()), expected, threshold)


def test_reduced_precision_keeps_the_detection_quality(
    trained_model, test_images, test_labels, test_masks, compiled
) -> None:
    """OpenVINO's CPU default (bf16 where the CPU has it) and FP16 weights: measured error and AUROC change."""
    expected = fitted_path(trained_model, test_images)

    def quality(outputs: Outputs) -> tuple[float, float]:
        image = roc_auc_score(test_labels, outputs["pred_score"].ravel())
        pixel = roc_auc_score(test_masks.ravel(), outputs["anomaly_map"][:, 0].ravel())
        return image, pixel

    reference_quality = quality(expected)
    print(f"fitted path: AUROC {reference_quality[0]:.4f} / {reference_quality[1]:.4f}")
    for runtime in ("openvino-default", "openvino-fp16-weights-f32", "openvino-fp16-weights-default"):
        outputs = compiled[runtime](test_images.numpy())
        score_error = relative_error(outputs["pred_score"], expected["pred_score"])
        map_error = relative_error(outputs["anomaly_map"], expected["anomaly_map"])
        image, pixel = quality(outputs)
        print(f"{runtime}: error score {score_error:.1e} map {map_error:.1e}, AUROC {image:.4f} / {pixel:.4f}")
        assert score_error < 0.1
        assert map_error < 0.05
        assert abs(image - reference_quality[0]) <= 0.05
        assert abs(pixel - reference_quality[1]) <= 0.01


def test_openvino_uses_bf16_by_default_where_the_cpu_has_it(openvino_path) -> None:
    """Why users must pass ``INFERENCE_PRECISION_HINT: f32`` for exact scores on such CPUs."""
    core = ov.Core()
    capabilities = core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    default = core.compile_model(core.read_model(openvino_path), "CPU").get_property("INFERENCE_PRECISION_HINT")
    assert (default == ov.Type.bf16) == ("BF16" in capabilities)


# ---------------------------------------------------------------- inferencers
def test_openvino_inferencer_predicts_like_the_fitted_path_from_a_path_and_an_array(
    trained_model, openvino_path, test_image_paths, monkeypatch, tmp_path
) -> None:
    monkeypatch.chdir(tmp_path)  # OpenVINOInferencer keeps a compile cache in ./openvino_cache
    inferencer = OpenVINOInferencer(check_export(openvino_path), device="CPU", config=EXACT)
    assert inferencer.model.get_property("INFERENCE_PRECISION_HINT") == ov.Type.f32
    path = test_image_paths[5]
    expected = fitted_path(trained_model, read_image(path, as_tensor=True)[None])
    threshold = float(trained_model.model.post_processor.normalized_pixel_threshold)
    for source in (path, np.asarray(Image.open(path).convert("RGB"))):
        prediction = inferencer.predict(source)
        # NumpyImageBatch moves the mask's channel axis last: (1, 224, 224, 1); the values are what counts.
        assert prediction.pred_mask.shape == (1, 224, 224, 1)
        actual = {name: getattr(prediction, name).reshape(value.shape) for name, value in expected.items()}
        assert_matches_reference(actual, expected, threshold)


def test_torch_inferencer_predicts_like_the_fitted_path_from_a_path_and_an_array(
    trained_model, torch_path, test_image_paths, monkeypatch
) -> None:
    monkeypatch.setenv("TRUST_REMOTE_CODE", "1")
    inferencer = TorchInferencer(check_export(torch_path), device="cpu")
    path = test_image_paths[6]
    expected = fitted_path(trained_model, read_image(path, as_tensor=True)[None])
    for source in (path, np.asarray(Image.open(path).convert("RGB"))):
        prediction = inferencer.predict(source)
        for name, value in expected.items():
            # ImageBatch reshapes some fields (pred_label becomes (1,)); values must be the fitted path's, bit for bit.
            np.testing.assert_array_equal(getattr(prediction, name).numpy().reshape(value.shape), value, err_msg=name)


# ------------------------------------------- deployed equals fitted, real files
PARITY_SIZES = ((1024, 1024), (700, 900), (256, 256))
"""(height, width) of the image files: MVTec AD-like photographs, a non-square one, and a small one."""
SCORE_TOLERANCE = 1e-3
"""Largest allowed |difference| of normalised scores (0..1) between a deployment and Engine.predict."""
MAP_TOLERANCE = 1e-3
"""Largest allowed |difference| of anomaly maps relative to Engine.predict's largest value."""


@pytest.fixture(scope="module")
def parity_files(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """A normal and a defective brick image of each size, one as PNG and the other as JPEG (quality 90).

    Rendered at the full size from the same texture photograph as the training images (which
    are 128 px), so the fitted model sees them as in-distribution after its resize. Which of
    the two is the JPEG alternates with the size, so each format holds both kinds.
    """
    folder = tmp_path_factory.mktemp("parity_files")
    band = texture_bands(load_texture("brick"))["test"]
    paths = []
    for number, (height, width) in enumerate(PARITY_SIZES):
        side = max(height, width)
        normal = render_normal(band, 0, "brick", "test/good", 0, crop_size=160, image_size=side)
        _, defective, _ = render_defective(band, 0, "brick", 0, "stain", crop_size=160, image_size=side)
        suffixes = ("png", "jpg") if number % 2 == 0 else ("jpg", "png")
        for kind, pixels, suffix in zip(("good", "stain"), (normal, defective), suffixes, strict=True):
            path = folder / f"{height}x{width}_{kind}.{suffix}"
            Image.fromarray(pixels[:height, :width]).save(path, quality=90)
            paths.append(path)
    return paths


def prediction_fields(prediction: object) -> Outputs:
    """pred_score, pred_label (scalars) and anomaly_map (224x224) of a one-image prediction, as float64/int arrays."""
    values = {name: np.asarray(getattr(prediction, name)) for name in ("pred_score", "pred_label", "anomaly_map")}
    return {
        "pred_score": values["pred_score"].reshape(()).astype(np.float64),
        "pred_label": values["pred_label"].reshape(()).astype(int),
        "anomaly_map": values["anomaly_map"].reshape(224, 224).astype(np.float64),
    }


@pytest.fixture(scope="module")
def file_predictions(trained_model, parity_files, onnx_path, openvino_path, torch_path, tmp_path_factory):
    """Every runtime's prediction for every parity file, and the decoded pixels each runtime was given.

    Reference: ``Engine.predict(data_path=folder)``, which reads files with anomalib's
    PredictDataset. ONNX Runtime gets the image decoded by ``anomalib.data.utils.read_image``,
    the function anomalib's PredictDataset, OpenVINOInferencer and TorchInferencer all use.
    """
    batches = trained_model.engine.predict(model=trained_model.model, data_path=parity_files[0].parent)
    predictions = {"Engine.predict": {Path(batch.image_path[0]).name: prediction_fields(batch) for batch in batches}}
    decoded = {"Engine.predict": {path.name: PredictDataset(path)[0].image.numpy() for path in parity_files}}
    session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    names = [output.name for output in session.get_outputs()]
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(tmp_path_factory.mktemp("openvino_cache"))  # OpenVINOInferencer writes ./openvino_cache
        patch.setenv("TRUST_REMOTE_CODE", "1")
        openvino = OpenVINOInferencer(check_export(openvino_path), device="CPU", config=EXACT)
        torch_inferencer = TorchInferencer(check_export(torch_path), device="cpu")
        for runtime in ("OpenVINOInferencer", "ONNX Runtime", "TorchInferencer"):
            predictions[runtime], decoded[runtime] = {}, {}
        for path in parity_files:
            prediction = openvino.predict(path)
            predictions["OpenVINOInferencer"][path.name] = prediction_fields(prediction)
            decoded["OpenVINOInferencer"][path.name] = np.moveaxis(prediction.image[0], -1, 0)  # NumpyImageBatch: HWC
            image = read_image(path, as_tensor=True)[None].numpy()
            outputs = dict(zip(names, session.run(None, {"input": image}), strict=True))
            predictions["ONNX Runtime"][path.name] = prediction_fields(type("Outputs", (), outputs))
            decoded["ONNX Runtime"][path.name] = image[0]
            prediction = torch_inferencer.predict(path)
            predictions["TorchInferencer"][path.name] = prediction_fields(prediction)
            decoded["TorchInferencer"][path.name] = prediction.image[0].numpy()
    return predictions, decoded


def test_engine_predict_on_full_size_files_gives_scores_inside_the_normalised_range(file_predictions) -> None:
    """The parity below means something only if the scores are not clipped to 0 or 1 by the post-processor."""
    predictions, _ = file_predictions
    scores = np.array([value["pred_score"] for value in predictions["Engine.predict"].values()])
    assert len(scores) == 2 * len(PARITY_SIZES)
    assert ((scores > 0.01) & (scores < 0.99)).mean() >= 0.75, scores


def test_every_runtime_decodes_the_files_like_engine_predict(file_predictions) -> None:
    """PNG and JPEG are decoded by PIL (anomalib's read_image) on every path: the same pixels reach every model.

    The 8-bit values are identical; OpenVINOInferencer divides by 255 in float64 and rounds to float32 where
    the others divide in float32, which moves some values by one float32 step (6e-8).
    """
    _, decoded = file_predictions
    for runtime, images in decoded.items():
        for name, pixels in images.items():
            reference = decoded["Engine.predict"][name]
            assert pixels.shape == reference.shape, f"{runtime} {name}"
            np.testing.assert_array_equal(np.rint(pixels * 255), np.rint(reference * 255), err_msg=f"{runtime} {name}")
            np.testing.assert_allclose(pixels, reference, rtol=0, atol=1e-7, err_msg=f"{runtime} {name}")


@pytest.mark.parametrize("runtime", ["OpenVINOInferencer", "ONNX Runtime", "TorchInferencer"])
def test_deployed_model_equals_engine_predict_on_image_files(file_predictions, runtime: str) -> None:
    """1024x1024, 700x900 and 256x256 PNG and JPEG: scores within 1e-3, same labels, maps within 1e-3 relative."""
    predictions, _ = file_predictions
    reference = predictions["Engine.predict"]
    report = []
    for name, expected in sorted(reference.items()):
        actual = predictions[runtime][name]
        score_difference = abs(float(actual["pred_score"] - expected["pred_score"]))
        map_difference = np.abs(actual["anomaly_map"] - expected["anomaly_map"]).max() / expected["anomaly_map"].max()
        flipped = int(actual["pred_label"]) != int(expected["pred_label"])
        report.append(f"{name}: score {score_difference:.1e}, map {map_difference:.1e}, label flipped {flipped}")
        if score_difference > SCORE_TOLERANCE or map_difference > MAP_TOLERANCE or flipped:
            pytest.fail(f"{runtime} differs from Engine.predict:\n" + "\n".join(report))
    print(f"{runtime}:\n" + "\n".join(report))


# ----------------------------------------------------------------------- size
def test_gaussian_is_stored_once_in_the_exports(trained_model, onnx_path, openvino_path, fp16_path) -> None:
    model_bytes = sum(tensor.nbytes for tensor in trained_model.model.state_dict().values())
    gaussian_bytes = sum(tensor.nbytes for tensor in trained_model.model.model.gaussian.state_dict().values())

    def external_bytes(tensor: onnx.TensorProto) -> int:
        return int({entry.key: entry.value for entry in tensor.external_data}.get("length", 0))

    initializers = onnx.load(onnx_path, load_external_data=False).graph.initializer
    onnx_bytes = sum(len(tensor.raw_data) + external_bytes(tensor) for tensor in initializers)
    core = ov.Core()
    constant_bytes = {
        path: sum(op.get_byte_size() for op in core.read_model(path).get_ops() if op.get_type_name() == "Constant")
        for path in (openvino_path, fp16_path)
    }
    for stored in (onnx_bytes, constant_bytes[openvino_path], openvino_path.with_suffix(".bin").stat().st_size):
        assert model_bytes - gaussian_bytes / 4 < stored < model_bytes + gaussian_bytes / 4
    assert 0.45 < fp16_path.with_suffix(".bin").stat().st_size / openvino_path.with_suffix(".bin").stat().st_size < 0.55


# ------------------------------------------------------ stock CLI with FP16
def test_stock_cli_fp16_export_is_whole_and_close_to_fitted_path(
    trained_model, fp16_path, test_images, compiled
) -> None:
    assert sorted(entry.name for entry in fp16_path.parent.iterdir()) == ["model.bin", "model.xml"]
    assert check_export(fp16_path) == fp16_path
    expected = fitted_path(trained_model, test_images)
    actual = compiled["openvino-fp16-weights-f32"](test_images.numpy())
    assert relative_error(actual["anomaly_map"], expected["anomaly_map"]) < 1e-2


# ------------------------------------------------------ replacing and failing
def test_a_re_export_replaces_the_folder_and_a_failed_one_keeps_it(trained_model, tmp_path) -> None:
    engine = trained_model.engine
    first = engine.export(trained_model.model, ExportType.TORCH, export_root=tmp_path, model_file_name="first")
    second = engine.export(trained_model.model, ExportType.TORCH, export_root=tmp_path, model_file_name="second")
    folder = tmp_path / "weights" / "torch"
    assert (first.exists(), second.exists()) == (False, True)
    assert sorted(entry.name for entry in folder.iterdir()) == ["second.pt"]
    before = {entry.name: entry.read_bytes() for entry in folder.iterdir()}
    with pytest.raises((OSError, RuntimeError)):
        engine.export(trained_model.model, ExportType.TORCH, export_root=tmp_path, model_file_name="no_such_folder/x")
    assert {entry.name: entry.read_bytes() for entry in folder.iterdir()} == before
    assert sorted(entry.name for entry in (tmp_path / "weights").iterdir()) == ["torch"]


KILLED_EXPORT = """
import sys
from anomalib.deploy import ExportType
from anomalib.engine import Engine
from anomalib_contnet import ConTNetPaDiM
model = ConTNetPaDiM.load_from_checkpoint(sys.argv[1])
Engine(default_root_dir=sys.argv[2]).export(model, ExportType.OPENVINO, export_root=sys.argv[2])
"""


@pytest.mark.slow
def test_an_export_removes_the_staging_folder_a_killed_one_left(trained_model, tmp_path) -> None:
    weights = tmp_path / "weights"
    arguments = [sys.executable, "-c", KILLED_EXPORT, str(trained_model.checkpoint), str(tmp_path)]
    process = subprocess.Popen(arguments, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not list(weights.glob(".staging-openvino-*")) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    process.kill()
    process.wait()
    (abandoned,) = weights.glob(".staging-openvino-*")
    running = weights / f".staging-openvino-{os.getpid()}-of-a-running-export"
    running.mkdir()
    trained_model.engine.export(trained_model.model, ExportType.OPENVINO, export_root=tmp_path)
    assert not abandoned.exists()
    assert running.exists()  # its process (this one) is alive
    assert sorted(entry.name for entry in weights.iterdir()) == [running.name, "openvino"]


def test_int8_post_training_quantisation_is_refused_with_the_reason(trained_model, tmp_path) -> None:
    with pytest.raises(ValueError, match=r"INT8_PTQ is refused.*CompressionType\.INT8 "):
        trained_model.engine.export(
            trained_model.model,
            ExportType.OPENVINO,
            export_root=tmp_path,
            compression_type=CompressionType.INT8_PTQ,
            datamodule=trained_model.datamodule,
        )
    assert not (tmp_path / "weights").exists()


# -------------------------------------------------------- damaged exports
def copy_prefix(source: Path, target: Path, length: int | None = None) -> None:
    """Copy ``source`` (or only its first ``length`` bytes) to ``target``."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with source.open("rb") as reader, target.open("wb") as writer:
        writer.write(reader.read(length) if length is not None else reader.read())


def test_missing_files_are_named_with_what_to_do(openvino_path, onnx_path, tmp_path) -> None:
    with pytest.raises(ExportCheckError, match=r"does not exist.*Export the model again"):
        check_export(tmp_path / "weights" / "openvino" / "model.xml")
    copy_prefix(openvino_path, tmp_path / "xml_only" / "model.xml")
    with pytest.raises(ExportCheckError, match=r"model\.bin is missing"):
        check_export(tmp_path / "xml_only" / "model.bin")
    copy_prefix(onnx_path, tmp_path / "onnx_only" / "model.onnx")
    with pytest.raises(ExportCheckError, match=r"model\.onnx\.data is missing"):
        check_export(tmp_path / "onnx_only" / "model.onnx")


def test_truncated_files_are_reported(openvino_path, onnx_path, torch_path, tmp_path) -> None:
    weights = openvino_path.with_suffix(".bin")
    copy_prefix(openvino_path, tmp_path / "short_bin" / "model.xml")
    copy_prefix(weights, tmp_path / "short_bin" / "model.bin", length=weights.stat().st_size // 2)
    with pytest.raises(ExportCheckError, match="truncated"):
        check_export(tmp_path / "short_bin" / "model.xml")
    copy_prefix(openvino_path, tmp_path / "short_xml" / "model.xml", length=5000)
    os.link(weights, tmp_path / "short_xml" / "model.bin")
    with pytest.raises(ExportCheckError, match="not valid XML"):
        check_export(tmp_path / "short_xml" / "model.xml")
    copy_prefix(onnx_path, tmp_path / "short_onnx" / "model.onnx", length=1000)
    with pytest.raises(ExportCheckError, match="not a readable ONNX model"):
        check_export(tmp_path / "short_onnx" / "model.onnx")
    copy_prefix(torch_path, tmp_path / "short_pt" / "model.pt", length=torch_path.stat().st_size - 100)
    with pytest.raises(ExportCheckError, match=r"not a complete torch\.save archive"):
        check_export(tmp_path / "short_pt" / "model.pt")
