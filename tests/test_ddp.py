"""Distributed fitting through the stock CLI when some processes hold no real training image.

DistributedSampler gives every process the same number of samples by repeating
some; with 3 images on 4 processes, one process gets only such padding. All
processes must still agree on the total and fit the Gaussians one process would.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import torch
from anomalib.data import MVTecAD
from anomalib.engine import Engine
from stock_cli import run_anomalib, run_anomalib_process
from test_cli import gaussian_summary, saved_gaussian, train_arguments

from anomalib_contnet import ConTNetPaDiM

FOUR_PROCESSES = ("--trainer.devices", "4", "--trainer.strategy", "ddp", "--trainer.accelerator", "cpu")


def with_training_images(tiny_mvtec: tuple[Path, str], target: Path, keep: int) -> Path:
    """A copy of the tiny dataset whose training folder holds only the first ``keep`` images."""
    source_root, category = tiny_mvtec
    shutil.copytree(source_root, target)
    for image in sorted((target / category / "train" / "good").iterdir())[keep:]:
        image.unlink()
    return target


@pytest.mark.slow
def test_three_images_on_four_processes_fit_the_single_process_gaussian(tiny_mvtec, tmp_path: Path) -> None:
    category = tiny_mvtec[1]
    root = with_training_images(tiny_mvtec, tmp_path / "data", keep=3)
    output = run_anomalib(*train_arguments(root, category, tmp_path / "four", *FOUR_PROCESSES), cwd=tmp_path)
    assert output.count("3 training images for 1152 feature dimensions") == 1, output[-5000:]  # first process only

    model = ConTNetPaDiM(backbone="contnet_ti", pre_trained=False)
    data = MVTecAD(root=root, category=category, train_batch_size=4, eval_batch_size=4, num_workers=0)
    Engine(default_root_dir=tmp_path / "one", logger=False, enable_progress_bar=False).fit(model=model, datamodule=data)
    distributed = saved_gaussian(tmp_path / "four")
    single = gaussian_summary(model.model.gaussian.state_dict())
    assert int(distributed["count"]) == int(single["count"]) == 3
    torch.testing.assert_close(distributed["mean"], single["mean"], rtol=1e-4, atol=1e-5)
    # Each process runs the backbone on other batch sizes and thread counts, so features differ in the last float32
    # bits; the covariance of 3 images is compared to 1e-5 of its largest entry.
    covariance = single["covariance"]
    scale = float(covariance.abs().max())
    torch.testing.assert_close(distributed["covariance"], covariance, rtol=1e-4, atol=1e-5 * scale)


@pytest.mark.slow
def test_empty_training_folder_fails_on_every_process(tiny_mvtec, tmp_path: Path) -> None:
    category = tiny_mvtec[1]
    root = with_training_images(tiny_mvtec, tmp_path / "data", keep=0)
    returncode, output = run_anomalib_process(
        *train_arguments(root, category, tmp_path / "four", *FOUR_PROCESSES), cwd=tmp_path
    )
    assert returncode != 0
    raised = re.findall(r"ValueError: num_samples should be a positive integer value, but got num_samples=0", output)
    assert len(raised) == 4, output[-5000:]
    assert not list((tmp_path / "four").rglob("*.ckpt"))
