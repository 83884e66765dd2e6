"""Shared fixtures: a tiny MVTec-layout dataset and a small ConTNetPaDiM trained on it through anomalib's Engine."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("ANOMALIB_CONTNET_OFFLINE", "1")

TINY_CATEGORY = "brick"
TINY_SIZES = {"n_train": 12, "n_test_good": 4, "n_test_defect": 4, "image_size": 128, "seed": 0}


@dataclass(frozen=True)
class TrainedModel:
    """A fitted model with the engine, datamodule and checkpoint that produced it."""

    model: object
    engine: object
    datamodule: object
    checkpoint: Path
    dataset_root: Path
    category: str


@pytest.fixture(scope="session")
def tiny_mvtec(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """(root, category) of a small MVTec AD-layout dataset with obvious defects and exact masks."""
    from anomalib_contnet.data import make_tiny_mvtec  # noqa: PLC0415

    root = make_tiny_mvtec(tmp_path_factory.mktemp("tiny_mvtec"), category=TINY_CATEGORY, **TINY_SIZES)
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
