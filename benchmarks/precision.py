"""Backbone ``precision`` (float32 / bfloat16 / float16): speed and score effect on this CPU.

For every precision, a ConTNetPaDiM model with the same seeded random backbone
weights is fitted on the same texture images and scores the same test images; the
backbone (``extract_embedding``) and the whole forward are timed on one batch,
interleaved round by round with the float32 model, and reported as ratios of medians
against float32 in the same run. Score effect: largest change of the image scores and
of the anomaly maps relative to float32's largest value, and image / pixel AUROC.

Run from the repository root (contnet_b is the product case; about 15 minutes on one
busy core, most of it in the bfloat16 and float16 backbones)::

    OMP_NUM_THREADS=1 python benchmarks/precision.py --work /tmp/precision --threads 1
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from _common import add_threads_option, apply_threads, interleaved_timings, machine_summary, markdown_table, median
from anomalib.data.utils import read_image
from PIL import Image
from sklearn.metrics import roc_auc_score

from anomalib_contnet import ConTNetPaDiMModel
from anomalib_contnet.data import prepare_textures
from anomalib_contnet.models.contnet_padim.feature_extractor import IMAGENET_MEAN, IMAGENET_STD
from anomalib_contnet.models.contnet_padim.torch_model import PRECISIONS

CATEGORY = "brick"
SIDE = 224


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, required=True, help="folder for the texture dataset")
    parser.add_argument("--backbone", default="contnet_b")
    parser.add_argument("--precisions", nargs="+", default=list(PRECISIONS), choices=list(PRECISIONS))
    parser.add_argument("--n-train", type=int, default=24, help="normal training images")
    parser.add_argument("--n-test", type=int, default=8, help="normal and defective test images (each)")
    parser.add_argument("--batch", type=int, default=8, help="images per timed batch")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds (medians reported)")
    add_threads_option(parser)
    return parser.parse_args()


def load(paths: list[Path]) -> torch.Tensor:
    """Images resized to the model's input and normalised as the default pre-processor does."""
    images = torch.stack([read_image(path, as_tensor=True) for path in paths])
    images = torch.nn.functional.interpolate(images, size=(SIDE, SIDE), mode="bilinear", antialias=True)
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (images - mean) / std


def masks_of(paths: list[Path], root: Path) -> np.ndarray:
    masks = []
    for path in paths:
        mask_path = root / CATEGORY / "ground_truth" / path.parent.name / f"{path.stem}_mask.png"
        mask = Image.open(mask_path).convert("L") if mask_path.exists() else Image.new("L", Image.open(path).size)
        masks.append(np.asarray(mask.resize((SIDE, SIDE), Image.NEAREST)) > 0)
    return np.stack(masks)


def in_batches(function, images: torch.Tensor, batch: int) -> list:
    return [function(images[start : start + batch]) for start in range(0, len(images), batch)]


def main() -> None:
    arguments = parse_arguments()
    apply_threads(arguments.threads)
    print(machine_summary())
    root = arguments.work / "textures"
    if not (root / CATEGORY).exists():
        prepare_textures(
            root,
            categories=[CATEGORY],
            image_size=SIDE,
            n_train=arguments.n_train,
            n_test_good=arguments.n_test,
            n_test_defect=arguments.n_test,
        )
    train = load(sorted((root / CATEGORY / "train" / "good").glob("*.png")))
    test_paths = sorted((root / CATEGORY / "test").glob("*/*.png"))
    test = load(test_paths)
    labels = np.array([path.parent.name != "good" for path in test_paths], dtype=int)
    masks = masks_of(test_paths, root)

    models, outputs = {}, {}
    for precision in ["float32", *[name for name in arguments.precisions if name != "float32"]]:
        model = ConTNetPaDiMModel(backbone=arguments.backbone, pre_trained=False, precision=precision).eval()
        with torch.no_grad():
            for embedding in in_batches(model.extract_embedding, train, arguments.batch):
                model.gaussian.update(embedding)
            model.gaussian.fit()
            batches = in_batches(model, test, arguments.batch)
        scores = torch.cat([batch.pred_score for batch in batches]).flatten().numpy()
        maps = torch.cat([batch.anomaly_map for batch in batches])[:, 0].numpy()
        models[precision], outputs[precision] = model, (scores, maps)
        print(f"fitted and scored {precision}", flush=True)

    batch = test[: arguments.batch]
    functions = {}
    for precision, model in models.items():
        functions[f"{precision} backbone"] = lambda model=model: model.extract_embedding(batch)
        functions[f"{precision} forward"] = lambda model=model: model(batch)
    with torch.no_grad():
        timings = interleaved_timings(functions, arguments.rounds)

    reference_scores, reference_maps = outputs["float32"]
    rows = []
    for precision, (scores, maps) in outputs.items():
        backbone = median(timings[f"{precision} backbone"])
        forward = median(timings[f"{precision} forward"])
        rows.append(
            [
                precision,
                arguments.batch / forward,
                backbone / median(timings["float32 backbone"]),
                forward / median(timings["float32 forward"]),
                float(np.abs(scores - reference_scores).max() / np.abs(reference_scores).max()),
                float(np.abs(maps - reference_maps).max() / np.abs(reference_maps).max()),
                roc_auc_score(labels, scores),
                roc_auc_score(masks.ravel(), maps.ravel()),
            ]
        )
    print(
        f"\n{arguments.backbone} (random weights) at {SIDE} px, batch {arguments.batch}, {len(train)} training and "
        f"{len(test)} test images ({CATEGORY} textures), medians of {arguments.rounds} interleaved rounds:\n"
    )
    headers = [
        "precision",
        "forward images/s",
        "backbone time / float32",
        "forward time / float32",
        "score change (rel.)",
        "map change (rel.)",
        "image AUROC",
        "pixel AUROC",
    ]
    print(markdown_table(headers, rows))


if __name__ == "__main__":
    main()
