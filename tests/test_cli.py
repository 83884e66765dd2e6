"""The stock ``anomalib`` command line drives ConTNetPaDiM: train, test, multi-process DDP."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ANOMALIB = str(Path(sys.executable).with_name("anomalib"))


def run_anomalib(*arguments: str, cwd: Path) -> str:
    """Run the stock CLI in a fresh process; return its output, failing the test with it on error."""
    environment = os.environ | {"HF_HUB_OFFLINE": "1", "ANOMALIB_CONTNET_OFFLINE": "1", "COLUMNS": "200"}
    result = subprocess.run(
        [ANOMALIB, *arguments], cwd=cwd, env=environment, capture_output=True, text=True, timeout=900, check=False
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-5000:]
    return output


def reported_metric(output: str, name: str) -> float:
    match = re.search(rf"{name}\s*│\s*([0-9.]+)", output)
    assert match, f"{name} missing from the CLI output:\n{output[-3000:]}"
    return float(match.group(1))


def train_arguments(root: Path, category: str, results: Path, *extra: str) -> list[str]:
    return [
        "train",
        "--model",
        "ConTNetPaDiM",
        "--model.pre_trained",
        "false",
        "--model.backbone",
        "contnet_ti",
        "--data",
        "MVTec",
        "--data.root",
        str(root),
        "--data.category",
        category,
        "--data.train_batch_size",
        "4",
        "--data.eval_batch_size",
        "4",
        "--data.num_workers",
        "0",
        "--default_root_dir",
        str(results),
        *extra,
    ]


def saved_gaussian(results: Path) -> dict[str, torch.Tensor]:
    (checkpoint,) = results.rglob("*.ckpt")
    state = torch.load(checkpoint, weights_only=True)["state_dict"]
    return {key: value for key, value in state.items() if key.startswith("model.gaussian.")}


@pytest.mark.slow
def test_stock_cli_trains_and_tests_with_the_anomalib_1x_data_name(tiny_mvtec, tmp_path) -> None:
    root, category = tiny_mvtec
    output = run_anomalib(*train_arguments(root, category, tmp_path / "results"), cwd=tmp_path)
    assert reported_metric(output, "image_AUROC") > 0.9
    assert reported_metric(output, "pixel_AUROC") > 0.85


@pytest.mark.slow
def test_ddp_on_two_processes_gives_the_same_gaussian_as_one(tiny_mvtec, tmp_path) -> None:
    """An odd number of training images also checks that DistributedSampler's padding is not counted twice."""
    source_root, category = tiny_mvtec
    root = tmp_path / "data"
    shutil.copytree(source_root, root)
    train_images = sorted((root / category / "train" / "good").iterdir())
    if len(train_images) % 2 == 0:
        train_images[-1].unlink()

    run_anomalib(*train_arguments(root, category, tmp_path / "one"), cwd=tmp_path)
    run_anomalib(
        *train_arguments(
            root,
            category,
            tmp_path / "two",
            "--trainer.devices",
            "2",
            "--trainer.strategy",
            "ddp",
            "--trainer.accelerator",
            "cpu",
        ),
        cwd=tmp_path,
    )
    single, distributed = saved_gaussian(tmp_path / "one"), saved_gaussian(tmp_path / "two")
    assert set(single) == {"model.gaussian.mean", "model.gaussian.precision_factor"}
    for key, value in single.items():
        torch.testing.assert_close(distributed[key], value, rtol=1e-4, atol=1e-5)
