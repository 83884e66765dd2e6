"""``precision``: the backbone computes in bfloat16 (autocast), the Gaussians and maps stay float32.

contnet_ti ConTNetPaDiMs (random weights) are fitted through anomalib's Engine in
bfloat16 and in float32 on the same small dataset and compared.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from anomalib import PrecisionType
from anomalib.data import MVTecAD
from anomalib.data.utils import read_image
from anomalib.deploy import ExportType, TorchInferencer
from anomalib.engine import Engine

from anomalib_contnet import ConTNetPaDiM, ConTNetPaDiMModel
from anomalib_contnet.data import make_tiny_mvtec

CATEGORY = "brick"

SCORE_TOLERANCE = 3e-3
"""Largest image-score change allowed, relative to the largest float32 score.

Measured here: 3.4e-4 (bfloat16 features differ from float32 ones by about 1 %, but
the distance sums over 1152 dimensions, whose rounding errors mostly cancel). The
margin of about 9x leaves room for other CPUs' bfloat16 kernels.
"""


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Few images: bfloat16 runs about 6x slower than float32 on CPUs without bfloat16 instructions."""
    return make_tiny_mvtec(
        tmp_path_factory.mktemp("precision"),
        category=CATEGORY,
        n_train=6,
        n_test_good=2,
        n_test_defect=2,
        image_size=128,
    )


def fit(dataset: Path, precision: str, work: Path) -> tuple[ConTNetPaDiM, Engine]:
    datamodule = MVTecAD(root=dataset, category=CATEGORY, train_batch_size=3, eval_batch_size=4, num_workers=0)
    model = ConTNetPaDiM(backbone="contnet_ti", pre_trained=False, precision=precision)
    engine = Engine(default_root_dir=work, logger=False, enable_progress_bar=False)
    engine.fit(model=model, datamodule=datamodule)
    return model.eval(), engine


@pytest.fixture(scope="module")
def bfloat16_model(dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[ConTNetPaDiM, Engine]:
    return fit(dataset, "bfloat16", tmp_path_factory.mktemp("bfloat16"))


@pytest.fixture(scope="module")
def float32_model(dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> ConTNetPaDiM:
    return fit(dataset, "float32", tmp_path_factory.mktemp("float32"))[0]


@pytest.fixture(scope="module")
def test_images(dataset: Path) -> torch.Tensor:
    paths = sorted((dataset / CATEGORY / "test").glob("*/*.png"))
    return torch.stack([read_image(path, as_tensor=True) for path in paths])


def raw_outputs(model: ConTNetPaDiM, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Image scores and anomaly maps before the post-processor's normalisation."""
    with torch.no_grad():
        outputs = model.model(model.pre_processor(images))
    return outputs.pred_score, outputs.anomaly_map


@pytest.fixture(scope="module")
def bfloat16_outputs(bfloat16_model, test_images) -> tuple[torch.Tensor, torch.Tensor]:
    return raw_outputs(bfloat16_model[0], test_images)


def test_bfloat16_scores_are_close_to_float32_and_not_the_same(bfloat16_outputs, float32_model, test_images) -> None:
    scores, maps = bfloat16_outputs
    reference_scores, _ = raw_outputs(float32_model, test_images)
    change = float((scores - reference_scores).abs().max() / reference_scores.abs().max())
    assert 0 < change <= SCORE_TOLERANCE, change
    assert scores.dtype == maps.dtype == torch.float32


def test_gaussians_and_backbone_weights_stay_float32(bfloat16_model) -> None:
    torch_model = bfloat16_model[0].model
    gaussian = torch_model.gaussian
    assert gaussian.mean.dtype == gaussian.precision_factor.dtype == torch.float32
    assert {parameter.dtype for parameter in torch_model.feature_extractor.parameters()} == {torch.float32}
    image = torch.rand(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    assert torch_model.extract_embedding(image).dtype == torch.float32


def test_precision_survives_a_checkpoint(bfloat16_model, bfloat16_outputs, test_images, tmp_path: Path) -> None:
    _, engine = bfloat16_model
    checkpoint = tmp_path / "bfloat16.ckpt"
    engine.trainer.save_checkpoint(checkpoint)
    loaded = ConTNetPaDiM.load_from_checkpoint(checkpoint).eval()
    assert loaded.model.precision == "bfloat16"
    torch.testing.assert_close(raw_outputs(loaded, test_images), bfloat16_outputs, rtol=0, atol=0)


def test_precision_takes_anomalibs_spelling_and_refuses_others() -> None:
    assert ConTNetPaDiMModel(backbone="contnet_ti", pre_trained=False, precision=PrecisionType.FLOAT16).precision == (
        "float16"
    )
    with pytest.raises(ValueError, match=r"precision must be one of \['float32', 'float16', 'bfloat16'\]"):
        ConTNetPaDiM(backbone="contnet_ti", pre_trained=False, precision="int8")


def test_onnx_export_is_refused_with_the_reason_and_torch_export_keeps_the_precision(
    bfloat16_model, test_images, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, engine = bfloat16_model
    for export_type in (ExportType.ONNX, ExportType.OPENVINO):  # refused before tracing, with the reason on top
        with pytest.raises(NotImplementedError, match=r"precision='bfloat16' cannot be exported to ONNX/OpenVINO"):
            engine.export(model, export_type, export_root=tmp_path)
    assert not (tmp_path / "weights" / "onnx").exists()
    assert not (tmp_path / "weights" / "openvino").exists()
    path = engine.export(model, ExportType.TORCH, export_root=tmp_path)
    monkeypatch.setenv("TRUST_REMOTE_CODE", "1")
    inferencer = TorchInferencer(path, device="cpu")
    assert inferencer.model.model.precision == "bfloat16"
    with torch.no_grad():
        expected = model(test_images[:2])
    torch.testing.assert_close(inferencer.predict(test_images[:2]).pred_score, expected.pred_score)
