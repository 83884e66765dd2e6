"""The best preset's head (stages 2-3, patch context, shared covariance) end to end, and the patch context.

Engine fit, incremental fit, OpenVINO export against Engine.predict, the patch context's definition.

contnet_ti with random weights stands in for ConTNet-B (whose ImageNet file is not on this machine);
the levers and the layer rule are the preset's (``BEST_HEAD``, stages 2 and 3).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import openvino as ov
import pytest
import torch
from anomalib.data import MVTecAD
from anomalib.data.utils import read_image
from anomalib.deploy import ExportType
from anomalib.engine import Engine
from PIL import Image

from anomalib_contnet import ConTNetPaDiM
from anomalib_contnet.data.textures import load_texture, render_defective, texture_bands
from anomalib_contnet.evaluation.configs import BEST_HEAD, MODEL_CONFIGS

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore:.*training image")]

PRESET = {"layers": MODEL_CONFIGS["contnet_padim_best_contnet_b"].layers, **BEST_HEAD}
FILE_SIZES = ((224, 224), (700, 900), (1024, 1024))
"""(height, width) of the image files the export is compared on: the input size, and MVTec AD-like photographs."""
RELATIVE_TOLERANCE = 1e-4


def _fit(root: Path, category: str, work: Path, model: ConTNetPaDiM) -> Engine:
    datamodule = MVTecAD(root=root, category=category, train_batch_size=4, eval_batch_size=4, num_workers=0)
    engine = Engine(default_root_dir=work, logger=False, enable_progress_bar=False)
    engine.fit(model=model, datamodule=datamodule)
    return engine


@pytest.fixture(scope="module")
def fitted(tiny_mvtec: tuple[Path, str], tmp_path_factory: pytest.TempPathFactory) -> tuple[ConTNetPaDiM, Engine]:
    root, category = tiny_mvtec
    model = ConTNetPaDiM(backbone="contnet_ti", pre_trained=False, **PRESET)
    return model, _fit(root, category, tmp_path_factory.mktemp("best_preset"), model)


def test_the_preset_head_separates_the_tiny_defects(fitted) -> None:
    """A fit of the preset's head through anomalib's Engine tests like the paper's head does (tests/test_model.py)."""
    model, engine = fitted
    results = engine.test(model=model, datamodule=engine.trainer.datamodule)[0]
    assert results["image_AUROC"] > 0.9
    assert results["pixel_AUROC"] > 0.85
    assert model.model.gaussian.shared_covariance is BEST_HEAD["shared_covariance"] is True
    assert model.model.gaussian.whitening.shape == (model.model.gaussian.mean.shape[-1],) * 2


def test_patch_context_concatenates_the_neighbouring_patches() -> None:
    """Each channel block is the plain embedding read one move away; the nine blocks are the nine moves.

    Neighbours outside the grid are zeros. They are gathered by index here, not by the package's code.
    """
    images = torch.rand(2, 3, 96, 128, generator=torch.Generator().manual_seed(0))
    plain = ConTNetPaDiM(backbone="contnet_ti", pre_trained=False, layers=PRESET["layers"]).model
    context = ConTNetPaDiM(backbone="contnet_ti", pre_trained=False, layers=PRESET["layers"], patch_context=1).model
    context.load_state_dict(plain.state_dict())
    base, expanded = plain.extract_embedding(images), context.extract_embedding(images)
    channels, height, width = base.shape[1:]
    rows, columns = torch.arange(height), torch.arange(width)

    def moved(di: int, dj: int) -> torch.Tensor:
        inside = ((rows + di >= 0) & (rows + di < height))[:, None] & ((columns + dj >= 0) & (columns + dj < width))
        gathered = base[:, :, (rows + di).clamp(0, height - 1)][..., (columns + dj).clamp(0, width - 1)]
        return gathered * inside

    moves = [(di, dj) for di in (-1, 0, 1) for dj in (-1, 0, 1)]
    found = [
        [move for move in moves if torch.equal(block, moved(*move))]
        for block in expanded.reshape(2, 9, channels, height, width).unbind(1)
    ]
    assert sorted(move for matches in found for move in matches) == moves


@pytest.mark.parametrize("value", [-1, True, 1.5])
def test_bad_patch_context_is_refused(value) -> None:
    with pytest.raises(ValueError, match="patch_context must be a whole number"):
        ConTNetPaDiM(backbone="contnet_ti", pre_trained=False, patch_context=value)


def test_an_incremental_fit_of_the_preset_equals_one_fit(tiny_mvtec: tuple[Path, str], tmp_path: Path) -> None:
    """With a neighbourhood too: the continued statistics are those of the (2r + 1)² patches of every image."""
    root, category = tiny_mvtec
    levers = PRESET | {"neighbourhood": 1}
    together = ConTNetPaDiM(backbone="contnet_ti", pre_trained=False, **levers)
    engine = _fit(root, category, tmp_path / "together", together)
    images = torch.cat([batch.image for batch in engine.trainer.datamodule.train_dataloader()])
    first = ConTNetPaDiM(backbone="contnet_ti", pre_trained=False, **levers)
    first.model.gaussian.update(first.model.extract_embedding(first.pre_processor.transform(images[:3])))
    first.fit()
    first.model.gaussian.reset_statistics(continue_from_fit=True)
    first.model.gaussian.update(first.model.extract_embedding(first.pre_processor.transform(images[3:])))
    first.fit()
    assert int(first.model.gaussian.count) == int(together.model.gaussian.count) == 9 * len(images)
    probe = together.pre_processor.transform(images[:2])
    torch.testing.assert_close(first.model(probe).anomaly_map, together.model(probe).anomaly_map, rtol=1e-4, atol=0)


@pytest.fixture(scope="module")
def defect_files(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """A defective brick photograph at each size, PNG and JPEG alternately."""
    folder = tmp_path_factory.mktemp("preset_files")
    band = texture_bands(load_texture("brick"))["test"]
    paths = []
    for number, (height, width) in enumerate(FILE_SIZES):
        _, pixels, _ = render_defective(band, 0, "brick", 0, "stain", crop_size=160, image_size=max(height, width))
        path = folder / f"{height}x{width}.{'png' if number % 2 == 0 else 'jpg'}"
        Image.fromarray(pixels[:height, :width]).save(path, quality=90)
        paths.append(path)
    return paths


def test_the_exported_openvino_graph_equals_engine_predict(fitted, defect_files, tmp_path: Path) -> None:
    """224-1024 px files: raw anomaly maps and scores of the FP32 OpenVINO graph within 1e-4 of Engine.predict's.

    Engine.predict applies the post-processor's normalisation, the graph holds it too: both outputs are compared
    as they come. The graph gets the pixels ``read_image`` decodes, as Engine.predict's dataset does.
    """
    model, engine = fitted
    path = engine.export(model, ExportType.OPENVINO, export_root=tmp_path)
    compiled = ov.Core().compile_model(path, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    batches = engine.predict(model=model, data_path=defect_files[0].parent)
    expected = {Path(batch.image_path[0]).name: batch for batch in batches}
    for file in defect_files:
        outputs = {
            next(iter(port.names)): value
            for port, value in compiled(read_image(file, as_tensor=True)[None].numpy()).items()
        }
        reference = expected[file.name]
        for name in ("anomaly_map", "pred_score"):
            wanted = getattr(reference, name).numpy().reshape(outputs[name].shape)
            scale = np.abs(wanted).max()
            np.testing.assert_allclose(
                outputs[name], wanted, rtol=0, atol=RELATIVE_TOLERANCE * scale, err_msg=f"{file.name} {name}"
            )
