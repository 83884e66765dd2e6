"""Shared fixtures: a tiny MVTec-layout dataset and a small ConTNetPaDiM trained on it through anomalib's Engine."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("ANOMALIB_CONTNET_OFFLINE", "1")

TINY_CATEGORY = "brick"


@dataclass(frozen=True)
class TrainedModel:
    """A fitted model with the engine, datamodule and checkpoint that produced it."""

    model: object
    engine: object
    datamodule: object
    checkpoint: Path
    dataset_root: Path
    category: str


def _write_tiny_mvtec(root: Path, category: str, seed: int = 0) -> None:
    """Temporary stand-in: brick texture crops, with bright squares as defects and exact masks."""
    from skimage import data  # noqa: PLC0415

    rng = np.random.default_rng(seed)
    texture = data.brick()
    side = 128

    def crop() -> np.ndarray:
        top, left = rng.integers(0, texture.shape[0] - side, 2)
        return np.repeat(texture[top : top + side, left : left + side, None], 3, axis=2)

    base = root / category
    for folder in ("train/good", "test/good", "test/spot", "ground_truth/spot"):
        (base / folder).mkdir(parents=True, exist_ok=True)
    for index in range(12):
        Image.fromarray(crop()).save(base / "train/good" / f"{index:03d}.png")
    for index in range(4):
        Image.fromarray(crop()).save(base / "test/good" / f"{index:03d}.png")
    for index in range(4):
        image, mask = crop(), np.zeros((side, side), np.uint8)
        top, left = rng.integers(16, side - 48, 2)
        image[top : top + 32, left : left + 32] = (255, 40, 40)
        mask[top : top + 32, left : left + 32] = 255
        Image.fromarray(image).save(base / "test/spot" / f"{index:03d}.png")
        Image.fromarray(mask).save(base / "ground_truth/spot" / f"{index:03d}_mask.png")


@pytest.fixture(scope="session")
def tiny_mvtec(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """(root, category) of a small MVTec AD-layout dataset with obvious defects and exact masks."""
    root = tmp_path_factory.mktemp("tiny_mvtec")
    _write_tiny_mvtec(root, TINY_CATEGORY)
    return root, TINY_CATEGORY


@pytest.fixture(scope="session")
def trained_model(tiny_mvtec: tuple[Path, str], tmp_path_factory: pytest.TempPathFactory) -> TrainedModel:
    """contnet_ti ConTNetPaDiM (random weights) fitted through anomalib's Engine; do not modify it in tests."""
    from anomalib.data import MVTecAD  # noqa: PLC0415
    from anomalib.engine import Engine  # noqa: PLC0415

    from anomalib_contnet import ConTNetPaDiM  # noqa: PLC0415

    root, category = tiny_mvtec
    work = tmp_path_factory.mktemp("trained_model")
    datamodule = MVTecAD(root=root, category=category, train_batch_size=4, eval_batch_size=4, num_workers=0)
    model = ConTNetPaDiM(backbone="contnet_ti", pre_trained=False)
    engine = Engine(default_root_dir=work, logger=False, enable_progress_bar=False)
    engine.fit(model=model, datamodule=datamodule)
    checkpoint = work / "model.ckpt"
    engine.trainer.save_checkpoint(checkpoint)
    return TrainedModel(model.eval(), engine, datamodule, checkpoint, root, category)
