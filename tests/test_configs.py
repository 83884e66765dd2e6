"""The shipped configs on the stock ``anomalib`` CLI, and the README's own-images flow: train on a folder, predict."""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from PIL import Image
from stock_cli import reported_metric, run_anomalib

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
MODEL_CONFIG = CONFIGS / "model" / "contnet_padim.yaml"
BEST_CONFIG = CONFIGS / "model" / "contnet_padim_best.yaml"
DATASET_NAME = "my_parts"
"""The ``name`` in configs/data/folder.yaml: anomalib writes results under results/ConTNetPaDiM/<name>/."""
SMALL_MODEL = ("--model.backbone", "contnet_ti", "--model.pre_trained", "false")
SMALL_LOADERS = ("--data.train_batch_size", "4", "--data.eval_batch_size", "4", "--data.num_workers", "0")


def test_every_config_is_model_only_or_data_only() -> None:
    """As anomalib lays them out: configs/model/ and configs/data/, each file one ``class_path`` + ``init_args``."""
    configs = sorted(CONFIGS.rglob("*.yaml"))
    assert {path.parent.name for path in configs} == {"model", "data"}
    for path in configs:
        keys = [line.split(":")[0] for line in path.read_text().splitlines() if re.match(r"^[a-z_]+:", line)]
        assert keys == ["class_path", "init_args"], f"{path} is not a single model or data config"


@pytest.mark.slow
def test_model_and_mvtec_configs_combine_on_the_stock_cli(tmp_path: Path) -> None:
    output = run_anomalib(
        "train", "--model", str(MODEL_CONFIG), "--data", str(CONFIGS / "data" / "mvtec_ad.yaml"), "--print_config",
        cwd=tmp_path,
    )  # fmt: skip
    assert "class_path: anomalib_contnet.ConTNetPaDiM" in output
    assert "class_path: anomalib.data.MVTecAD" in output
    assert re.search(r"layers:\n\s*- layer3\n\s*- layer4\n", output)


@dataclass(frozen=True)
class OwnImages:
    """A user's folder of good and defect images, the run that trained on it, and new images to predict."""

    root: Path
    new_images: Path
    results: Path
    train_output: str


@pytest.fixture(scope="module")
def trained_on_own_folder(tiny_mvtec: tuple[Path, str], tmp_path_factory: pytest.TempPathFactory) -> OwnImages:
    """Lay the tiny texture set out as good/ defect/ mask/ and run the README's train command on it."""
    source_root, category = tiny_mvtec
    source = source_root / category
    work = tmp_path_factory.mktemp("own_images")
    root, new_images = work / DATASET_NAME, work / "new_parts"
    for split in ("train", "test"):
        for image in sorted((source / split / "good").glob("*.png")):
            _copy(image, root / "good" / f"{split}_{image.name}")
    defect_folders = [folder for folder in (source / "test").iterdir() if folder.name != "good"]
    for folder in defect_folders:
        for image in sorted(folder.glob("*.png")):
            _copy(image, root / "defect" / f"{folder.name}_{image.name}")
        for mask in sorted((source / "ground_truth" / folder.name).glob("*.png")):
            _copy(mask, root / "mask" / f"{folder.name}_{mask.name}")
    for image in sorted((root / "defect").glob("*.png"))[:2] + sorted((root / "good").glob("test_*.png"))[:1]:
        _copy(image, new_images / image.name)

    results = work / "results"
    output = run_anomalib(
        "train", "--model", str(MODEL_CONFIG), *SMALL_MODEL,
        "--data", str(CONFIGS / "data" / "folder.yaml"), "--data.root", str(root), "--data.mask_dir", "mask",
        *SMALL_LOADERS, "--default_root_dir", str(results),
        cwd=work,
    )  # fmt: skip
    return OwnImages(root, new_images, results, output)


def _copy(source: Path, destination: Path) -> None:
    destination.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, destination)


@pytest.mark.slow
def test_train_on_a_folder_of_good_and_defect_images(trained_on_own_folder: OwnImages) -> None:
    """configs/model + configs/data/folder.yaml end to end: fit on good/, test on held-out good/ and defect/."""
    assert reported_metric(trained_on_own_folder.train_output, "image_AUROC") > 0.9
    assert reported_metric(trained_on_own_folder.train_output, "pixel_AUROC") > 0.85
    checkpoint = trained_on_own_folder.results / "ConTNetPaDiM" / DATASET_NAME / "latest" / "weights" / "lightning"
    assert (checkpoint / "model.ckpt").is_file()


@pytest.mark.slow
def test_predict_on_a_folder_writes_one_result_image_per_input(
    trained_on_own_folder: OwnImages, tmp_path: Path
) -> None:
    """The README's predict command; its result images land where the README says."""
    checkpoint = next(trained_on_own_folder.results.rglob("model.ckpt"))
    results = tmp_path / "results"
    run_anomalib(
        "predict", "--model", str(MODEL_CONFIG), *SMALL_MODEL,
        "--data", str(trained_on_own_folder.new_images), "--ckpt_path", str(checkpoint),
        "--default_root_dir", str(results),
        cwd=tmp_path,
    )  # fmt: skip
    # No dataset name on predict, so anomalib writes under <default_root_dir>/<model>/latest/images/<input folder>/.
    written = sorted((results / "ConTNetPaDiM" / "latest" / "images" / "new_parts").glob("*.png"))
    inputs = sorted(trained_on_own_folder.new_images.glob("*.png"))
    assert [path.name for path in written] == [path.name for path in inputs]
    for path, source in zip(written, inputs, strict=True):
        with Image.open(path) as result, Image.open(source) as image:
            assert result.width > image.width, "expected the image beside its anomaly map, not a copy of the input"


def _init_args(path: Path) -> dict:
    import yaml  # noqa: PLC0415  (jsonargparse's dependency)

    return yaml.safe_load(path.read_text(encoding="utf-8"))["init_args"]


def test_the_best_preset_is_the_benchmarked_head() -> None:
    """configs/model/contnet_padim_best.yaml and the benchmark's contnet_padim_best_* name the same head."""
    from anomalib_contnet.evaluation.configs import BEST_HEAD, MODEL_CONFIGS  # noqa: PLC0415

    preset, paper = _init_args(BEST_CONFIG), _init_args(MODEL_CONFIG)
    benchmarked = MODEL_CONFIGS["contnet_padim_best_contnet_b"]
    assert {name: preset[name] for name in BEST_HEAD} == BEST_HEAD == benchmarked.options
    assert (preset["backbone"], tuple(preset["layers"])) == (benchmarked.backbone, benchmarked.layers)
    assert {name: value for name, value in preset.items() if name not in {*BEST_HEAD, "layers"}} == {
        name: value for name, value in paper.items() if name != "layers"
    }


@pytest.mark.slow
def test_the_best_preset_trains_and_tests_on_the_stock_cli(tiny_mvtec: tuple[Path, str], tmp_path: Path) -> None:
    """The preset's levers through ``anomalib train`` (the small ConTNet: the preset's own needs ImageNet weights)."""
    from anomalib_contnet.evaluation.configs import BEST_HEAD  # noqa: PLC0415

    root, category = tiny_mvtec
    output = run_anomalib(
        "train", "--model", str(BEST_CONFIG), *SMALL_MODEL,
        "--data", "MVTecAD", "--data.root", str(root), "--data.category", category, *SMALL_LOADERS,
        "--default_root_dir", str(tmp_path / "results"),
        cwd=tmp_path,
    )  # fmt: skip
    assert reported_metric(output, "image_AUROC") > 0.9
    checkpoint = torch.load(next((tmp_path / "results").rglob("model.ckpt")), weights_only=False)
    saved, preset = checkpoint["anomalib_contnet_model_arguments"], _init_args(BEST_CONFIG)
    assert {name: saved[name] for name in (*BEST_HEAD, "layers")} == {
        name: preset[name] for name in (*BEST_HEAD, "layers")
    }
