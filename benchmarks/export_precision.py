"""What OpenVINO's precision hint and weight compression do to ConTNetPaDiM's scores, file size and speed.

Fits ConTNetPaDiM (contnet_b with random weights, or ``--backbone efficientnet_lite0``
with its real ImageNet weights) through anomalib's Engine on a texture category with
drawn defects and exact masks, exports OpenVINO IR with FP32, FP16 and INT8 weights
(and INT8_PTQ through anomalib's own ``to_openvino``, which ConTNetPaDiM refuses, to
show why), runs each with the f32 hint and with the CPU's default hint, and compares
every runtime with eager PyTorch on the same test images:

- score / map error: largest |difference| relative to the largest eager value;
- label flips and mask flips: decisions on the other side of the post-processor's threshold;
- image and pixel AUROC;
- images/s at batch 1 and 8, interleaved rounds (medians), and the ratio to eager.

``--threads`` applies to torch and OpenVINO alike. Run from the repository root
(about 15 minutes on 2 busy cores)::

    python benchmarks/export_precision.py --work /tmp/export_precision
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import numpy as np
import openvino as ov
import torch
from _common import add_threads_option, apply_threads, interleaved_timings, machine_summary, markdown_table, median
from anomalib.data import MVTecAD
from anomalib.data.utils import read_image
from anomalib.deploy import CompressionType
from anomalib.engine import Engine
from anomalib.models.components.base.export_mixin import ExportMixin
from PIL import Image
from sklearn.metrics import roc_auc_score

from anomalib_contnet import ConTNetPaDiM
from anomalib_contnet.data import prepare_textures

Outputs = dict[str, np.ndarray]
Runner = Callable[[np.ndarray], Outputs]
CATEGORY = "brick"
HINTS = {"f32 hint": {"INFERENCE_PRECISION_HINT": "f32"}, "CPU default": {}}


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, required=True, help="folder for the dataset, model and exports")
    parser.add_argument(
        "--backbone", default="contnet_b", help="a ConTNet variant (random weights) or efficientnet_lite0 (ImageNet)"
    )
    parser.add_argument("--n-train", type=int, default=60, help="normal training images")
    parser.add_argument("--n-test", type=int, default=20, help="normal and defective test images (each)")
    parser.add_argument("--timing-images", type=int, default=16, help="images per timed pass")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved timing rounds (the median is reported)")
    parser.add_argument("--skip-int8", action="store_true", help="leave out the two 8-bit exports")
    add_threads_option(parser)
    return parser.parse_args()


def build_model(backbone: str) -> ConTNetPaDiM:
    """A ConTNet variant with random weights at the paper's defaults, or EfficientNet-Lite0 with ImageNet weights."""
    if backbone == "efficientnet_lite0":
        from anomalib_contnet.pretrained import offline_efficientnet_lite0  # noqa: PLC0415

        weights = offline_efficientnet_lite0()
        return ConTNetPaDiM(backbone=backbone, layers=("blocks.2", "blocks.4"), weights=str(weights))
    return ConTNetPaDiM(backbone=backbone, pre_trained=False)


def load_test_set(root: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Test images in [0, 1], image labels, and masks at the 224x224 output size."""
    paths = sorted((root / CATEGORY / "test").glob("*/*.png"))
    images = torch.stack([read_image(path, as_tensor=True) for path in paths]).numpy()
    labels = np.array([path.parent.name != "good" for path in paths], dtype=int)
    masks = []
    for path in paths:
        mask_path = root / CATEGORY / "ground_truth" / path.parent.name / f"{path.stem}_mask.png"
        mask = Image.open(mask_path).convert("L") if mask_path.exists() else Image.new("L", Image.open(path).size)
        masks.append(np.asarray(mask.resize((224, 224), Image.NEAREST)) > 0)
    return images, labels, np.stack(masks)


def eager_runner(model: ConTNetPaDiM) -> Runner:
    def run(images: np.ndarray) -> Outputs:
        with torch.no_grad():
            outputs = model(torch.from_numpy(images))
        return {name: value.numpy() for name, value in outputs._asdict().items() if value is not None}

    return run


def openvino_runner(path: Path, config: dict[str, str], threads: int | None) -> Runner:
    threading = {} if threads is None else {"INFERENCE_NUM_THREADS": threads}
    compiled = ov.Core().compile_model(path, "CPU", config | threading)

    def run(images: np.ndarray) -> Outputs:
        return {next(iter(port.names)): value for port, value in compiled(images).items()}

    return run


def in_batches(runner: Runner, images: np.ndarray, batch_size: int) -> Outputs:
    parts = [runner(images[start : start + batch_size]) for start in range(0, len(images), batch_size)]
    return {name: np.concatenate([part[name] for part in parts]) for name in parts[0]}


def relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
    return float(np.abs(actual.astype(np.float64) - expected).max() / np.abs(expected).max())


def export_all(model: ConTNetPaDiM, datamodule: MVTecAD, folder: Path, skip_int8: bool) -> dict[str, Path]:
    """OpenVINO IR per weight compression: name -> model.xml."""
    compressions = {"FP32": None, "FP16": CompressionType.FP16}
    if not skip_int8:
        compressions |= {"INT8 weights": CompressionType.INT8}
    paths = {name: model.to_openvino(folder / name, compression_type=kind) for name, kind in compressions.items()}
    if not skip_int8:
        # ConTNetPaDiM refuses INT8_PTQ; anomalib's own method shows what it would give.
        paths["INT8_PTQ"] = ExportMixin.to_openvino(
            model, folder / "INT8_PTQ", compression_type=CompressionType.INT8_PTQ, datamodule=datamodule
        )
    return paths


def main() -> None:
    arguments = parse_arguments()
    apply_threads(arguments.threads)
    print(machine_summary(), "\n")
    work = arguments.work.expanduser().resolve()
    if not (work / "data" / CATEGORY).exists():
        counts = {"n_train": arguments.n_train, "n_test_good": arguments.n_test, "n_test_defect": arguments.n_test}
        prepare_textures(work / "data", categories=(CATEGORY,), **counts)
    datamodule = MVTecAD(root=work / "data", category=CATEGORY, train_batch_size=8, eval_batch_size=8, num_workers=0)
    model = build_model(arguments.backbone)
    Engine(default_root_dir=work / "engine", logger=False, enable_progress_bar=False).fit(model, datamodule=datamodule)
    model.eval()
    paths = export_all(model, datamodule, work / "exports", arguments.skip_int8)

    runners = {"eager PyTorch": eager_runner(model)}
    for name, path in paths.items():
        for hint, config in HINTS.items():
            runners[f"OpenVINO {name}, {hint}"] = openvino_runner(path, config, arguments.threads)
    images, labels, masks = load_test_set(work / "data")
    outputs = {name: in_batches(runner, images, 8) for name, runner in runners.items()}
    timed = images[: arguments.timing_images]
    calls = {
        (name, batch): lambda runner=runner, batch=batch: in_batches(runner, timed, batch)
        for name, runner in runners.items()
        for batch in (1, 8)
    }
    rates = {key: len(timed) / median(seconds) for key, seconds in interleaved_timings(calls, arguments.rounds).items()}

    eager = outputs["eager PyTorch"]
    rows = [
        [
            name,
            relative_error(actual["pred_score"], eager["pred_score"]),
            relative_error(actual["anomaly_map"], eager["anomaly_map"]),
            int((actual["pred_label"] != eager["pred_label"]).sum()),
            100 * float((actual["pred_mask"] != eager["pred_mask"]).mean()),
            roc_auc_score(labels, actual["pred_score"].ravel()),
            roc_auc_score(masks.ravel(), actual["anomaly_map"][:, 0].ravel()),
            rates[name, 1],
            rates[name, 1] / rates["eager PyTorch", 1],
            rates[name, 8],
            rates[name, 8] / rates["eager PyTorch", 8],
        ]
        for name, actual in outputs.items()
    ]
    default_hint = ov.Core().compile_model(paths["FP32"], "CPU").get_property("INFERENCE_PRECISION_HINT").to_string()
    dimensions = model.model.feature_index.numel()
    print(f"\n{arguments.backbone}, {dimensions} dimensions, {len(labels)} test images ({labels.sum()} defective)")
    print(f"the CPU default hint here is {default_hint}")
    state_mib = sum(tensor.nbytes for tensor in model.state_dict().values()) / 2**20
    sizes = ", ".join(f"{name} {path.with_suffix('.bin').stat().st_size / 2**20:.1f}" for name, path in paths.items())
    print(f"model state {state_mib:.1f} MiB; OpenVINO .bin MiB: {sizes}\n")
    headers = ["runtime", "score error", "map error", "label flips", "mask flips %", "image AUROC", "pixel AUROC"]
    print(markdown_table([*headers, "img/s b1", "x eager", "img/s b8", "x eager"], rows))


if __name__ == "__main__":
    main()
