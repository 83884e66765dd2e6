"""The checkpoint defines the model: through the stock CLI, ``load_from_checkpoint`` and export.

Two checkpoints are fitted with the stock ``anomalib train``: contnet_ti on ``layer2`` +
``layer3`` at 64 px, and timm's ``efficientnet_lite0`` (untrained weights, as no download is
possible here). Commands that name no ``--model.*`` argument must reproduce the fitted
scores; a contradicting argument must be refused before any batch, naming both values.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from anomalib.data import MVTecAD
from anomalib.deploy import OpenVINOInferencer, TorchInferencer
from anomalib.engine import Engine
from stock_cli import reported_metric, run_anomalib, run_anomalib_process

from anomalib_contnet import ConTNetPaDiM

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore:.*training images for")]

CONTNET_ARGUMENTS = ("--model.backbone", "contnet_ti", "--model.layers", "[layer2,layer3]")
CONTNET_SIZE = ("--model.image_size", "[64,64]")
LITE0_ARGUMENTS = ("--model.backbone", "efficientnet_lite0", "--model.layers", "[blocks.4,blocks.6]")


@dataclass(frozen=True)
class Fitted:
    checkpoint: Path
    image_auroc: float
    pixel_auroc: float
    root: Path
    category: str


def data_arguments(root: Path, category: str) -> list[str]:
    return ["--data", "MVTecAD", "--data.root", str(root), "--data.category", category, "--data.num_workers", "0"]


def fit_with_cli(tiny_mvtec, work: Path, *model_arguments: str) -> Fitted:
    root, category = tiny_mvtec
    output = run_anomalib(
        "train",
        "--model",
        "ConTNetPaDiM",
        "--model.pre_trained",
        "false",
        *model_arguments,
        *data_arguments(root, category),
        "--default_root_dir",
        str(work),
        cwd=work.parent,
    )
    (checkpoint,) = work.rglob("*.ckpt")
    return Fitted(
        checkpoint, reported_metric(output, "image_AUROC"), reported_metric(output, "pixel_AUROC"), root, category
    )


@pytest.fixture(scope="module")
def contnet_checkpoint(tiny_mvtec, tmp_path_factory: pytest.TempPathFactory) -> Fitted:
    work = tmp_path_factory.mktemp("contnet_layer2_layer3") / "results"
    return fit_with_cli(tiny_mvtec, work, *CONTNET_ARGUMENTS, *CONTNET_SIZE)


@pytest.fixture(scope="module")
def lite0_checkpoint(tiny_mvtec, tmp_path_factory: pytest.TempPathFactory) -> Fitted:
    work = tmp_path_factory.mktemp("lite0") / "results"
    return fit_with_cli(tiny_mvtec, work, *LITE0_ARGUMENTS)


def cli(command: str, fitted: Fitted, work: Path, *arguments: str) -> tuple[int, str]:
    """``anomalib <command> --model ConTNetPaDiM <arguments> --ckpt_path <fitted>``, writing under ``work``."""
    if command == "export":
        where = ["--export_root", str(work)]
    else:
        where = [*data_arguments(fitted.root, fitted.category), "--default_root_dir", str(work)]
    work.mkdir(parents=True, exist_ok=True)
    return run_anomalib_process(
        command, "--model", "ConTNetPaDiM", *arguments, *where, "--ckpt_path", str(fitted.checkpoint), cwd=work
    )


def refusal(output: str) -> str:
    """The refusal's text with the terminal's line breaks and table borders taken out."""
    return " ".join(re.sub(r"[│╭╮╰╯─]", " ", output).split())


@pytest.mark.parametrize("fixture", ["contnet_checkpoint", "lite0_checkpoint"])
def test_test_without_model_arguments_reproduces_the_fitted_scores(fixture, request, tmp_path) -> None:
    fitted: Fitted = request.getfixturevalue(fixture)
    returncode, output = cli("test", fitted, tmp_path / "results")
    assert returncode == 0, output[-4000:]
    assert reported_metric(output, "image_AUROC") == fitted.image_auroc
    assert reported_metric(output, "pixel_AUROC") == fitted.pixel_auroc


@pytest.mark.parametrize(
    ("arguments", "named"),
    [
        (
            ("--model.layers", "[layer3,layer2]"),
            "layers=['layer3', 'layer2'] contradicts the checkpoint, which was fitted with layers=['layer2', 'layer3']",
        ),
        (("--model.layers", "[layer2,layer4]"), "layers=['layer2', 'layer4'] contradicts"),
        (
            ("--model.image_size", "[32,32]"),
            "image_size=(32, 32) contradicts the checkpoint, which was fitted with image_size=[64, 64]",
        ),
        (("--model.backbone", "contnet_s"), "backbone='contnet_s' contradicts"),
    ],
)
@pytest.mark.parametrize("command", ["test", "predict"])
def test_contradicting_arguments_are_refused_before_any_batch(
    command, arguments, named, contnet_checkpoint, tmp_path
) -> None:
    returncode, output = cli(command, contnet_checkpoint, tmp_path / "results", *arguments)
    assert returncode != 0
    text = refusal(output)
    assert named in text, text[-3000:]
    assert f"no --model.{arguments[0].removeprefix('--model.')} on the command line" in text
    assert "Testing DataLoader" not in output
    assert "Predicting DataLoader" not in output


def test_a_sibling_timm_backbone_is_refused(lite0_checkpoint, tmp_path) -> None:
    sibling = ("--model.backbone", "tf_efficientnet_lite0", "--model.layers", "[blocks.4,blocks.6]")
    returncode, output = cli("test", lite0_checkpoint, tmp_path / "results", *sibling)
    assert returncode != 0
    expected = "backbone='tf_efficientnet_lite0' contradicts the checkpoint, which was fitted with "
    assert expected + "backbone='efficientnet_lite0'" in refusal(output)


@pytest.mark.parametrize("arguments", [("--model.layers", "[layer3,layer2]"), ("--model.image_size", "[96,96]")])
def test_an_incremental_fit_with_contradicting_arguments_is_refused(arguments, contnet_checkpoint, tmp_path) -> None:
    before = contnet_checkpoint.checkpoint.read_bytes()
    returncode, output = cli("fit", contnet_checkpoint, tmp_path / "results", "--model.incremental", "true", *arguments)
    assert returncode != 0
    assert "contradicts the checkpoint" in refusal(output)
    assert not list((tmp_path / "results").rglob("*.ckpt"))
    assert contnet_checkpoint.checkpoint.read_bytes() == before


def test_an_incremental_fit_without_model_arguments_continues_the_checkpoints_model(
    contnet_checkpoint, tmp_path
) -> None:
    returncode, output = cli("fit", contnet_checkpoint, tmp_path / "results", "--model.incremental", "true")
    assert returncode == 0, output[-4000:]
    (written,) = (tmp_path / "results").rglob("*.ckpt")
    saved = torch.load(written, weights_only=True)
    fitted = torch.load(contnet_checkpoint.checkpoint, weights_only=True)
    assert int(saved["state_dict"]["model.gaussian.count"]) == 2 * int(fitted["state_dict"]["model.gaussian.count"])
    assert saved["anomalib_contnet_model_arguments"] == fitted["anomalib_contnet_model_arguments"]


def test_load_from_checkpoint_refuses_contradicting_overrides(contnet_checkpoint) -> None:
    with pytest.raises(
        ValueError, match=r"layers=\('layer3', 'layer2'\) contradicts .* with layers=\['layer2', 'layer3'\]"
    ):
        ConTNetPaDiM.load_from_checkpoint(contnet_checkpoint.checkpoint, layers=("layer3", "layer2"))
    with pytest.raises(ValueError, match=r"sigma=2\.0 contradicts the checkpoint, which was fitted with sigma=4\.0"):
        ConTNetPaDiM.load_from_checkpoint(contnet_checkpoint.checkpoint, sigma=2.0)
    model = ConTNetPaDiM.load_from_checkpoint(contnet_checkpoint.checkpoint)
    assert tuple(model.model.feature_extractor.layers) == ("layer2", "layer3")
    assert model.pre_processor.image_size == (64, 64)


def engine_scores(model: ConTNetPaDiM, fitted: Fitted, work: Path) -> dict[str, float]:
    """{test image path: normalised score} from ``Engine.predict`` on the test split."""
    datamodule = MVTecAD(root=fitted.root, category=fitted.category, eval_batch_size=4, num_workers=0)
    engine = Engine(default_root_dir=work, logger=False, enable_progress_bar=False)
    batches = engine.predict(model=model, datamodule=datamodule)
    return {
        str(path): float(score)
        for batch in batches
        for path, score in zip(batch.image_path, batch.pred_score.flatten(), strict=True)
    }


def test_export_and_inferencers_reproduce_the_checkpoint_whatever_the_command_line_says(
    contnet_checkpoint, tmp_path
) -> None:
    """The export is built from the checkpoint alone (anomalib reloads it): ``--model.*`` cannot reach it."""
    exports = tmp_path / "exports"
    for export_type in ("openvino", "torch"):
        returncode, output = cli(
            "export", contnet_checkpoint, exports, "--export_type", export_type, "--model.layers", "[layer3,layer4]"
        )
        assert returncode == 0, output[-4000:]
    fitted = ConTNetPaDiM.load_from_checkpoint(contnet_checkpoint.checkpoint)
    by_file = engine_scores(fitted, contnet_checkpoint, tmp_path / "predict")
    files = sorted(by_file)
    expected = np.array([by_file[path] for path in files])
    openvino = OpenVINOInferencer(
        path=exports / "weights" / "openvino" / "model.xml", device="CPU", config={"INFERENCE_PRECISION_HINT": "f32"}
    )
    deployed = np.array([openvino.predict(path).pred_score.item() for path in files])
    np.testing.assert_allclose(deployed, expected, rtol=1e-4, atol=1e-6)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TRUST_REMOTE_CODE", "1")
        torch_inferencer = TorchInferencer(path=exports / "weights" / "torch" / "model.pt", device="cpu")
    pickled = np.array([torch_inferencer.predict(path).pred_score.item() for path in files])
    np.testing.assert_allclose(pickled, expected, rtol=1e-5, atol=1e-6)
