"""Adding normal images to a fitted model gives the Gaussians of one fit on all of them, from Python and the CLI."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from anomalib.data import MVTecAD
from anomalib.engine import Engine
from stock_cli import run_anomalib
from test_cli import train_arguments

from anomalib_contnet import ConTNetPaDiM

pytestmark = pytest.mark.filterwarnings("ignore:.*training images for")


def with_training_images(tiny_mvtec: tuple[Path, str], target: Path, chosen: slice) -> Path:
    """A copy of the tiny dataset whose training folder holds only the ``chosen`` images (sorted by name)."""
    source_root, category = tiny_mvtec
    shutil.copytree(source_root, target)
    images = sorted((target / category / "train" / "good").iterdir())
    for image in set(images) - set(images[chosen]):
        image.unlink()
    return target


def fitted(model: ConTNetPaDiM, root: Path, category: str, work: Path) -> ConTNetPaDiM:
    data = MVTecAD(root=root, category=category, train_batch_size=4, eval_batch_size=4, num_workers=0)
    Engine(default_root_dir=work, logger=False, enable_progress_bar=False).fit(model=model, datamodule=data)
    return model


def distances(model: ConTNetPaDiM, seed: int = 0) -> torch.Tensor:
    images = torch.rand(3, 3, 224, 224, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model.model.gaussian(model.model.extract_embedding(images))


@pytest.fixture(scope="module")
def first_fit(tiny_mvtec, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Checkpoint of contnet_ti fitted on the first 5 of the tiny dataset's 12 training images."""
    work = tmp_path_factory.mktemp("first_fit")
    root = with_training_images(tiny_mvtec, work / "data", slice(0, 5))
    model = fitted(ConTNetPaDiM(backbone="contnet_ti", pre_trained=False), root, tiny_mvtec[1], work)
    model.trainer.save_checkpoint(work / "first.ckpt")
    return work / "first.ckpt"


@pytest.mark.slow
def test_an_incremental_fit_equals_one_fit_on_all_images(tiny_mvtec, first_fit: Path, tmp_path: Path) -> None:
    category = tiny_mvtec[1]
    more = with_training_images(tiny_mvtec, tmp_path / "more", slice(5, None))
    everything = with_training_images(tiny_mvtec, tmp_path / "all", slice(None))
    continued = fitted(ConTNetPaDiM.load_from_checkpoint(first_fit, incremental=True), more, category, tmp_path / "c")
    together = fitted(ConTNetPaDiM.load_from_checkpoint(first_fit), everything, category, tmp_path / "t")
    assert int(continued.model.gaussian.count) == int(together.model.gaussian.count) == 12
    torch.testing.assert_close(continued.model.gaussian.mean, together.model.gaussian.mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(distances(continued), distances(together), rtol=1e-5, atol=0)

    data = MVTecAD(root=more, category=category, eval_batch_size=4, num_workers=0)
    with pytest.raises(ValueError, match="loading it would evaluate the earlier model"):  # anomalib train --ckpt_path
        Engine(default_root_dir=tmp_path / "e", logger=False).test(continued, datamodule=data, ckpt_path=first_fit)
    assert int(continued.model.gaussian.count) == 12

    afresh = fitted(ConTNetPaDiM.load_from_checkpoint(first_fit), more, category, tmp_path / "a")
    assert int(afresh.model.gaussian.count) == 7  # the default: a second fit forgets the first


@pytest.mark.slow
def test_stock_cli_fit_with_incremental_adds_the_new_images(tiny_mvtec, first_fit: Path, tmp_path: Path) -> None:
    category = tiny_mvtec[1]
    more = with_training_images(tiny_mvtec, tmp_path / "more", slice(5, None))
    arguments = train_arguments(more, category, tmp_path / "results", "--model.incremental", "true")
    run_anomalib("fit", *arguments[1:], "--ckpt_path", str(first_fit), cwd=tmp_path)
    (written,) = (tmp_path / "results").rglob("*.ckpt")
    continued = ConTNetPaDiM.load_from_checkpoint(written)
    everything = with_training_images(tiny_mvtec, tmp_path / "all", slice(None))
    together = fitted(ConTNetPaDiM.load_from_checkpoint(first_fit), everything, category, tmp_path / "t")
    assert int(continued.model.gaussian.count) == 12
    torch.testing.assert_close(distances(continued), distances(together), rtol=1e-5, atol=0)
