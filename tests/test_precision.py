"""Lightning's ``precision="bf16-mixed"``: the backbone computes in bfloat16, the Gaussians and maps in float32.

contnet_ti ConTNetPaDiMs (random weights) are fitted through anomalib's Engine with
``bf16-mixed`` and with the default precision on the same small dataset and compared.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from anomalib.data import MVTecAD
from anomalib.data.utils import read_image
from anomalib.engine import Engine

from anomalib_contnet import ConTNetPaDiM
from anomalib_contnet.data import make_tiny_mvtec

CATEGORY = "brick"

BFLOAT16_UNIT_ROUNDOFF = 2.0**-8
"""bfloat16 keeps 8 significant bits: one rounding changes a value by at most this much, relatively."""

SCORE_TOLERANCE = 4 * BFLOAT16_UNIT_ROUNDOFF
"""Largest image-score change allowed, relative to the largest float32 score: 4 bfloat16 roundings (1.6e-2).

The scores compare two fits, one with float32 and one with bfloat16 features. A score is a
(smoothed, maximal) Mahalanobis distance, a Euclidean norm of a linear map of the residual
``x - mean``, so its relative change is that of the residual: one rounding for the features
(the last stage's output is stored in bfloat16), one for the fitted mean (an average of such
features), and the errors the earlier stages pass on, which their normalisations keep at the
same relative order (allowed two more). Within this budget, CPUs differ in how they round
inside bfloat16 kernels: 0.09 roundings measured on an Intel Xeon with AMX, 0.81 on an AMD
EPYC with AVX512-BF16. A float32 run changes nothing (the test also asks for a change above 0).
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
    model = ConTNetPaDiM(backbone="contnet_ti", pre_trained=False)
    engine = Engine(default_root_dir=work, logger=False, enable_progress_bar=False, precision=precision)
    engine.fit(model=model, datamodule=datamodule)
    return model.eval(), engine


@pytest.fixture(scope="module")
def bfloat16_model(dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[ConTNetPaDiM, Engine]:
    return fit(dataset, "bf16-mixed", tmp_path_factory.mktemp("bfloat16"))


@pytest.fixture(scope="module")
def float32_model(dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> ConTNetPaDiM:
    return fit(dataset, "32-true", tmp_path_factory.mktemp("float32"))[0]


@pytest.fixture(scope="module")
def test_images(dataset: Path) -> torch.Tensor:
    paths = sorted((dataset / CATEGORY / "test").glob("*/*.png"))
    return torch.stack([read_image(path, as_tensor=True) for path in paths])


def raw_outputs(model: ConTNetPaDiM, images: torch.Tensor, autocast: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Image scores and anomaly maps before the post-processor's normalisation, under bf16-mixed's autocast or not."""
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        outputs = model.model(model.pre_processor(images))
    return outputs.pred_score, outputs.anomaly_map


@pytest.fixture(scope="module")
def bfloat16_outputs(bfloat16_model, test_images) -> tuple[torch.Tensor, torch.Tensor]:
    return raw_outputs(bfloat16_model[0], test_images, autocast=True)


def test_bfloat16_scores_are_close_to_float32_and_not_the_same(bfloat16_outputs, float32_model, test_images) -> None:
    scores, maps = bfloat16_outputs
    reference_scores, _ = raw_outputs(float32_model, test_images, autocast=False)
    change = float((scores - reference_scores).abs().max() / reference_scores.abs().max())
    assert 0 < change <= SCORE_TOLERANCE, change
    assert scores.dtype == maps.dtype == torch.float32


def test_gaussians_and_backbone_weights_stay_float32(bfloat16_model) -> None:
    torch_model = bfloat16_model[0].model
    floating = [value for value in torch_model.gaussian.state_dict().values() if value.is_floating_point()]
    assert {value.dtype for value in floating} == {torch.float32}
    assert {parameter.dtype for parameter in torch_model.feature_extractor.parameters()} == {torch.float32}
    image = torch.rand(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    assert torch_model.extract_embedding(image).dtype == torch.float32
