"""ConTNetPaDiM's torch and Lightning models: method details, anchors, checkpoints, errors."""

from __future__ import annotations

import pytest
import timm
import torch
from anomalib.models import Padim, get_model, list_models
from anomalib.models.components import MultiVariateGaussian
from anomalib.models.image.padim.anomaly_map import AnomalyMapGenerator as PadimAnomalyMapGenerator
from contnet_stages import stage_maps

from anomalib_contnet import ConTNetPaDiM, ConTNetPaDiMModel, NotFittedError
from anomalib_contnet.backbones.weight_files import WeightsError
from anomalib_contnet.models.contnet_padim.feature_extractor import UNTRAINED_INIT_SEED


def small_model(**overrides: object) -> ConTNetPaDiMModel:
    arguments = {"backbone": "contnet_ti", "pre_trained": False} | overrides
    return ConTNetPaDiMModel(**arguments).eval()


def images(count: int, seed: int, side: int = 224) -> torch.Tensor:
    return torch.rand(count, 3, side, side, generator=torch.Generator().manual_seed(seed))


def test_embedding_concatenates_layer3_and_layer4_on_one_grid() -> None:
    model = small_model()
    embedding = model.extract_embedding(images(2, 0))
    # contnet_ti: layer3 has 384 channels, layer4 768; both 7x7 at 224 px.
    assert embedding.shape == (2, 384 + 768, 7, 7)
    features = model.feature_extractor(images(2, 0))
    torch.testing.assert_close(embedding[:, :384], features["layer3"])
    torch.testing.assert_close(embedding[:, 384:], features["layer4"])


def test_coarser_stage_is_repeated_onto_the_finer_grid() -> None:
    model = small_model(layers=("layer2", "layer3"))
    embedding = model.extract_embedding(images(1, 1))
    features = model.feature_extractor(images(1, 1))
    assert embedding.shape == (1, 192 + 384, 14, 14)
    coarse = embedding[:, 192:]
    torch.testing.assert_close(coarse[..., ::2, ::2], features["layer3"])
    torch.testing.assert_close(coarse[..., 1::2, 1::2], features["layer3"])


@pytest.mark.parametrize("layers", [("layer3", "layer4"), ("layer1", "layer2"), ("layer0",)])
def test_extractor_features_are_the_contnet_stage_outputs(layers: tuple[str, ...]) -> None:
    """Timm's features_only network gives the ConTNet's own stage maps, bit for bit, and holds nothing deeper.

    The untrained weights are those of a ConTNet built from the same seed, so
    the seeded features of every layer choice are the ones of the full network.
    """
    extractor = small_model(layers=layers).feature_extractor
    torch.manual_seed(UNTRAINED_INIT_SEED)
    reference = timm.create_model("contnet_ti", num_classes=0).eval()
    deepest = max(int(layer[-1]) for layer in layers)
    assert list(extractor.backbone.keys()) == [f"layer{index}" for index in range(deepest + 1)]
    image = images(2, 5)
    expected = stage_maps(reference, image)
    with torch.no_grad():
        features = extractor(image)
    assert list(features) == list(layers)
    for name, value in features.items():
        assert torch.equal(value, expected[name]), name
    assert extractor.out_channels == {layer: expected[layer].shape[1] for layer in layers}


def test_unknown_layer_is_refused_with_the_available_ones() -> None:
    with pytest.raises(ValueError, match=r"no feature layer\(s\) \['layer5'\]; its feature layers are \['layer0'"):
        small_model(layers=("layer3", "layer5"))


def test_random_feature_subset_is_seeded_and_saved() -> None:
    first = small_model(n_features=100, feature_seed=7)
    second = small_model(n_features=100, feature_seed=7)
    other = small_model(n_features=100, feature_seed=8)
    assert torch.equal(first.feature_index, second.feature_index)
    assert not torch.equal(first.feature_index, other.feature_index)
    assert "feature_index" in first.state_dict()
    assert first.extract_embedding(images(1, 2)).shape[1] == 100
    with pytest.raises(ValueError, match=r"n_features must be in 1\.\.1152"):
        small_model(n_features=5000)


def test_backbone_stays_in_eval_mode_when_lightning_switches_to_training() -> None:
    model = small_model()
    model.train()
    assert not model.feature_extractor.training
    assert all(not module.training for module in model.feature_extractor.modules())


def test_map_equals_anomalib_padim_for_the_same_features() -> None:
    """Our Gaussian + map on fixed features is what anomalib's Padim computes on them.

    More images than dimensions keep the covariance well conditioned, so that
    Padim's float32 inverse is accurate enough to serve as the anchor.
    """
    model = small_model(n_features=16)
    train = model.extract_embedding(images(40, 3))
    test_images = images(3, 4)
    test = model.extract_embedding(test_images)
    model.gaussian.update(train[:15])
    model.gaussian.update(train[15:])
    model.gaussian.fit()
    ours = model(test_images).anomaly_map

    padim_gaussian = MultiVariateGaussian()
    padim_gaussian.fit(train)
    anchor = PadimAnomalyMapGenerator(sigma=4).compute_anomaly_map(
        embedding=test,
        mean=padim_gaussian.mean,
        inv_covariance=padim_gaussian.inv_covariance,
        image_size=test_images.shape[-2:],
    )
    torch.testing.assert_close(ours, anchor, rtol=1e-4, atol=1e-4)


def test_image_score_is_the_map_maximum() -> None:
    model = small_model()
    model.gaussian.update(model.extract_embedding(images(4, 5)))
    model.gaussian.fit()
    output = model(images(2, 6))
    assert output.anomaly_map.shape == (2, 1, 224, 224)
    torch.testing.assert_close(output.pred_score.flatten(), output.anomaly_map.flatten(1).amax(dim=1))


def test_unfitted_model_refuses_to_predict() -> None:
    with pytest.raises(NotFittedError, match="has not been fitted"):
        small_model()(images(1, 0))


def test_any_input_size_gives_its_grid_and_too_small_inputs_are_refused() -> None:
    model = small_model()
    assert model.extract_embedding(images(1, 0, side=256)).shape[-2:] == (8, 8)
    with pytest.raises(ValueError, match="at least 32 pixels"):
        model.extract_embedding(images(1, 0, side=16))


def test_get_model_and_list_models_find_the_plugin() -> None:
    assert "con_t_net_pa_di_m" in list_models()
    assert isinstance(get_model("ConTNetPaDiM", backbone="contnet_ti", pre_trained=False), ConTNetPaDiM)
    by_class_path = get_model(
        {"class_path": "ConTNetPaDiM", "init_args": {"backbone": "contnet_ti", "pre_trained": False}}
    )
    assert isinstance(by_class_path, ConTNetPaDiM)
    assert ConTNetPaDiM.__bases__[-1].__name__ == "AnomalibModule"


def test_trainer_arguments_leave_devices_to_the_user() -> None:
    model = ConTNetPaDiM(backbone="contnet_ti", pre_trained=False)
    assert "devices" not in model.trainer_arguments
    assert "strategy" not in model.trainer_arguments
    assert not isinstance(model, Padim)


def test_missing_pretrained_weights_fail_when_fitting_starts(tiny_mvtec, tmp_path, monkeypatch) -> None:
    """Construction looks for nothing (a checkpoint may follow); a fit fails before reading any image."""
    from anomalib.data import MVTecAD  # noqa: PLC0415
    from anomalib.engine import Engine  # noqa: PLC0415

    monkeypatch.setenv("ANOMALIB_CONTNET_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.delenv("ANOMALIB_CONTNET_WEIGHTS", raising=False)
    monkeypatch.setenv("ANOMALIB_CONTNET_OFFLINE", "1")
    model = ConTNetPaDiM(backbone="contnet_ti", pre_trained=True)
    root, category = tiny_mvtec
    datamodule = MVTecAD(root=root, category=category, num_workers=0)
    with pytest.raises(WeightsError, match="pre_trained=False") as raised:
        Engine(default_root_dir=tmp_path, logger=False).fit(model=model, datamodule=datamodule)
    assert "ANOMALIB_CONTNET_WEIGHTS" in str(raised.value)
    assert str(tmp_path / "empty-cache") in str(raised.value)
    assert model.model.gaussian.samples_seen == 0


def test_pre_processor_resizes_to_224_and_normalises_like_imagenet() -> None:
    model = ConTNetPaDiM(backbone="contnet_ti", pre_trained=False)
    assert tuple(model.input_size) == (224, 224)
    bigger = ConTNetPaDiM(backbone="contnet_ti", pre_trained=False, image_size=(448, 448))
    assert tuple(bigger.input_size) == (448, 448)


def test_checkpoint_round_trip_predicts_the_same_maps(trained_model) -> None:
    restored = ConTNetPaDiM.load_from_checkpoint(trained_model.checkpoint).eval()
    batch = images(2, 11)
    with torch.no_grad():
        expected = trained_model.model.model(batch)
        actual = restored.model(batch)
    torch.testing.assert_close(actual.anomaly_map, expected.anomaly_map, rtol=0, atol=0)
    torch.testing.assert_close(actual.pred_score, expected.pred_score, rtol=0, atol=0)


def test_checkpoint_of_another_format_is_refused(trained_model, tmp_path) -> None:
    checkpoint = torch.load(trained_model.checkpoint, weights_only=True)
    checkpoint["anomalib_contnet_format_version"] = 99
    newer = tmp_path / "newer.ckpt"
    torch.save(checkpoint, newer)
    with pytest.raises(ValueError, match="anomalib_contnet_format_version=99; this anomalib-contnet reads format 3"):
        ConTNetPaDiM.load_from_checkpoint(newer)


def test_engine_predict_from_checkpoint_matches_the_model(trained_model, tmp_path) -> None:
    from anomalib.engine import Engine  # noqa: PLC0415

    engine = Engine(default_root_dir=tmp_path, logger=False, enable_progress_bar=False)
    fresh = ConTNetPaDiM(backbone="contnet_ti", pre_trained=False)
    predictions = engine.predict(
        model=fresh, datamodule=trained_model.datamodule, ckpt_path=str(trained_model.checkpoint)
    )
    first = predictions[0]  # its images were pre-processed in place by the predict loop
    original = trained_model.model
    with torch.no_grad():
        expected = original.post_processor(original.model(first.image))
    assert first.pred_score.numel() == first.image.shape[0]
    torch.testing.assert_close(first.pred_score.flatten(), expected.pred_score.flatten(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(first.anomaly_map.squeeze(), expected.anomaly_map.squeeze(), rtol=1e-5, atol=1e-6)


def test_loading_a_checkpoint_needs_no_imagenet_weights(trained_model, tmp_path, monkeypatch) -> None:
    """A checkpoint of a model built with pre_trained=True loads on a machine without the ImageNet file."""
    checkpoint = torch.load(trained_model.checkpoint, weights_only=True)
    checkpoint["hyper_parameters"]["pre_trained"] = True
    pretending = tmp_path / "pretrained.ckpt"
    torch.save(checkpoint, pretending)
    monkeypatch.setenv("ANOMALIB_CONTNET_CACHE", str(tmp_path / "no-weights-here"))
    restored = ConTNetPaDiM.load_from_checkpoint(pretending)
    torch.testing.assert_close(restored.model.gaussian.mean, trained_model.model.model.gaussian.mean)


def test_training_through_the_engine_writes_a_checkpoint(tiny_mvtec, tmp_path) -> None:
    """Anomalib's checkpoint callback saves only once the global step advances; the fit must advance it."""
    from anomalib.data import MVTecAD  # noqa: PLC0415
    from anomalib.engine import Engine  # noqa: PLC0415

    root, category = tiny_mvtec
    datamodule = MVTecAD(root=root, category=category, train_batch_size=4, eval_batch_size=4, num_workers=0)
    engine = Engine(default_root_dir=tmp_path, logger=False, enable_progress_bar=False)
    engine.fit(model=ConTNetPaDiM(backbone="contnet_ti", pre_trained=False), datamodule=datamodule)
    (checkpoint,) = tmp_path.rglob("*.ckpt")
    restored = ConTNetPaDiM.load_from_checkpoint(checkpoint)
    assert restored.model.gaussian.is_fitted
