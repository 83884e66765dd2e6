"""ConTNet as a timm backbone: registry entries, ``features_only``, missing weights, anomalib's own models.

Models are ConTNet-Ti with random weights, except the two stock-CLI runs, which
train anomalib's Patchcore and Padim on ConTNet-B at their default input size
(256 px) from a checkpoint file made here (random values, the published layout).
Nothing needs the network: every test runs offline with a private cache.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import timm
import torch
from anomalib.models.components.feature_extractors import TimmFeatureExtractor
from contnet_stages import stage_maps
from stock_cli import reported_metric, run_anomalib

from anomalib_contnet.backbones import timm_contnet  # noqa: F401  (registers contnet_* with timm)
from anomalib_contnet.backbones.contnet import STAGE_REDUCTIONS, ConTNet
from anomalib_contnet.backbones.weight_files import PUBLISHED_URLS, WeightsError

VARIANTS = ["contnet_b", "contnet_m", "contnet_s", "contnet_ti"]
TI_WIDTH = 48
IMAGE = torch.randn(1, 3, 256, 256, generator=torch.Generator().manual_seed(0))


@pytest.fixture(autouse=True)
def isolated_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Private empty cache, no weights variable, offline: weights exist only where a test puts them."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("ANOMALIB_CONTNET_CACHE", str(cache))
    monkeypatch.delenv("ANOMALIB_CONTNET_WEIGHTS", raising=False)
    monkeypatch.setenv("ANOMALIB_CONTNET_OFFLINE", "1")
    return cache


def stage_outputs(model: ConTNet, names: list[str]) -> list[torch.Tensor]:
    outputs = stage_maps(model, IMAGE)
    return [outputs[name] for name in names]


def features(model: torch.nn.Module) -> list[torch.Tensor]:
    with torch.no_grad():
        return model.eval()(IMAGE)


def test_the_four_variants_are_registered_with_one_default_config_each() -> None:
    assert timm.list_models("contnet*") == VARIANTS
    assert timm.list_models("contnet*", pretrained=True) == ["contnet_b", "contnet_m"]  # those with a download
    for name in VARIANTS:
        config = timm.models.get_pretrained_cfg(name)
        assert config.architecture == name
        assert config.url == PUBLISHED_URLS.get(name)
        with torch.device("meta"):  # shapes only: no memory, no initialisation cost
            model = timm.create_model(name, pretrained=False)
        assert isinstance(model.get_submodule(config.first_conv), torch.nn.Conv2d)
        assert model.get_submodule(config.classifier).out_features == config.num_classes


@pytest.mark.parametrize("out_indices", [(2, 3), (0, 1, 2, 3, 4)])
def test_features_only_returns_the_named_stages(out_indices: tuple[int, ...]) -> None:
    names = [f"layer{index}" for index in out_indices]
    torch.manual_seed(1)
    reference = timm.create_model("contnet_ti").eval()
    wrapped = timm.create_model("contnet_ti", features_only=True, out_indices=out_indices)
    info = wrapped.feature_info
    assert info.module_name() == names
    assert info.channels() == [TI_WIDTH * 2**index for index in out_indices]
    assert info.reduction() == [STAGE_REDUCTIONS[index] for index in out_indices]
    assert list(wrapped.keys()) == [f"layer{index}" for index in range(max(out_indices) + 1)]  # nothing deeper runs
    state = wrapped.state_dict()
    wrapped.load_state_dict({key: value for key, value in reference.state_dict().items() if key in state}, strict=True)
    actual, expected = features(wrapped), stage_outputs(reference, names)
    for name, got, want in zip(names, actual, expected, strict=True):
        assert got.shape[-2:] == (256 // STAGE_REDUCTIONS[int(name[-1])],) * 2, name
        assert torch.equal(got, want), name


def test_anomalib_timm_feature_extractor_maps_layer_names_to_stages() -> None:
    """What Padim and Patchcore build: layer names through feature_info.module_name(), pretrained_cfg=None."""
    extractor = TimmFeatureExtractor("contnet_ti", layers=["layer2", "layer3"], pre_trained=False).eval()
    assert extractor.idx == [2, 3]
    assert list(extractor.out_dims) == [192, 384]
    with torch.no_grad():
        outputs = extractor(IMAGE)
    assert {name: tuple(value.shape) for name, value in outputs.items()} == {
        "layer2": (1, 192, 16, 16),
        "layer3": (1, 384, 8, 8),
    }


@pytest.mark.parametrize("variant", ["contnet_b", "contnet_ti"])
def test_missing_weights_fail_at_once_and_never_fall_back(variant: str) -> None:
    """Offline with an empty cache: the package's own error, not timm's Hub retry and not random weights."""
    expected = "offline mode" if variant in PUBLISHED_URLS else "no stable download URL"
    for build in (
        lambda: timm.create_model(variant, pretrained=True),
        lambda: TimmFeatureExtractor(variant, layers=["layer2", "layer3"], pre_trained=True),
    ):
        with pytest.raises(WeightsError, match=expected) as raised:
            build()
        assert "never replaced by random ones" in str(raised.value)
        assert "ANOMALIB_CONTNET_WEIGHTS" in str(raised.value)


# ------------------------------------------------------------------------------ anomalib's own models


@pytest.fixture(scope="module")
def small_mvtec(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """Four training and two test images (one with a defect): ConTNet-B costs ~9 GMAC per 256 px image.

    anomalib validates on the test images too, so each run computes eight images' features.
    """
    from anomalib_contnet.data import make_tiny_mvtec  # noqa: PLC0415

    root = tmp_path_factory.mktemp("small_mvtec")
    make_tiny_mvtec(root, category="brick", n_train=4, n_test_good=1, n_test_defect=1, image_size=128, seed=0)
    return root, "brick"


@pytest.mark.parametrize(
    ("model_name", "arguments"),
    [
        ("Patchcore", {"layers": ["layer2", "layer3"], "coreset_sampling_ratio": 0.1}),
        ("Padim", {"n_features": 50}),
    ],
)
def test_anomalib_models_train_untrained_contnet_without_any_weights(
    model_name: str, arguments: dict[str, object], small_mvtec: tuple[Path, str], tmp_path: Path
) -> None:
    """pre_trained=False never looks for a file (the cache is empty and offline) and the run completes."""
    from anomalib import models  # noqa: PLC0415
    from anomalib.data import MVTecAD  # noqa: PLC0415
    from anomalib.engine import Engine  # noqa: PLC0415

    root, category = small_mvtec
    model = getattr(models, model_name)(backbone="contnet_ti", pre_trained=False, **arguments)
    datamodule = MVTecAD(root=root, category=category, train_batch_size=4, eval_batch_size=4, num_workers=0)
    engine = Engine(default_root_dir=tmp_path, logger=False, enable_progress_bar=False)
    engine.fit(model=model, datamodule=datamodule)
    (results,) = engine.test(model=model, datamodule=datamodule)
    print(
        f"{model_name} untrained contnet_ti: image_AUROC {results['image_AUROC']}, pixel_AUROC {results['pixel_AUROC']}"
    )
    assert 0.0 <= results["image_AUROC"] <= 1.0
    assert results["pixel_AUROC"] > 0.5  # the defects are obvious, even to untrained features


@pytest.fixture(scope="module")
def contnet_b_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    """A ConTNet-B checkpoint of the published avg-down layout, written by our builder (random values)."""
    torch.manual_seed(5)
    state = timm.create_model("contnet_b").state_dict()
    path = tmp_path_factory.mktemp("contnet_b") / "contnet_b.pth"
    torch.save(state, path)
    return path, state


@pytest.mark.slow
@pytest.mark.parametrize(
    ("model_arguments", "weights_from", "feature_width"),
    [
        (
            ["--model", "Patchcore", "--model.layers", "[layer2,layer3]", "--model.coreset_sampling_ratio", "0.01"],
            "cache",
            256 + 512,
        ),
        (["--model", "Padim", "--model.n_features", "100"], "variable", 100),
    ],
    ids=["patchcore", "padim"],
)
def test_stock_cli_trains_anomalib_models_on_pretrained_contnet_b(
    model_arguments: list[str],
    weights_from: str,
    feature_width: int,
    contnet_b_file: tuple[Path, dict[str, torch.Tensor]],
    small_mvtec: tuple[Path, str],
    tmp_path: Path,
) -> None:
    """``--model.backbone contnet_b`` at the model's default 256 px; the saved model holds the file's weights."""
    path, state = contnet_b_file
    root, category = small_mvtec
    if weights_from == "cache":
        cache = tmp_path / "cache"
        cache.mkdir()
        shutil.copyfile(path, cache / "contnet_b.pth")
        environment = {"ANOMALIB_CONTNET_CACHE": str(cache)}
    else:
        environment = {"ANOMALIB_CONTNET_WEIGHTS": str(path)}
    output = run_anomalib(
        "train",
        *model_arguments,
        *("--model.backbone", "contnet_b", "--model.pre_trained", "true"),
        *("--data", "MVTecAD", "--data.root", str(root), "--data.category", category),
        *("--data.train_batch_size", "4", "--data.eval_batch_size", "4", "--data.num_workers", "0"),
        *("--default_root_dir", str(tmp_path / "results")),
        cwd=tmp_path,
        environment=environment,
    )
    print(
        f"{model_arguments[1]} contnet_b: image_AUROC {reported_metric(output, 'image_AUROC')}, "
        f"pixel_AUROC {reported_metric(output, 'pixel_AUROC')}"
    )
    assert reported_metric(output, "pixel_AUROC") > 0.8
    (checkpoint,) = (tmp_path / "results").rglob("*.ckpt")
    saved = torch.load(checkpoint, weights_only=False, map_location="cpu")["state_dict"]
    prefix = "model.feature_extractor.feature_extractor."
    backbone = {key.removeprefix(prefix): value for key, value in saved.items() if key.startswith(prefix)}
    assert backbone, sorted(saved)[:10]
    assert all(torch.equal(value, state[key]) for key, value in backbone.items())  # the file's weights, not random
    assert "layer1.ConTBlock2.downsample.conv.conv.weight" in backbone  # the avg-down network the file spells
    embeddings = saved.get("model.memory_bank", saved.get("model.gaussian.mean"))
    assert embeddings is not None, sorted(saved)[:20]
    assert feature_width in embeddings.shape
