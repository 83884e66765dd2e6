"""Reliability: every bad input gets a clear answer, and nothing the user had is lost.

Each test here backs one or more rows of ``docs/reliability.md``. Bad inputs go
through the real pipeline (anomalib datamodules, Engine, Lightning checkpoints,
real files and a real HTTP server on 127.0.0.1); nothing under test is mocked.
Models are ``contnet_ti`` with untrained weights and few feature channels, so the
whole file runs in about a minute on two cores.
"""

from __future__ import annotations

import copy
import ctypes
import datetime
import io
import multiprocessing
import os
import pickle
import re
import shutil
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pytest
import timm
import torch
from anomalib.data import Folder, MVTecAD
from anomalib.deploy import ExportType
from anomalib.engine import Engine
from anomalib.models import Padim
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from lightning.pytorch import Callback, seed_everything
from PIL import Image

from anomalib_contnet import ConTNetPaDiM
from anomalib_contnet.backbones.contnet import STAGE_NAMES
from anomalib_contnet.backbones.weight_files import WeightsError, resolve_weights
from anomalib_contnet.models.contnet_padim import ConTNetPaDiMModel, NonFiniteError, NotFittedError

CATEGORY = "part"
N_FEATURES = 16
"""More dimensions than the 3 training images, so every fit here is in the 'fewer images than dimensions' regime."""

SINGULAR_WARNING = f"training images for {N_FEATURES} feature dimensions"

FORK = multiprocessing.get_context("fork") if "fork" in multiprocessing.get_all_start_methods() else None
"""Child processes are forked: they start at once with everything imported (a fresh interpreter needs ~10 s to
import anomalib here). They run urllib, file operations and single-threaded torch, which are safe after fork."""


# ------------------------------------------------------------------------------------------------ helpers
@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> Iterator[None]:
    """Run this module's models on one thread.

    On a shared two-core machine, torch's two intra-op threads wait for each other
    whenever another process holds a core: contnet_ti then took 2.6 s per forward
    here instead of 0.05 s. Results do not depend on the thread count within a run.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def smooth_rgb(seed: int, height: int = 64, width: int = 64) -> np.ndarray:
    """An 8-bit RGB picture with structure (a blurred random field), different for every seed."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (max(height // 8, 2), max(width // 8, 2), 3), dtype=np.uint8)
    return np.array(Image.fromarray(coarse).resize((width, height), Image.Resampling.BILINEAR))


def write_mvtec(root: Path, train_sizes: list[tuple[int, int]], seed: int = 0) -> Path:
    """MVTec AD layout under ``root/CATEGORY``: given training images, one good and one defective test image."""
    base = root / CATEGORY
    for folder in ("train/good", "test/good", "test/spot", "ground_truth/spot"):
        (base / folder).mkdir(parents=True, exist_ok=True)
    for index, (height, width) in enumerate(train_sizes):
        Image.fromarray(smooth_rgb(seed + index, height, width)).save(base / "train/good" / f"{index:03d}.png")
    Image.fromarray(smooth_rgb(seed + 100)).save(base / "test/good/000.png")
    defective, mask = smooth_rgb(seed + 101), np.zeros((64, 64), np.uint8)
    defective[20:36, 20:36] = (255, 30, 30)
    mask[20:36, 20:36] = 255
    Image.fromarray(defective).save(base / "test/spot/000.png")
    Image.fromarray(mask).save(base / "ground_truth/spot/000_mask.png")
    return root


def datamodule(root: Path, train_batch_size: int = 1) -> MVTecAD:
    return MVTecAD(root=root, category=CATEGORY, train_batch_size=train_batch_size, eval_batch_size=2, num_workers=0)


def engine(work: Path, **options: object) -> Engine:
    return Engine(default_root_dir=work, logger=False, enable_progress_bar=False, enable_model_summary=False, **options)


def small_model(**overrides: object) -> ConTNetPaDiM:
    return ConTNetPaDiM(**({"backbone": "contnet_ti", "pre_trained": False, "n_features": N_FEATURES} | overrides))


def state_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {key: value.clone() for key, value in model.state_dict().items()}


def assert_state_unchanged(model: torch.nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[key], before[key]) for key in before)


def outcome(call: Callable[[], object], allowed: type[BaseException] | tuple[type[BaseException], ...]) -> object:
    """The result of ``call()``, or the exception it raised if that is one of the ``allowed`` types."""
    try:
        return call()
    except allowed as error:
        return error


def files_in(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.rglob("*") if path.is_file())


@dataclass(frozen=True)
class Run:
    """One seeded fit + predict through anomalib's Engine."""

    model: ConTNetPaDiM
    scores: torch.Tensor
    maps: torch.Tensor
    checkpoint: Path


def fit_and_predict(root: Path, work: Path, seed: int, model: ConTNetPaDiM | None = None) -> Run:
    seed_everything(seed, workers=True)
    model = model or small_model()
    data = datamodule(root)
    runner = engine(work)
    runner.fit(model=model, datamodule=data)
    predictions = runner.predict(model=model, datamodule=data)
    checkpoint = work / "fitted.ckpt"
    runner.trainer.save_checkpoint(checkpoint)
    scores = torch.cat([batch.pred_score.flatten() for batch in predictions])
    maps = torch.cat([batch.anomaly_map for batch in predictions])
    return Run(model, scores, maps, checkpoint)


def fit(root: Path, work: Path, model: ConTNetPaDiM, train_batch_size: int) -> ConTNetPaDiM:
    engine(work).fit(model=model, datamodule=datamodule(root, train_batch_size=train_batch_size))
    return model


@dataclass(frozen=True)
class SmallRuns:
    """Two identical seeded runs on the same data, recorded with Python's default warning filter."""

    first: Run
    second: Run
    singular_warnings: list[str]
    root: Path
    work: Path


@pytest.fixture(scope="module")
def small_runs(tmp_path_factory: pytest.TempPathFactory) -> SmallRuns:
    root = write_mvtec(tmp_path_factory.mktemp("small_data"), [(64, 64)] * 3)
    work = tmp_path_factory.mktemp("small_runs")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")  # what a user's script sees: Python's default deduplication is active
        first = fit_and_predict(root, work / "first", seed=7)
        second = fit_and_predict(root, work / "second", seed=7)
    singular = [str(item.message) for item in caught if SINGULAR_WARNING in str(item.message)]
    return SmallRuns(first, second, singular, root, work)


@pytest.fixture(scope="module")
def empty_weights_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """An empty, private weights cache with offline mode on, so no test depends on files of this machine."""
    cache = tmp_path_factory.mktemp("empty_cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("ANOMALIB_CONTNET_CACHE", str(cache))
        patch.setenv("ANOMALIB_CONTNET_OFFLINE", "1")
        patch.delenv("ANOMALIB_CONTNET_WEIGHTS", raising=False)
        yield cache


# ----------------------------------------------------------------------------------- images through anomalib
def test_unusual_but_valid_images_give_the_result_of_their_8bit_rgb_equivalent(
    small_runs: SmallRuns, tmp_path: Path
) -> None:
    """Grayscale, RGBA, 16-bit colour, 10x10 and 4000x3000 images all work, and mean what they show."""
    folder = tmp_path / "accepted"
    folder.mkdir()
    picture = smooth_rgb(1)
    Image.fromarray(picture[..., 0]).save(folder / "gray.png")
    Image.fromarray(np.repeat(picture[..., :1], 3, axis=2)).save(folder / "gray_as_rgb.png")
    alpha = np.full((64, 64, 1), 90, np.uint8)
    Image.fromarray(np.concatenate([picture, alpha], axis=2)).save(folder / "rgba.png")
    Image.fromarray(picture).save(folder / "rgba_as_rgb.png")
    low_byte = np.random.default_rng(4).integers(0, 256, picture.shape, dtype=np.uint16)
    wide = picture.astype(np.uint16) * 256 + low_byte  # 16-bit colour whose high byte is the 8-bit picture
    cv2.imwrite(str(folder / "rgb16.png"), wide[..., ::-1])
    Image.fromarray(picture).save(folder / "rgb16_as_rgb8.png")
    Image.fromarray(smooth_rgb(2, 10, 10)).save(folder / "tiny_10x10.png")
    Image.fromarray(smooth_rgb(3, 3000, 4000)).save(folder / "huge_4000x3000.png", compress_level=1)

    predictions = engine(tmp_path / "work").predict(
        model=small_model(), data_path=folder, ckpt_path=small_runs.first.checkpoint
    )
    by_name = {Path(batch.image_path[0]).stem: batch for batch in predictions}
    assert set(by_name) == {path.stem for path in folder.iterdir()}
    for batch in by_name.values():
        assert torch.isfinite(batch.pred_score).all()
        assert torch.isfinite(batch.anomaly_map).all()
    for name, equivalent in (("gray", "gray_as_rgb"), ("rgba", "rgba_as_rgb"), ("rgb16", "rgb16_as_rgb8")):
        assert torch.equal(by_name[name].pred_score, by_name[equivalent].pred_score), name
        assert torch.equal(by_name[name].anomaly_map, by_name[equivalent].anomaly_map), name


def write_gray16(path: Path) -> Path:
    """A 16-bit one-channel PNG, which anomalib's convert("RGB") would clip to almost white."""
    Image.fromarray((np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16)).save(path)
    return path


GRAY16_MESSAGE = r"more than 8 bits per pixel.*clips such values at 255.*mode I;16"


def test_16bit_grayscale_image_to_predict_is_refused_with_its_name(small_runs: SmallRuns, tmp_path: Path) -> None:
    bad = write_gray16(tmp_path / "gray16.png")
    with pytest.raises(ValueError, match=GRAY16_MESSAGE) as raised:
        engine(tmp_path / "work").predict(model=small_model(), data_path=bad, ckpt_path=small_runs.first.checkpoint)
    assert str(bad) in str(raised.value)


def test_16bit_grayscale_training_image_stops_the_fit(tmp_path: Path) -> None:
    root = write_mvtec(tmp_path / "data", [(64, 64)] * 2)
    bad = write_gray16(root / CATEGORY / "train/good/002.png")
    model, work = small_model(), tmp_path / "work"
    with pytest.raises(ValueError, match=GRAY16_MESSAGE) as raised:
        engine(work).fit(model=model, datamodule=datamodule(root))
    assert str(bad) in str(raised.value)
    assert not model.model.gaussian.is_fitted
    assert not list(work.rglob("*.ckpt"))


def damage(path: Path, kind: str) -> Path:
    """Replace ``path`` by a damaged file under the same name: a cut PNG, a cut JPEG, or text."""
    pixels = smooth_rgb(5)
    if kind == "text":
        path.write_text("not an image\n")
        return path
    encoded = io.BytesIO()
    Image.fromarray(pixels).save(encoded, format="PNG" if kind == "truncated_png" else "JPEG", quality=95)
    path.write_bytes(encoded.getvalue()[: len(encoded.getvalue()) // 2])  # Pillow reads the header, then runs out
    return path


DAMAGED_KINDS = ["truncated_png", "truncated_jpeg", "text"]


@pytest.mark.parametrize("kind", DAMAGED_KINDS)
@pytest.mark.parametrize(("where", "workers"), [("train/good/001.png", 2), ("test/good/000.png", 0)])
def test_a_damaged_image_stops_fit_and_test_naming_the_file(kind: str, where: str, workers: int, tmp_path) -> None:
    root = write_mvtec(tmp_path / "data", [(64, 64)] * 3)
    bad = damage(root / CATEGORY / where, kind)
    data = MVTecAD(root=root, category=CATEGORY, train_batch_size=2, eval_batch_size=2, num_workers=workers)
    with pytest.raises(OSError, match="cannot decode") as raised:
        engine(tmp_path / "work").train(model=small_model(), datamodule=data)
    assert str(bad) in str(raised.value)


@pytest.mark.parametrize("kind", DAMAGED_KINDS)
def test_a_damaged_mask_stops_the_test_naming_the_file(kind: str, tmp_path) -> None:
    root = write_mvtec(tmp_path / "data", [(64, 64)] * 3)
    bad = damage(root / CATEGORY / "ground_truth/spot/000_mask.png", kind)
    with pytest.raises(OSError, match="cannot decode") as raised:
        engine(tmp_path / "work").train(model=small_model(), datamodule=datamodule(root))
    assert str(bad) in str(raised.value)
    assert str(root / CATEGORY / "test/spot/000.png") not in str(raised.value)  # the intact image is not blamed


@pytest.mark.parametrize("kind", DAMAGED_KINDS)
def test_a_damaged_image_to_predict_is_named(kind: str, small_runs: SmallRuns, tmp_path: Path) -> None:
    folder = tmp_path / "to_predict"
    folder.mkdir()
    Image.fromarray(smooth_rgb(9)).save(folder / "intact.png")
    bad = damage(folder / "damaged.png", kind)
    with pytest.raises(OSError, match="cannot decode") as raised:
        engine(tmp_path / "work").predict(model=small_model(), data_path=folder, ckpt_path=small_runs.first.checkpoint)
    assert str(bad) in str(raised.value)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"epsilon": float("inf")}, "epsilon must be positive and finite"),
        ({"epsilon": float("nan")}, "epsilon must be positive and finite"),
        ({"epsilon": 0.0}, "epsilon must be positive and finite"),
        ({"sigma": 20.0, "image_size": (64, 64)}, r"radius 80 px, but the anomaly map is only 64x64 px.*below 15\.88"),
        ({"sigma": 60.0}, r"radius 240 px, but the anomaly map is only 224x224"),
        ({"sigma": 1e4}, r"radius 40000 px"),
        ({"sigma": float("nan")}, "sigma must be positive and finite"),
        ({"image_size": (0, 0)}, r"two positive whole numbers of pixels, got \(0, 0\)"),
        ({"image_size": (-5, 64)}, r"two positive whole numbers of pixels, got \(-5, 64\)"),
        ({"image_size": (64,)}, "image_size must be \\(height, width\\)"),
        ({"image_size": (16, 4000), "sigma": 1.0}, r"too small for contnet_ti: each side must be at least 32 px"),
        ({"layers": ("layer3", "layer9")}, r"no feature layer\(s\) \['layer9'\]; its feature layers are \['layer0'"),
        (
            {
                "backbone": "efficientnet_lite0",
                "layers": ("blocks.2", "blocks.6"),
                "image_size": (16, 64),
                "sigma": 1.0,
            },
            "too small for efficientnet_lite0: each side must be at least 32 px",
        ),
    ],
)
def test_bad_arguments_are_refused_when_the_model_is_built(arguments: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        small_model(**arguments)


@pytest.mark.parametrize(
    ("edit", "named"),
    [
        (lambda state: state.update({"model.gaussian.count": torch.tensor(-3)}), "count is -3"),
        (lambda state: state.update({"model.gaussian.count": torch.tensor(2.5)}), "count must be one integer"),
        (lambda state: state.update({"model.gaussian.count": torch.tensor(9)}), r"basis has shape .* make it"),
        (
            lambda state: state.update({"model.gaussian.mean": state["model.gaussian.mean"][:, :5]}),
            r"mean has shape \(\d+, 5\), but .* make it",
        ),
        (
            lambda state: state.update({"model.gaussian.basis": state["model.gaussian.basis"][..., :1]}),
            r"basis has shape",
        ),
        (lambda state: state["model.gaussian.variances"].neg_(), r"variances holds \d+ negative values"),
        (lambda state: state["model.feature_index"].add_(10_000), "feature_index must list channel numbers"),
    ],
)
@pytest.mark.parametrize("incremental", [False, True])
def test_edited_gaussians_are_refused_on_load_naming_the_tensor(
    edit: Callable[[dict], object], named: str, incremental: bool, small_runs: SmallRuns, tmp_path: Path
) -> None:
    checkpoint = torch.load(small_runs.first.checkpoint, weights_only=True)
    edit(checkpoint["state_dict"])
    edited = tmp_path / "edited.ckpt"
    torch.save(checkpoint, edited)
    if incremental:  # anomalib fit --model.incremental true --ckpt_path edited.ckpt
        model, data = small_model(incremental=True), datamodule(small_runs.root)
        with pytest.raises(ValueError, match=named):
            engine(tmp_path / "work").fit(model=model, datamodule=data, ckpt_path=edited)
    else:
        with pytest.raises(ValueError, match=named):
            ConTNetPaDiM.load_from_checkpoint(edited)


def test_a_timm_backbone_without_weights_offline_says_how_to_provide_them(small_runs: SmallRuns, tmp_path) -> None:
    model = ConTNetPaDiM(backbone="resnet18", layers=("layer2", "layer3"), n_features=N_FEATURES)
    with pytest.raises(
        OSError, match=r"resnet18 from timm's source .*--model\.weights FILE.*--model\.pre_trained false"
    ):
        engine(tmp_path / "work").fit(model=model, datamodule=datamodule(small_runs.root))


def test_the_gaussian_fits_from_a_module_level_script(tmp_path: Path) -> None:
    script = tmp_path / "fit_gaussian.py"
    script.write_text(
        "import torch\n"
        "from anomalib_contnet.models.contnet_padim.gaussian import StreamingGaussian\n"
        "gaussian = StreamingGaussian()\n"
        "gaussian.update(torch.randn(3, 16, 2, 2))\n"
        "gaussian.fit()\n"
        "print('fitted', int(gaussian.count), gaussian.basis.shape[-1])\n"
    )
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split()[-3:] == ["fitted", "3", "2"]  # 3 images span 2 directions


def test_empty_training_folder_gets_torchs_message(tmp_path: Path) -> None:
    root = write_mvtec(tmp_path / "data", [])
    with pytest.raises(ValueError, match=r"num_samples should be a positive integer value, but got num_samples=0"):
        engine(tmp_path / "work").fit(model=small_model(), datamodule=datamodule(root))


def test_empty_folder_datamodule_is_refused_by_anomalib(tmp_path: Path) -> None:
    """The Folder datamodule checks its folders itself, before any model hook runs."""
    (tmp_path / "good").mkdir()
    data = Folder(name="parts", root=tmp_path, normal_dir="good", num_workers=0)
    with pytest.raises(RuntimeError, match=r"Found 0 .*NORMAL images in .*good"):
        engine(tmp_path / "work").fit(model=small_model(), datamodule=data)


@pytest.mark.parametrize(
    ("count", "meaning"),
    [
        (1, "1 training image: the covariance is epsilon"),
        (4, "the Gaussians span only 3 directions"),
        (16, f"16 training images for {N_FEATURES} feature dimensions"),
    ],
)
def test_few_training_images_fit_and_predict_finite_scores_with_what_they_mean(
    count: int, meaning: str, tmp_path: Path
) -> None:
    root = write_mvtec(tmp_path / "data", [(64, 64)] * count)
    model, run = small_model(), engine(tmp_path / "work")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run.fit(model=model, datamodule=datamodule(root, train_batch_size=4))
    shown = [str(item.message) for item in caught if "training image" in str(item.message)]
    assert len(shown) == 1, shown
    assert meaning in shown[0]
    predictions = run.predict(model=model, data_path=root / CATEGORY / "test")
    assert int(model.model.gaussian.count) == count
    for batch in predictions:
        assert torch.isfinite(batch.pred_score).all()
        assert torch.isfinite(batch.anomaly_map).all()


def test_fewer_images_than_dimensions_fits_and_warns_once_per_fit(small_runs: SmallRuns) -> None:
    # Each run fitted 3 images in 3 batches; Python's default filter was active across both runs.
    assert (
        small_runs.singular_warnings
        == [
            f"3 training images for {N_FEATURES} feature dimensions: the Gaussians span only 2 directions, and "
            f"distances in the other {N_FEATURES - 2} are Euclidean divided by sqrt(epsilon=0.01), so epsilon strongly "
            "influences the scores. More training images, or n_features below the number of images, reduce this."
        ]
        * 2
    )
    assert torch.isfinite(small_runs.first.maps).all()


def test_same_seed_gives_bit_identical_maps_on_cpu(small_runs: SmallRuns) -> None:
    first, second = small_runs.first, small_runs.second
    assert first.model is not second.model
    assert first.maps.shape == (2, 224, 224)
    assert torch.equal(first.maps, second.maps)
    assert torch.equal(first.scores, second.scores)


def test_refitting_uses_the_new_images_and_mixed_sizes_share_a_batch(small_runs: SmallRuns, tmp_path: Path) -> None:
    """A second engine.fit of a fitted model fits the new data (it used to keep the old Gaussians silently)."""
    mixed = write_mvtec(tmp_path / "mixed", [(64, 64), (100, 80), (48, 120)], seed=50)
    fresh = fit(mixed, tmp_path / "fresh", small_model(), train_batch_size=3)  # one batch of three sizes
    refit = ConTNetPaDiM.load_from_checkpoint(small_runs.first.checkpoint)
    before = refit.model.gaussian.mean.clone()
    fit(mixed, tmp_path / "refit", refit, train_batch_size=3)
    assert not torch.equal(refit.model.gaussian.mean, before)
    assert torch.equal(refit.model.gaussian.mean, fresh.model.gaussian.mean)
    assert torch.isfinite(fresh.model.gaussian.basis).all()


# ------------------------------------------------------------------------------------------ non-finite values
def test_backbone_weights_file_with_nan_is_refused_when_fitting_starts(small_runs: SmallRuns, tmp_path: Path) -> None:
    state = timm.create_model("contnet_ti", num_classes=0).state_dict()
    state["layer2.ConTBlock0.ste1.attn.qkv.weight"][3, 5] = float("nan")
    path = tmp_path / "contnet_ti.pth"
    torch.save(state, path)
    model = small_model(pre_trained=True, weights=str(path))
    before = state_of(model.model)  # the post-processor's thresholds are reset by any fit: not the model's
    with pytest.raises(WeightsError, match=r"layer2\.ConTBlock0\.ste1\.attn\.qkv\.weight holds 1 NaN/Inf"):
        engine(tmp_path / "work").fit(model=model, datamodule=datamodule(small_runs.root))
    assert_state_unchanged(model.model, before)
    assert model.model.gaussian.samples_seen == 0


def overflowing(model: ConTNetPaDiMModel) -> ConTNetPaDiMModel:
    """Scale one batch-norm weight of stage layer2 to 1e38: finite, but its outputs overflow float32."""
    with torch.no_grad():
        model.feature_extractor.backbone.layer2.ConTBlock0.bn.weight.mul_(1e38)
    return model


def test_features_overflowing_at_run_time_are_refused_in_training(small_runs: SmallRuns, tmp_path: Path) -> None:
    model = small_model()
    overflowing(model.model)
    with pytest.raises(NonFiniteError, match=r"computed NaN/Inf features of training images. Check that the inputs"):
        engine(tmp_path / "work").fit(model=model, datamodule=datamodule(small_runs.root))
    assert model.model.gaussian.samples_seen == 0


def test_non_finite_inputs_or_features_are_refused_in_prediction(small_runs: SmallRuns) -> None:
    model = ConTNetPaDiM.load_from_checkpoint(small_runs.first.checkpoint).eval()
    images = torch.rand(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(model.model(images).pred_score).all()
    images[1, 2, 5, 5] = float("nan")
    with pytest.raises(NonFiniteError, match=r"computed NaN/Inf anomaly scores"):
        model.model(images)
    overflowing(model.model)
    with pytest.raises(NonFiniteError, match=r"computed NaN/Inf anomaly scores"):
        model.model(images.nan_to_num(0.5))


def test_finite_check_stays_out_of_the_exported_graph() -> None:
    """torch.export traces forward without the eager-only check; the graph has no data-dependent branch."""
    model = ConTNetPaDiMModel(backbone="contnet_ti", layers=("layer1",), pre_trained=False, n_features=4).eval()
    images = torch.rand(3, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    model.gaussian.update(model.extract_embedding(images))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.gaussian.fit()
    batch = torch.export.Dim("batch", min=1, max=16)
    exported = torch.export.export(model, (images[:2],), dynamic_shapes=({0: batch},), strict=False)
    targets = {str(node.target) for node in exported.graph.nodes if node.op == "call_function"}
    assert not any(check in target for target in targets for check in ("isfinite", "aten.all", "aten.any"))
    # eager CPU inference takes oneDNN's and channels-last paths, equal to float32 rounding
    torch.testing.assert_close(exported.module()(images).pred_score, model(images).pred_score, rtol=1e-5, atol=0)


def corrupted_checkpoint(source: Path, target: Path, key: str) -> Path:
    checkpoint = torch.load(source, weights_only=False)
    checkpoint["state_dict"][key].view(-1)[0] = float("nan")
    torch.save(checkpoint, target)
    return target


@pytest.mark.parametrize("key", ["model.feature_extractor.backbone.layer1.ConTBlock0.bn.weight", "model.gaussian.mean"])
def test_checkpoint_holding_nan_is_refused_with_the_key(key: str, small_runs: SmallRuns, tmp_path: Path) -> None:
    damaged = corrupted_checkpoint(small_runs.first.checkpoint, tmp_path / "nan.ckpt", key)
    pattern = rf"(?s)holds NaN/Inf values.*1 entries, first \['{re.escape(key)}'\]"
    with pytest.raises(ValueError, match=pattern):
        ConTNetPaDiM.load_from_checkpoint(damaged)
    model = small_model()
    before = state_of(model.model)  # backbone and Gaussians; anomalib resets its post-processor per run
    with pytest.raises(ValueError, match=pattern):
        engine(tmp_path / "work").predict(model=model, datamodule=datamodule(small_runs.root), ckpt_path=damaged)
    assert_state_unchanged(model.model, before)


# -------------------------------------------------------------------------------------------------- checkpoints
def test_files_that_are_not_model_checkpoints(tmp_path: Path) -> None:
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {}, "made": datetime.date(2020, 1, 1)}, foreign)  # a global safe loading refuses
    with pytest.raises(pickle.UnpicklingError, match=r"Unsupported global.*datetime"):  # nothing from it runs
        ConTNetPaDiM.load_from_checkpoint(foreign)
    backbone_only = tmp_path / "contnet_ti.pth"
    torch.save(timm.create_model("contnet_ti").state_dict(), backbone_only)
    with pytest.raises(KeyError, match="pytorch-lightning_version"):  # Lightning's: not a Lightning checkpoint
        ConTNetPaDiM.load_from_checkpoint(backbone_only)


def test_checkpoint_of_another_variant(small_runs: SmallRuns, tmp_path: Path) -> None:
    """A contnet_s checkpoint: contnet_s is built when the backbone is left at its default, else refused."""
    fitted = fit(small_runs.root, tmp_path / "fit", small_model(backbone="contnet_s"), train_batch_size=3)
    path = tmp_path / "contnet_s.ckpt"
    fitted.trainer.save_checkpoint(path)
    with pytest.raises(ValueError, match=r"backbone='contnet_ti' contradicts the checkpoint.*backbone='contnet_s'"):
        engine(tmp_path / "work").predict(model=small_model(), datamodule=datamodule(small_runs.root), ckpt_path=path)
    with pytest.raises(ValueError, match="backbone='contnet_ti' contradicts the checkpoint"):
        ConTNetPaDiM.load_from_checkpoint(path, backbone="contnet_ti")
    assert ConTNetPaDiM.load_from_checkpoint(path).hparams["backbone"] == "contnet_s"
    defaults = ConTNetPaDiM(pre_trained=False)  # contnet_b, all channels: both follow the checkpoint
    predictions = engine(tmp_path / "work").predict(
        model=defaults, datamodule=datamodule(small_runs.root), ckpt_path=path
    )
    assert defaults.model.feature_extractor.name == "contnet_s"
    assert defaults.model.feature_index.numel() == N_FEATURES
    assert all(torch.isfinite(batch.pred_score).all() for batch in predictions)


@pytest.fixture(scope="module")
def padim_checkpoint(small_runs: SmallRuns) -> Path:
    """A real anomalib Padim checkpoint, with the pre_trained=True every real Padim run records."""
    model = Padim(backbone="resnet18", layers=["layer1", "layer2"], pre_trained=False, n_features=10)
    runner = engine(small_runs.work / "padim")
    runner.fit(model=model, datamodule=datamodule(small_runs.root, train_batch_size=3))
    path = small_runs.work / "padim.ckpt"
    runner.trainer.save_checkpoint(path)
    checkpoint = torch.load(path, weights_only=False)
    checkpoint["hyper_parameters"]["pre_trained"] = True
    torch.save(checkpoint, path)
    return path


def test_checkpoint_of_another_model_class(padim_checkpoint: Path, small_runs: SmallRuns, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"not a ConTNetPaDiM checkpoint.*anomalib's Padim"):
        ConTNetPaDiM.load_from_checkpoint(padim_checkpoint)
    with pytest.raises(ValueError, match=r"not a ConTNetPaDiM checkpoint"):
        engine(tmp_path / "work").predict(
            model=small_model(), datamodule=datamodule(small_runs.root), ckpt_path=padim_checkpoint
        )


# ---------------------------------------------------------------------------------------------- use before fit
UNFITTED_CALLS = {
    "predict": lambda runner, model, data: runner.predict(model=model, datamodule=data),
    "test": lambda runner, model, data: runner.test(model=model, datamodule=data),
    "validate": lambda runner, model, data: runner.validate(model=model, datamodule=data),
    "export_torch": lambda runner, model, _: runner.export(model=model, export_type=ExportType.TORCH),
    "export_onnx": lambda runner, model, _: runner.export(model=model, export_type=ExportType.ONNX),
    "export_openvino": lambda runner, model, _: runner.export(model=model, export_type=ExportType.OPENVINO),
}


@pytest.mark.parametrize("call", list(UNFITTED_CALLS))
def test_unfitted_model_is_refused_everywhere(call: str, small_runs: SmallRuns, tmp_path: Path) -> None:
    work = tmp_path / "work"
    with pytest.raises(NotFittedError, match="ConTNetPaDiM has not been fitted: train it on normal images first"):
        UNFITTED_CALLS[call](engine(work), small_model(), datamodule(small_runs.root))
    assert not [name for name in files_in(work) if name.endswith((".pt", ".onnx", ".xml", ".bin"))]


# -------------------------------------------------------------------------------------- checkpoints on disk
class BreakSaving(Callback):
    """Adds an object that cannot be pickled to the checkpoint, as a faulty callback or hook would."""

    def on_save_checkpoint(self, trainer: object, pl_module: object, checkpoint: dict) -> None:  # noqa: ARG002
        checkpoint["unpicklable"] = lambda: None


def test_failed_checkpoint_save_keeps_the_previous_checkpoint(
    small_runs: SmallRuns, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Lightning serialises into memory, then writes a temporary file that is moved over the target."""
    model = ConTNetPaDiM.load_from_checkpoint(small_runs.first.checkpoint)
    runner = engine(tmp_path / "work")
    runner.validate(model=model, datamodule=datamodule(small_runs.root), verbose=False)
    target = tmp_path / "saved" / "model.ckpt"
    runner.trainer.save_checkpoint(target)
    previous = target.read_bytes()
    assert files_in(target.parent) == ["model.ckpt"]

    breaker = BreakSaving()
    runner.trainer.callbacks.append(breaker)
    with pytest.raises((AttributeError, TypeError, Exception), match=r"[Pp]ickle|local object"):
        runner.trainer.save_checkpoint(target)
    runner.trainer.callbacks.remove(breaker)
    assert target.read_bytes() == previous

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "no_such_temporary_folder"))
    with pytest.raises(FileNotFoundError):
        runner.trainer.save_checkpoint(target)
    assert target.read_bytes() == previous
    assert files_in(target.parent) == ["model.ckpt"]
    torch.testing.assert_close(
        ConTNetPaDiM.load_from_checkpoint(target).model.gaussian.mean, small_runs.first.model.model.gaussian.mean
    )


# ------------------------------------------------------------------------------------------------------ weights
CLONE_NEWNS = 0x00020000


def offline_switches_cleared() -> None:
    for variable in ("ANOMALIB_CONTNET_OFFLINE", "HF_HUB_OFFLINE"):
        os.environ.pop(variable, None)


def resolve_in_read_only_cache(cache: str, results: multiprocessing.Queue) -> None:
    """Child: in a private mount namespace, bind-mount ``cache`` read-only, then ask for weights from a URL."""
    if ctypes.CDLL(None, use_errno=True).unshare(CLONE_NEWNS) != 0:
        results.put(f"unshare failed: {os.strerror(ctypes.get_errno())}")
        return
    for command in (["mount", "--make-rprivate", "/"], ["mount", "--bind", cache, cache]):
        subprocess.run(command, check=True, capture_output=True)
    subprocess.run(["mount", "-o", "remount,bind,ro", cache], check=True, capture_output=True)
    offline_switches_cleared()
    os.environ["ANOMALIB_CONTNET_CACHE"] = cache
    try:
        resolve_weights("contnet_ti", "http://127.0.0.1:9/contnet_ti.pth")
    except WeightsError as error:
        results.put(str(error))
    else:
        results.put("no error")


def can_make_read_only_mounts() -> bool:
    return FORK is not None and os.name == "posix" and os.geteuid() == 0 and shutil.which("mount") is not None


@pytest.mark.skipif(not can_make_read_only_mounts(), reason="needs root (non-root runs: test_weights.py)")
def test_read_only_cache_folder_as_root(tmp_path: Path) -> None:
    """Root ignores file modes, so the cache is made truly read-only: a read-only bind mount in a private namespace."""
    cache = tmp_path / "cache"
    cache.mkdir()
    results = FORK.Queue()
    child = FORK.Process(target=resolve_in_read_only_cache, args=(str(cache), results))
    child.start()
    message = results.get(timeout=60)
    child.join(timeout=60)
    assert child.exitcode == 0
    if message.startswith("unshare failed"):
        pytest.skip(f"this container forbids mount namespaces ({message})")
    assert "cannot write into the cache folder" in message
    assert "Read-only file system" in message
    assert "ANOMALIB_CONTNET_CACHE" in message
    assert files_in(cache) == []


# --------------------------------------------------------------------------------------------------- fuzzing
def tensors() -> st.SearchStrategy[torch.Tensor]:
    shapes = st.lists(st.integers(0, 3), max_size=3)
    kinds = st.sampled_from([torch.float32, torch.float16, torch.int64, torch.bool])
    return st.builds(lambda shape, dtype: torch.zeros(shape, dtype=dtype), shapes, kinds)


def checkpoint_like() -> st.SearchStrategy[object]:
    leaves = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8) | tensors()
    keys = st.text(max_size=12) | st.integers() | st.sampled_from(["model", "state_dict", "module.fc.weight"])
    return st.recursive(
        leaves, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(keys, inner, max_size=4), max_leaves=12
    )


@pytest.fixture(scope="module")
def real_backbone_bytes() -> bytes:
    buffer = io.BytesIO()
    torch.save({"model": timm.create_model("contnet_ti").state_dict()}, buffer)
    return buffer.getvalue()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    kind=st.sampled_from(["cut", "flip", "random", "pickle"]),
    position=st.floats(0, 1),
    payload=st.binary(max_size=64) | st.just(b""),
    obj=checkpoint_like(),
)
def test_fuzz_backbone_file_loads_or_raises_weights_error_naming_it(
    kind: str, position: float, payload: bytes, obj: object, real_backbone_bytes: bytes, tmp_path: Path
) -> None:
    path = tmp_path / "fuzzed.pth"
    at = int(position * (len(real_backbone_bytes) - 1))
    if kind == "cut":
        path.write_bytes(real_backbone_bytes[:at])
    elif kind == "flip":
        flipped = bytes([real_backbone_bytes[at] ^ 0xFF])
        path.write_bytes(real_backbone_bytes[:at] + flipped + real_backbone_bytes[at + 1 :])
    elif kind == "random":
        path.write_bytes(payload)
    else:
        torch.save(obj, path)
    overlay = {"file": str(path)}
    built = outcome(
        lambda: timm.create_model("contnet_ti", pretrained=True, features_only=True, pretrained_cfg_overlay=overlay),
        WeightsError,
    )
    if isinstance(built, WeightsError):
        assert str(path) in str(built)
        return
    assert isinstance(built, torch.nn.Module)


LOAD_FROM_CHECKPOINT_ERRORS = (ValueError, RuntimeError, KeyError, WeightsError)
"""What ConTNetPaDiM.load_from_checkpoint is documented to raise for any bad file (docs/reliability.md): ours
(ValueError: other format, NaN/Inf; bad settings), Lightning's strict loading (RuntimeError), a missing top-level
entry (KeyError), the backbone's (WeightsError)."""


@pytest.fixture(scope="module")
def small_checkpoint(small_runs: SmallRuns) -> dict:
    return torch.load(small_runs.first.checkpoint, weights_only=False)


def mutate(checkpoint: dict, data: st.DataObject) -> None:
    """Apply one random damage of the kinds a file meets in the wild: lost keys, wrong values, other settings."""
    state, hparams = checkpoint["state_dict"], checkpoint["hyper_parameters"]
    keys = sorted(state)
    kind = data.draw(st.sampled_from(["top", "version", "hparam", "drop", "add", "reshape", "nan", "retype"]))
    if kind == "top":
        top_level = ["state_dict", "hyper_parameters", "anomalib_contnet_format_version"]
        del checkpoint[data.draw(st.sampled_from(top_level))]
    elif kind == "version":
        checkpoint["anomalib_contnet_format_version"] = data.draw(
            st.integers(-2, 4) | st.text(max_size=3) | st.none() | st.floats(allow_nan=True)
        )
    elif kind == "hparam":
        name, value = data.draw(
            st.sampled_from(["backbone", "n_features", "layers", "epsilon", "sigma", "pre_trained", "weights"]).flatmap(
                lambda name: st.tuples(
                    st.just(name),
                    {
                        "backbone": st.sampled_from(["contnet_s", "resnet18", "no_such_net"]),
                        "n_features": st.integers(-3, 2000) | st.none(),
                        "layers": st.lists(st.sampled_from([*STAGE_NAMES, "layer9"]), min_size=0, max_size=3),
                        "epsilon": st.floats(-1, 1) | st.just(float("nan")),
                        "sigma": st.floats(-1, 8) | st.just(float("nan")),
                        "pre_trained": st.just(True),
                        "weights": st.text(min_size=1, max_size=8),
                    }[name],
                )
            )
        )
        hparams[name] = value
    elif kind == "drop":
        del state[data.draw(st.sampled_from(keys))]
    elif kind == "add":
        state[data.draw(st.text(min_size=1, max_size=10))] = torch.zeros(2)
    elif kind == "reshape":
        key = data.draw(st.sampled_from(keys))
        state[key] = torch.zeros(state[key].numel() + 1)
    elif kind == "nan":
        key = data.draw(st.sampled_from([key for key in keys if state[key].is_floating_point() and state[key].numel()]))
        state[key] = state[key].clone()
        state[key].view(-1)[data.draw(st.integers(0, state[key].numel() - 1))] = float("nan")
    else:
        state[data.draw(st.sampled_from(keys))] = data.draw(st.sampled_from([[1.0, 2.0], "weights", None]))


@pytest.mark.usefixtures("empty_weights_cache")
@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzz_load_from_checkpoint_raises_only_documented_errors(
    data: st.DataObject, small_checkpoint: dict, tmp_path: Path
) -> None:
    checkpoint = copy.deepcopy(small_checkpoint)
    mutate(checkpoint, data)
    path = tmp_path / "fuzzed.ckpt"
    torch.save(checkpoint, path)
    model = outcome(lambda: ConTNetPaDiM.load_from_checkpoint(path), LOAD_FROM_CHECKPOINT_ERRORS)
    if isinstance(model, LOAD_FROM_CHECKPOINT_ERRORS):
        assert str(model).strip()
        return
    assert model.model.gaussian.is_fitted  # whatever loads is a complete, usable model


@pytest.fixture(scope="module")
def fitted_small_model(small_runs: SmallRuns) -> ConTNetPaDiM:
    """The first small run's model with its pre- and post-processor, as a user calls it: ``model(images)``."""
    return ConTNetPaDiM.load_from_checkpoint(small_runs.first.checkpoint).eval()


@settings(max_examples=30, deadline=None)
@given(
    batch=st.integers(1, 2),
    height=st.integers(1, 300),
    width=st.integers(1, 300),
    seed=st.integers(0, 2**16),
    damage=st.sampled_from(["none", "constant", "nan", "inf", "huge", "negative_huge", "out_of_range"]),
)
def test_fuzz_image_arrays_give_finite_results_or_non_finite_error(
    batch: int, height: int, width: int, seed: int, damage: str, fitted_small_model: ConTNetPaDiM
) -> None:
    images = torch.rand(batch, 3, height, width, generator=torch.Generator().manual_seed(seed))
    if damage == "constant":
        images.fill_(images[0, 0, 0, 0])
    elif damage in {"nan", "inf"}:
        images[-1, seed % 3, seed % height, seed % width] = float(damage)
    elif damage == "huge":
        images *= 1e30
    elif damage == "negative_huge":
        images *= -1e30
    elif damage == "out_of_range":
        images = images * 40 - 20
    with torch.no_grad():
        output = outcome(lambda: fitted_small_model(images), NonFiniteError)
    if isinstance(output, NonFiniteError):
        assert "NaN/Inf" in str(output)
        return
    assert output.anomaly_map.shape == (batch, 1, 224, 224)
    assert torch.isfinite(output.pred_score).all()
    assert torch.isfinite(output.anomaly_map).all()
