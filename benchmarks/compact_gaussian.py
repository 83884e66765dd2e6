"""Size and accuracy of the packed precision factor, float32 and float16, against the full factor it replaced.

ConTNetPaDiM at its defaults (contnet_b, layer3+layer4, 1536 dimensions, 224 px,
random backbone weights: ConTNet-B's ImageNet weights cannot be downloaded here)
is fitted on a texture category with drawn defects and exact masks
(``anomalib_contnet.data.prepare_textures``). From the same training embeddings
it fits the Gaussian with each factor storage and reports

- the checkpoint (``torch.save`` of the model's state_dict, which is what a
  Lightning checkpoint holds, loaded back with ``weights_only=True``), the ONNX
  file (``torch.onnx.export(dynamo=True)``, dynamic batch, as anomalib exports)
  and the OpenVINO IR converted from it, saved as anomalib does by default
  (``compress_to_fp16=False``) and with ``CompressionType.FP16``;
- the largest relative change of image scores and anomaly-map pixels against
  the full float32 factor ("previous": the layout before packing), and image and
  pixel AUROC on the test images;
- OpenVINO's scores against eager, to show that the exported graph computes the
  same thing.

Run from the repository root (about 20 minutes on 2 busy cores)::

    python benchmarks/compact_gaussian.py --work /tmp/compact_gaussian
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np
import openvino as ov
import torch
from _common import add_threads_option, apply_threads, export_onnx, machine_summary, markdown_table
from PIL import Image
from sklearn.metrics import roc_auc_score
from torch import nn

from anomalib_contnet import ConTNetPaDiMModel
from anomalib_contnet.data import prepare_textures
from anomalib_contnet.models.contnet_padim.feature_extractor import IMAGENET_MEAN, IMAGENET_STD
from anomalib_contnet.models.contnet_padim.gaussian import unpack_factor

CATEGORY = "brick"
SIDE = 224


class PreviousGaussian(nn.Module):
    """The Gaussian as stored before packing: mean and the full (P, D, D) float32 factor, one batched product."""

    def __init__(self, mean: torch.Tensor, factor: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mean", mean)
        self.register_buffer("precision_factor", factor)

    @property
    def is_fitted(self) -> bool:
        """Always fitted (built from a fitted Gaussian)."""
        return True

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        """Mahalanobis distance (B, 1, H, W), computed as before packing."""
        batch, channels, height, width = embedding.shape
        delta = embedding.reshape(batch, channels, -1).permute(2, 0, 1) - self.mean.unsqueeze(1)
        squared = torch.bmm(delta, self.precision_factor).square().sum(-1)
        return squared.sqrt().transpose(0, 1).reshape(batch, 1, height, width)


def load_split(root: Path) -> tuple[torch.Tensor, torch.Tensor, np.ndarray, np.ndarray]:
    """Normalised train images, test images, test image labels and test masks (N, 224, 224) of the category."""

    def load(path: Path, mode: str) -> np.ndarray:
        with Image.open(path) as image:
            return np.asarray(image.convert(mode).resize((SIDE, SIDE), Image.BILINEAR))

    def tensor(paths: list[Path]) -> torch.Tensor:
        pixels = torch.from_numpy(np.stack([load(path, "RGB") for path in paths])).permute(0, 3, 1, 2).float() / 255
        mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        return (pixels - mean) / std

    base = root / CATEGORY
    train = sorted((base / "train" / "good").glob("*.png"))
    test = sorted((base / "test").glob("*/*.png"))
    labels = np.array([path.parent.name != "good" for path in test])
    masks = np.stack(
        [
            load(base / "ground_truth" / path.parent.name / f"{path.stem}_mask.png", "L") > 127
            if label
            else np.zeros((SIDE, SIDE), bool)
            for path, label in zip(test, labels, strict=True)
        ]
    )
    return tensor(train), tensor(test), labels, masks


def embeddings(model: ConTNetPaDiMModel, images: torch.Tensor) -> torch.Tensor:
    """Patch embeddings of ``images`` in batches of 8."""
    with torch.no_grad():
        return torch.cat([model.extract_embedding(images[start : start + 8]) for start in range(0, len(images), 8)])


def predict(model: nn.Module, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Image scores (N,) and anomaly maps (N, 224, 224) in batches of 8."""
    scores, maps = [], []
    with torch.no_grad():
        for start in range(0, len(images), 8):
            output = model(images[start : start + 8])
            scores.append(output.pred_score.flatten().numpy())
            maps.append(output.anomaly_map[:, 0].numpy())
    return np.concatenate(scores), np.concatenate(maps)


def file_mb(*paths: Path) -> float:
    """Total size of files in MB (an ONNX model with external data is two files)."""
    return sum(path.stat().st_size for path in paths if path.exists()) / 1e6


def export_sizes(model: ConTNetPaDiMModel, folder: Path, sample: torch.Tensor) -> dict[str, float]:
    """ONNX and OpenVINO IR sizes of ``model``, exported the way anomalib does, plus OpenVINO vs eager error."""
    onnx_path = export_onnx(model, folder / "model.onnx", sample[:2])
    sizes = {"onnx MB": file_mb(onnx_path, folder / "model.onnx.data")}
    converted = ov.convert_model(onnx_path)
    for label, compress in (("IR MB", False), ("IR fp16-compressed MB", True)):
        xml = folder / f"model_{int(compress)}.xml"
        ov.save_model(converted, xml, compress_to_fp16=compress)
        sizes[label] = file_mb(xml, xml.with_suffix(".bin"))
    compiled = ov.Core().compile_model(converted, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    ov_scores = compiled(sample[:3].numpy())[0].flatten()
    with torch.no_grad():
        eager_scores = model(sample[:3]).pred_score.flatten().numpy()
    sizes["OpenVINO f32 vs eager score rel"] = float(np.max(np.abs(ov_scores - eager_scores) / np.abs(eager_scores)))
    return sizes


def checkpoint_mb(model: nn.Module, path: Path) -> float:
    """Size of ``torch.save(state_dict)``; also proves it loads back with ``weights_only=True``."""
    torch.save(model.state_dict(), path)
    model.load_state_dict(torch.load(path, weights_only=True))
    return file_mb(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, required=True, help="folder for the dataset, checkpoints and exports")
    parser.add_argument("--n-train", type=int, default=100)
    parser.add_argument("--n-test", type=int, default=30, help="normal and defective test images each")
    parser.add_argument("--backbone", default="contnet_b")
    parser.add_argument("--skip-export", action="store_true")
    add_threads_option(parser)
    args = parser.parse_args()
    apply_threads(args.threads)
    print(machine_summary(), "\n")
    data_root = args.work / "data"
    if not (data_root / CATEGORY).exists():
        prepare_textures(
            data_root, categories=(CATEGORY,), n_train=args.n_train, n_test_good=args.n_test, n_test_defect=args.n_test
        )
    train_images, test_images, labels, masks = load_split(data_root)
    model = ConTNetPaDiMModel(backbone=args.backbone, pre_trained=False).eval()
    train = embeddings(model, train_images)

    results: dict[str, dict[str, float]] = {}
    outputs: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for variant in ("previous", "float32", "float16"):
        gaussian = ConTNetPaDiMModel(
            backbone=args.backbone, pre_trained=False, factor_dtype=variant.replace("previous", "float32")
        ).gaussian
        gaussian.update(train)
        gaussian.fit()
        if variant == "previous":
            gaussian = PreviousGaussian(gaussian.mean, unpack_factor(gaussian.precision_factor, *gaussian.mean.shape))
        model.gaussian = gaussian
        outputs[variant] = predict(model, test_images)
        scores, maps = outputs[variant]
        results[variant] = {
            "checkpoint MB": checkpoint_mb(model, args.work / f"{variant}.pt"),
            "image AUROC": roc_auc_score(labels, scores),
            "pixel AUROC": roc_auc_score(masks.reshape(-1), maps.reshape(-1)),
        }
        if not args.skip_export:
            results[variant] |= export_sizes(model, args.work / f"export_{variant}", test_images)
        print(variant, results[variant], flush=True)
        os.remove(args.work / f"{variant}.pt")

    reference_scores, reference_maps = outputs["previous"]
    columns = list(results["previous"])
    rows = []
    for variant, values in results.items():
        scores, maps = outputs[variant]
        score_change = float(np.max(np.abs(scores - reference_scores) / np.abs(reference_scores)))
        map_change = float(np.max(np.abs(maps - reference_maps) / np.abs(reference_maps)))
        rows.append([variant, *(values[column] for column in columns), score_change, map_change])
    headers = ["factor", *columns, "max score change (rel)", "max map change (rel)"]
    print(f"\n## Factor storage, {args.backbone} defaults, {len(train)} training images\n")
    print(markdown_table(headers, rows))
    print("\n## Ratios against the previous (full float32) layout\n")
    for variant in ("float32", "float16"):
        ratios = ", ".join(
            f"{column} {results[variant][column] / results['previous'][column]:.3f}x"
            for column in columns
            if column.endswith("MB")
        )
        print(f"- packed {variant}: {ratios}")


if __name__ == "__main__":
    main()
