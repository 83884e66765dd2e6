"""Tiling through anomalib's TilerConfigurationCallback: 448 px inputs cut into 224 px tiles.

One contnet_ti ConTNetPaDiM (random weights, 64 of its 1152 channels so that the
196 per-position Gaussians stay small) is fitted through anomalib's Engine with the
callback; the tests predict with it, export it to OpenVINO and to torch, and check
the settings the model refuses.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import openvino as ov
import pytest
import torch
from anomalib.callbacks import TilerConfigurationCallback
from anomalib.data import MVTecAD
from anomalib.data.utils import read_image
from anomalib.data.utils.tiler import ImageUpscaleMode, Tiler
from anomalib.deploy import ExportType, TorchInferencer
from anomalib.engine import Engine

from anomalib_contnet import ConTNetPaDiM
from anomalib_contnet.data import make_tiny_mvtec

pytestmark = pytest.mark.slow

INPUT_SIDE = 448
TILE_SIDE = 224
CELL = 32  # pixels per patch cell of contnet_ti's layer3/layer4
CATEGORY = "brick"
RELATIVE_TOLERANCE = 1e-4


def tiler_callback(**overrides: object) -> TilerConfigurationCallback:
    settings = {"enable": True, "tile_size": TILE_SIDE, "stride": TILE_SIDE} | overrides
    return TilerConfigurationCallback(**settings)


@dataclass(frozen=True)
class TiledModel:
    model: ConTNetPaDiM
    engine: Engine
    datamodule: MVTecAD
    root: Path


@pytest.fixture(scope="module")
def tiled(tmp_path_factory: pytest.TempPathFactory) -> TiledModel:
    work = tmp_path_factory.mktemp("tiled")
    root = make_tiny_mvtec(
        work / "data", category=CATEGORY, n_train=8, n_test_good=2, n_test_defect=2, image_size=INPUT_SIDE
    )
    datamodule = MVTecAD(root=root, category=CATEGORY, train_batch_size=4, eval_batch_size=4, num_workers=0)
    model = ConTNetPaDiM(backbone="contnet_ti", pre_trained=False, n_features=64, image_size=(INPUT_SIDE, INPUT_SIDE))
    engine = Engine(default_root_dir=work, logger=False, enable_progress_bar=False, callbacks=[tiler_callback()])
    engine.fit(model=model, datamodule=datamodule)
    return TiledModel(model.eval(), engine, datamodule, root)


@pytest.fixture(scope="module")
def test_images(tiled: TiledModel) -> torch.Tensor:
    paths = sorted((tiled.root / CATEGORY / "test").glob("*/*.png"))
    return torch.stack([read_image(path, as_tensor=True) for path in paths])


def eager_outputs(model: ConTNetPaDiM, images: torch.Tensor) -> dict[str, np.ndarray]:
    with torch.no_grad():
        outputs = model(images)
    return {"pred_score": outputs.pred_score.numpy(), "anomaly_map": outputs.anomaly_map.numpy()}


def assert_close(actual: np.ndarray, expected: np.ndarray, name: str) -> None:
    assert actual.shape == expected.shape, name
    scale = float(np.abs(expected).max())
    np.testing.assert_allclose(actual, expected, rtol=RELATIVE_TOLERANCE, atol=RELATIVE_TOLERANCE * scale, err_msg=name)


# ----------------------------------------------------------------- fitting
def test_fit_places_one_gaussian_on_every_cell_of_the_untiled_grid(tiled: TiledModel) -> None:
    torch_model = tiled.model.model
    assert isinstance(torch_model.tiler, Tiler)
    grid = INPUT_SIDE // CELL  # 14x14 for the whole image, against 7x7 for one tile
    assert tuple(torch_model.gaussian.mean.shape) == (grid * grid, 64)


def test_untiled_embedding_puts_every_tile_where_it_was_cut(tiled: TiledModel) -> None:
    torch_model = tiled.model.model
    image = torch.rand(1, 3, INPUT_SIDE, INPUT_SIDE, generator=torch.Generator().manual_seed(0))
    embedding = torch_model.extract_embedding(image)
    cells = TILE_SIDE // CELL
    torch_model.tiler = None
    try:
        bottom_left = torch_model.extract_embedding(image[..., TILE_SIDE:, :TILE_SIDE])
    finally:
        torch_model.tiler = Tiler(tile_size=TILE_SIDE, stride=TILE_SIDE)
    torch.testing.assert_close(embedding[..., cells:, :cells], bottom_left)


def test_padded_tiles_keep_only_the_cells_over_the_image(tiled: TiledModel) -> None:
    """480 px needs 3x3 tiles (672 px, zero-padded); the grid keeps the 15x15 cells that cover the image."""
    torch_model = tiled.model.model
    image = torch.rand(1, 3, 480, 480, generator=torch.Generator().manual_seed(1))
    assert tuple(torch_model.extract_embedding(image).shape) == (1, 64, 15, 15)


# -------------------------------------------------------------- prediction
def test_predictions_have_full_size_maps(tiled: TiledModel) -> None:
    batches = tiled.engine.predict(model=tiled.model, datamodule=tiled.datamodule)
    maps = torch.cat([batch.anomaly_map for batch in batches])
    assert maps.shape[0] == 4
    assert tuple(maps.shape[-2:]) == (INPUT_SIDE, INPUT_SIDE)
    assert bool(torch.isfinite(maps).all())


def test_predicting_on_another_grid_than_the_fitted_one_says_what_to_do(tiled: TiledModel) -> None:
    torch_model = tiled.model.model
    image = torch.rand(1, 3, 2 * INPUT_SIDE, 2 * INPUT_SIDE)
    with pytest.raises(ValueError, match=r"fitted on 196 patch positions.*28x28 grid.*TilerConfigurationCallback"):
        torch_model(image)


# ------------------------------------------------------------------ settings
@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"mode": ImageUpscaleMode.INTERPOLATION}, "PADDING mode"),
        ({"remove_border_count": 8}, "remove_border_count=8"),
    ],
)
def test_callback_settings_that_would_misplace_cells_are_refused_at_setup(
    tiled: TiledModel, overrides: dict, message: str
) -> None:
    model = tiled.model
    before = model.model.tiler
    with pytest.raises(ValueError, match=message):
        tiler_callback(**overrides).setup(tiled.engine.trainer, model)
    assert model.model.tiler is before


def test_a_stride_that_is_not_a_whole_number_of_cells_is_refused(tiled: TiledModel) -> None:
    torch_model = tiled.model.model
    torch_model.tiler = Tiler(tile_size=TILE_SIDE, stride=TILE_SIDE - CELL // 2)
    try:
        with pytest.raises(ValueError, match=r"multiples of the backbone's patch cell of \(32, 32\) px"):
            torch_model.extract_embedding(torch.rand(1, 3, 2 * TILE_SIDE - CELL // 2, TILE_SIDE))
    finally:
        torch_model.tiler = Tiler(tile_size=TILE_SIDE, stride=TILE_SIDE)


# -------------------------------------------------------------------- export
def test_openvino_export_of_a_tiled_model_matches_eager(tiled: TiledModel, test_images, tmp_path: Path) -> None:
    """The tiler is traced into the graph: any batch and input size, resized and tiled inside, as eager."""
    path = tiled.engine.export(tiled.model, ExportType.OPENVINO, export_root=tmp_path)
    compiled = ov.Core().compile_model(path, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    other_size = torch.nn.functional.interpolate(test_images[:3], size=(300, 520), mode="bilinear")
    for images in (test_images, other_size):
        expected = eager_outputs(tiled.model, images)
        actual = {next(iter(port.names)): value for port, value in compiled(images.numpy()).items()}
        for name in ("pred_score", "anomaly_map"):
            assert_close(actual[name], expected[name], name)


def test_torch_export_of_a_tiled_model_matches_eager(
    tiled: TiledModel, test_images, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tiled.engine.export(tiled.model, ExportType.TORCH, export_root=tmp_path)
    monkeypatch.setenv("TRUST_REMOTE_CODE", "1")
    inferencer = TorchInferencer(path, device="cpu")
    expected = eager_outputs(tiled.model, test_images[:2])
    actual = inferencer.predict(test_images[:2])
    assert_close(actual.pred_score.numpy(), expected["pred_score"], "pred_score")
    assert_close(
        actual.anomaly_map.numpy().reshape(expected["anomaly_map"].shape), expected["anomaly_map"], "anomaly_map"
    )
