"""ConTNetPaDiM's pre-processor: one antialiased resize on the fitted path and the export path alike.

The antialiased resize is checked against torchvision's own ``Resize(antialias=True)``
(float64: the same definition to 1e-12; float32: within float32 rounding), through
anomalib's batch hooks (images and masks) and anomalib's exportable copy, and through
checkpoints loaded with ``weights_only=True``. The end-to-end proof on real files with
every runtime is in ``tests/test_export.py``.
"""

from __future__ import annotations

import pytest
import torch
from anomalib.data import ImageBatch
from torchvision import tv_tensors
from torchvision.transforms.v2 import Compose, Normalize, Resize
from torchvision.transforms.v2.functional import resize as torchvision_resize

from anomalib_contnet.models.contnet_padim.pre_processor import (
    AntialiasedResize,
    ConTNetPreProcessor,
    antialiased_resize,
)

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
SIZES = [((1024, 1024), (224, 224)), ((700, 900), (224, 224)), ((300, 257), (224, 224)), ((128, 96), (224, 448))]


@pytest.mark.parametrize(("input_size", "output_size"), SIZES)
def test_resize_is_torchvisions_antialiased_resize(input_size, output_size) -> None:
    images = torch.rand(2, 3, *input_size, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    exact = torchvision_resize(images, list(output_size), antialias=True)
    torch.testing.assert_close(antialiased_resize(images, output_size), exact, rtol=0, atol=1e-12)
    # float32: at least as close to the exact values as torchvision's own float32 kernel
    ours = antialiased_resize(images.float(), output_size).double()
    theirs = torchvision_resize(images.float(), list(output_size), antialias=True).double()
    assert (ours - exact).abs().max() <= max((theirs - exact).abs().max(), 1e-6)


def test_resize_differs_from_the_aliased_resize_it_replaces() -> None:
    """Downsampling 1024 -> 224 without antialiasing moves pixels by a lot; that is the defect being fixed."""
    images = torch.rand(1, 3, 1024, 1024, generator=torch.Generator().manual_seed(0))
    aliased = torchvision_resize(images, [224, 224], antialias=False)
    assert (antialiased_resize(images, (224, 224)) - aliased).abs().max() > 0.1


def test_same_size_is_the_identity() -> None:
    images = torch.rand(1, 3, 224, 224)
    assert torch.equal(antialiased_resize(images, (224, 224)), images)


def test_integer_images_are_refused_not_resized() -> None:
    with pytest.raises(RuntimeError, match=r"expected scalar type Float but found Byte"):  # torch's own refusal
        antialiased_resize(torch.zeros(1, 3, 8, 8, dtype=torch.uint8), (4, 4))


def test_batch_hooks_resize_images_antialiased_and_masks_like_torchvision() -> None:
    """What anomalib's PreProcessor callback does to a batch (fit, validation, test, predict)."""
    pre_processor = ConTNetPreProcessor((224, 224), MEAN, STD)
    generator = torch.Generator().manual_seed(1)
    images = torch.rand(2, 3, 700, 900, generator=generator)
    masks = torch.rand(2, 700, 900, generator=generator) > 0.7
    batch = ImageBatch(image=images, gt_mask=masks)
    pre_processor.on_predict_batch_start(None, None, batch, 0)
    stock = Compose([Resize((224, 224), antialias=True), Normalize(MEAN, STD)])
    expected_image, expected_mask = stock(tv_tensors.Image(images), tv_tensors.Mask(masks))
    torch.testing.assert_close(batch.image, expected_image, rtol=0, atol=1e-4)
    assert isinstance(batch.gt_mask, tv_tensors.Mask)
    assert torch.equal(batch.gt_mask, expected_mask)


def test_exportable_copy_keeps_the_antialiased_resize() -> None:
    """Anomalib's get_exportable_transform switches antialias off on every Resize; this one stays antialiased."""
    pre_processor = ConTNetPreProcessor((224, 224), MEAN, STD)
    (resize, _) = pre_processor.export_transform.transforms
    assert isinstance(resize, AntialiasedResize)
    assert resize.antialias is True
    images = torch.rand(2, 3, 1024, 1024)
    assert torch.equal(pre_processor(images), pre_processor.transform(images))


def test_checkpoint_config_is_plain_data_and_restores_the_pre_processor() -> None:
    config = ConTNetPreProcessor((448, 224), MEAN, STD).checkpoint_config()
    assert config == {"image_size": [448, 224], "mean": list(MEAN), "std": list(STD)}
    restored = ConTNetPreProcessor((224, 224), (0.5,) * 3, (0.5,) * 3)
    restored.load_checkpoint_config(config)
    assert (restored.image_size, restored.mean, restored.std) == ((448, 224), MEAN, STD)
    assert restored(torch.rand(1, 3, 100, 100)).shape == (1, 3, 448, 224)


def test_trained_model_resizes_in_the_dataset_and_checkpoints_safely(trained_model) -> None:
    """Anomalib's datamodule resizes each item with the model's resize; the checkpoint loads with weights_only."""
    from anomalib_contnet import ConTNetPaDiM  # noqa: PLC0415

    assert isinstance(trained_model.datamodule.train_data.augmentations, AntialiasedResize)
    checkpoint = torch.load(trained_model.checkpoint, map_location="cpu", weights_only=True)
    assert checkpoint["anomalib_pre_processor_config"] == trained_model.model.pre_processor.checkpoint_config()
    loaded = ConTNetPaDiM.load_from_checkpoint(trained_model.checkpoint, backbone="contnet_ti")
    assert isinstance(loaded.pre_processor, ConTNetPreProcessor)
    assert loaded.pre_processor.checkpoint_config() == trained_model.model.pre_processor.checkpoint_config()
