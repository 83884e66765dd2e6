"""A trained checkpoint is the whole model: loading it never looks for the backbone's weights file.

Models are fitted through anomalib's Engine with ``weights=<file>`` (a contnet_ti
checkpoint written by our builder, of each shortcut architecture); the file is
then deleted, and every way of loading the trained checkpoint must still work
offline and predict bit-identically, with the architecture it was fitted as.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import timm
import torch
from anomalib.data import MVTecAD
from anomalib.engine import Engine
from stock_cli import run_anomalib

from anomalib_contnet import ConTNetPaDiM

BACKBONE_PREFIX = "model.feature_extractor.backbone."
AVG_DOWN_KEY = "layer1.ConTBlock0.downsample.conv.conv.weight"
STRIDED_KEY = "layer1.ConTBlock0.downsample.conv.weight"


@dataclass(frozen=True)
class Fitted:
    """A model fitted on a weights file that no longer exists, with what it predicted."""

    checkpoint: Path
    deleted_weights: Path
    scores: torch.Tensor
    maps: torch.Tensor
    shortcut: str
    data_root: Path


def engine(work: Path) -> Engine:
    return Engine(default_root_dir=work, logger=False, enable_progress_bar=False, enable_model_summary=False)


def predictions(engine_: Engine, **arguments: object) -> tuple[torch.Tensor, torch.Tensor]:
    batches = engine_.predict(**arguments)
    return torch.cat([batch.pred_score.flatten() for batch in batches]), torch.cat([b.anomaly_map for b in batches])


@pytest.fixture(scope="module", params=["strided", "avg_down"])
def fitted(request: pytest.FixtureRequest, tiny_mvtec, tmp_path_factory: pytest.TempPathFactory) -> Fitted:
    shortcut = request.param
    root, category = tiny_mvtec
    work = tmp_path_factory.mktemp(f"fitted_{shortcut}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)  # weights unlike the seeded untrained ones a model starts from
        weights = work / "contnet_ti.pth"
        torch.save(timm.create_model("contnet_ti", avg_down=shortcut == "avg_down").state_dict(), weights)
    data = tiny_datamodule(tiny_mvtec)
    model = ConTNetPaDiM(backbone="contnet_ti", weights=str(weights))
    runner = engine(work)
    runner.fit(model=model, datamodule=data)
    checkpoint = work / "fitted.ckpt"
    runner.trainer.save_checkpoint(checkpoint)
    scores, maps = predictions(runner, model=model, datamodule=data)
    weights.unlink()
    return Fitted(checkpoint, weights, scores, maps, shortcut, root / category)


def test_fitting_loads_the_weights_file_and_records_the_architecture(fitted: Fitted) -> None:
    saved = torch.load(fitted.checkpoint, weights_only=True)
    keys = saved["state_dict"].keys()
    expected, other = (AVG_DOWN_KEY, STRIDED_KEY) if fitted.shortcut == "avg_down" else (STRIDED_KEY, AVG_DOWN_KEY)
    assert BACKBONE_PREFIX + expected in keys
    assert BACKBONE_PREFIX + other not in keys
    untrained = ConTNetPaDiM(backbone="contnet_ti", pre_trained=False).state_dict()
    fitted_qkv = saved["state_dict"][BACKBONE_PREFIX + "layer2.ConTBlock0.ste1.attn.qkv.weight"]
    assert not torch.equal(fitted_qkv, untrained[BACKBONE_PREFIX + "layer2.ConTBlock0.ste1.attn.qkv.weight"])


def tiny_datamodule(tiny_mvtec: tuple[Path, str]) -> MVTecAD:
    root, category = tiny_mvtec
    return MVTecAD(root=root, category=category, train_batch_size=4, eval_batch_size=4, num_workers=0)


def test_load_from_checkpoint_works_without_the_weights_file(fitted: Fitted, tiny_mvtec, tmp_path: Path) -> None:
    assert not fitted.deleted_weights.exists()
    restored = ConTNetPaDiM.load_from_checkpoint(fitted.checkpoint)
    assert restored.model.feature_extractor.shortcut == fitted.shortcut
    assert restored.hparams["weights"] == str(fitted.deleted_weights)
    scores, maps = predictions(engine(tmp_path), model=restored, datamodule=tiny_datamodule(tiny_mvtec))
    assert torch.equal(scores, fitted.scores)
    assert torch.equal(maps, fitted.maps)


@pytest.mark.parametrize("weights_argument", ["deleted file", "unreachable URL"])
def test_engine_with_ckpt_path_predicts_bit_identically_offline(
    fitted: Fitted, weights_argument: str, tiny_mvtec, tmp_path: Path
) -> None:
    """The model a user builds before ``ckpt_path`` starts from the variant's default shortcut and must follow."""
    weights = str(fitted.deleted_weights) if weights_argument == "deleted file" else "http://127.0.0.1:9/contnet_ti.pth"
    data = tiny_datamodule(tiny_mvtec)
    model = ConTNetPaDiM(backbone="contnet_ti", weights=weights)
    scores, maps = predictions(engine(tmp_path), model=model, datamodule=data, ckpt_path=str(fitted.checkpoint))
    assert model.model.feature_extractor.shortcut == fitted.shortcut
    assert torch.equal(scores, fitted.scores)
    assert torch.equal(maps, fitted.maps)
    (results,) = engine(tmp_path / "test").test(model=model, datamodule=data, ckpt_path=str(fitted.checkpoint))
    assert results["image_AUROC"] > 0.5


@pytest.mark.slow
@pytest.mark.parametrize("fitted", ["avg_down"], indirect=True)  # the architecture that is not contnet_ti's default
def test_every_stock_cli_subcommand_loads_the_checkpoint_without_the_weights_file(
    fitted: Fitted, tiny_mvtec, tmp_path: Path
) -> None:
    root, category = tiny_mvtec
    model = [
        "--model",
        "ConTNetPaDiM",
        "--model.backbone",
        "contnet_ti",
        "--model.weights",
        str(fitted.deleted_weights),
    ]
    checkpoint = ["--ckpt_path", str(fitted.checkpoint)]
    data = ["--data", "MVTecAD", "--data.root", str(root), "--data.category", category, "--data.num_workers", "0"]
    output = run_anomalib("test", *model, *data, *checkpoint, "--default_root_dir", str(tmp_path / "t"), cwd=tmp_path)
    assert "image_AUROC" in output
    run_anomalib(
        "predict", *model, "--data", str(fitted.data_root / "test"), *checkpoint,
        "--default_root_dir", str(tmp_path / "p"), cwd=tmp_path,
    )  # fmt: skip
    assert any((tmp_path / "p").rglob("*.png"))
    run_anomalib(
        "export", *model, *checkpoint, "--export_type", "torch", "--export_root", str(tmp_path / "e"), cwd=tmp_path
    )
    (exported,) = (tmp_path / "e").rglob("*.pt")
    deployed = torch.load(exported, weights_only=False)["model"].eval()  # our own file, written just now
    restored = ConTNetPaDiM.load_from_checkpoint(fitted.checkpoint).eval()
    images = torch.rand(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, actual = restored.model(images), deployed.model(images)
    assert torch.equal(actual.anomaly_map, expected.anomaly_map)
    assert deployed.model.feature_extractor.shortcut == "avg_down"
