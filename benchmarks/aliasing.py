"""What aliased downsampling costs ConTNetPaDiM in image and pixel AUROC on 1024 px images.

Writes the offline texture categories (``anomalib_contnet.data.prepare_textures``) at
1024x1024 px, then for every backbone and category fits and tests ConTNetPaDiM twice
through anomalib's ``Engine``, changing nothing but the resize to 224x224:

- ``antialiased``: ConTNetPaDiM's own pre-processor (``AntialiasedResize``, the same
  numbers as torchvision's ``Resize(antialias=True)``, used everywhere);
- ``aliased``: anomalib's ``PreProcessor`` with ``Resize(antialias=False)`` (what
  anomalib's exports compute), used everywhere as well, so fitted and tested alike.

The textures are 160 px crops of 512 px photographs, bicubically enlarged, so at 1024 px
they hold little detail finer than about 6 px. Real photographs also have detail, and
sensor noise, at the pixel level; ``--noise SIGMA`` adds seeded Gaussian noise of SIGMA
grey levels to every pixel of every image (the masks are unchanged) to measure that case.

AUROC is anomalib's ``Evaluator`` (image: ``pred_score``; pixel: ``anomaly_map`` against the
masks at 224 px). The validation set is the test set (MVTecAD's default), so the
post-processor's min/max come from these very images and its normalisation never clips:
the ranking, hence AUROC, is that of the raw distances. (Raw scores cannot be given to
the Evaluator: torchmetrics passes values outside [0, 1] through a sigmoid, which ties them.)

Run (about 25 minutes on 2 busy cores)::

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 ANOMALIB_CONTNET_OFFLINE=1 python benchmarks/aliasing.py --work /tmp/aliasing
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np
import torch
from anomalib.data import MVTecAD
from anomalib.engine import Engine
from anomalib.pre_processing import PreProcessor
from PIL import Image
from torchvision.transforms.v2 import Compose, Normalize, Resize

from anomalib_contnet import ConTNetPaDiM
from anomalib_contnet.data import prepare_textures
from anomalib_contnet.data.textures import TEXTURE_CATEGORIES

BACKBONES = ("efficientnet_lite0", "contnet_ti")
RESIZES = ("antialiased", "aliased")


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, required=True, help="folder for the dataset and the results")
    parser.add_argument("--image-size", type=int, default=1024, help="side of the written images")
    parser.add_argument("--n-train", type=int, default=40)
    parser.add_argument("--n-test", type=int, default=20, help="normal and defective test images each")
    parser.add_argument("--noise", type=float, default=0.0, help="Gaussian pixel noise, grey levels (default none)")
    parser.add_argument("--backbones", nargs="+", default=list(BACKBONES), choices=BACKBONES)
    parser.add_argument("--categories", nargs="+", default=list(TEXTURE_CATEGORIES), choices=TEXTURE_CATEGORIES)
    return parser.parse_args()


def build_model(backbone: str, resize: str) -> ConTNetPaDiM:
    """ConTNetPaDiM whose pre-processor ``resize`` picks (everything else the same)."""
    if backbone == "efficientnet_lite0":
        from anomalib_contnet.pretrained import prepare_offline_efficientnet_lite0  # noqa: PLC0415

        options = {
            "layers": ("blocks.2", "blocks.4"),
            "weights": str(prepare_offline_efficientnet_lite0().weights_file),
        }
    else:
        options = {"pre_trained": False}
    model = ConTNetPaDiM(backbone=backbone, **options, visualizer=False)
    if resize == "aliased":
        own = model.pre_processor
        aliased = Compose([Resize(own.image_size, antialias=False), Normalize(list(own.mean), list(own.std))])
        model = ConTNetPaDiM(backbone=backbone, **options, visualizer=False, pre_processor=PreProcessor(aliased))
    return model


def add_pixel_noise(root: Path, sigma: float) -> None:
    """Add Gaussian noise of ``sigma`` grey levels to every train and test image (not the masks), seeded per file."""
    for index, path in enumerate(sorted(root.glob("*/t*/*/*.png"))):
        pixels = np.asarray(Image.open(path).convert("RGB"), dtype=np.float64)
        noise = np.random.default_rng(index).normal(0.0, sigma, pixels.shape)
        Image.fromarray(np.clip(np.rint(pixels + noise), 0, 255).astype(np.uint8)).save(path)


def measure(root: Path, category: str, backbone: str, resize: str, work: Path) -> dict[str, float]:
    datamodule = MVTecAD(root=root, category=category, train_batch_size=8, eval_batch_size=8, num_workers=0)
    model = build_model(backbone, resize)
    engine = Engine(default_root_dir=work / f"{backbone}-{category}-{resize}", logger=False, enable_progress_bar=False)
    engine.fit(model=model, datamodule=datamodule)
    (results,) = engine.test(model=model, datamodule=datamodule, verbose=False)
    return {"image_AUROC": float(results["image_AUROC"]), "pixel_AUROC": float(results["pixel_AUROC"])}


def main() -> None:
    arguments = parse_arguments()
    torch.set_num_threads(1)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    root = arguments.work / "textures"
    prepare_textures(
        root,
        categories=arguments.categories,
        image_size=arguments.image_size,
        n_train=arguments.n_train,
        n_test_good=arguments.n_test,
        n_test_defect=arguments.n_test,
    )
    if arguments.noise > 0:
        add_pixel_noise(root, arguments.noise)
    rows = []
    for backbone in arguments.backbones:
        for category in arguments.categories:
            result = {"backbone": backbone, "category": category}
            for resize in RESIZES:
                scores = measure(root, category, backbone, resize, arguments.work)
                result |= {f"{resize} {name}": value for name, value in scores.items()}
            rows.append(result)
            print(json.dumps(result), flush=True)
    (arguments.work / "aliasing.json").write_text(json.dumps(rows, indent=2) + "\n")
    noise = f", pixel noise sigma {arguments.noise:g}" if arguments.noise > 0 else ""
    print(f"\n{arguments.image_size} px images{noise}, resized to 224 px; image / pixel AUROC\n")
    print("| backbone | category | antialiased | aliased | change |")
    print("|---|---|---|---|---|")
    for row in rows:
        good = (row["antialiased image_AUROC"], row["antialiased pixel_AUROC"])
        bad = (row["aliased image_AUROC"], row["aliased pixel_AUROC"])
        print(
            f"| {row['backbone']} | {row['category']} | {good[0]:.4f} / {good[1]:.4f} | {bad[0]:.4f} / {bad[1]:.4f} "
            f"| {bad[0] - good[0]:+.4f} / {bad[1] - good[1]:+.4f} |"
        )


if __name__ == "__main__":
    main()
