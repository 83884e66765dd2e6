"""The packed (and optionally float16) precision factor: layout, accuracy, saved state and export."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from anomalib_contnet.models.contnet_padim.gaussian import (
    FACTOR_BLOCK_WIDTH,
    StreamingGaussian,
    packed_factor_size,
    unpack_factor,
)


def fitted(
    factor_dtype: str, count: int = 24, dims: int = 150, seed: int = 0
) -> tuple[StreamingGaussian, torch.Tensor]:
    """A Gaussian fitted on correlated features with fewer images than dimensions (singular, like the defaults)."""
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(dims, dims, generator=generator) / dims**0.5
    features = torch.einsum("bchw,cd->bdhw", torch.randn(count + 6, dims, 2, 3, generator=generator), mixing) + 3.0
    gaussian = StreamingGaussian(factor_dtype=factor_dtype)
    gaussian.update(features[:count])
    with pytest.warns(UserWarning, match="feature dimensions"):
        gaussian.fit()
    return gaussian, features[count:]


def reference_distances(gaussian: StreamingGaussian, embedding: torch.Tensor) -> torch.Tensor:
    """Mahalanobis distances in float64 with the explicit inverse of the fitted covariance."""
    precision = torch.linalg.inv(gaussian.covariance())
    batch, dims, height, width = embedding.shape
    delta = embedding.double().reshape(batch, dims, -1).permute(2, 0, 1) - gaussian.mean.double().unsqueeze(1)
    squared = torch.einsum("pbi,pij,pbj->pb", delta, precision, delta)
    return squared.sqrt().transpose(0, 1).reshape(batch, 1, height, width)


@pytest.mark.parametrize("dims", [5, FACTOR_BLOCK_WIDTH, 2 * FACTOR_BLOCK_WIDTH + 44])
def test_packed_factor_unpacks_to_an_upper_triangular_factor_of_the_sample_precision(dims: int) -> None:
    """Every column block of the packed layout lands where it belongs: F Fᵀ is the inverse of numpy's covariance."""
    generator = torch.Generator().manual_seed(dims)
    features = torch.randn(dims + 30, dims, 1, 2, generator=generator, dtype=torch.float64)
    gaussian = StreamingGaussian(epsilon=0.01)
    gaussian.update(features.float())
    gaussian.fit()
    assert gaussian.precision_factor.shape == (packed_factor_size(2, dims),)
    factor = unpack_factor(gaussian.precision_factor.double(), 2, dims)
    assert torch.equal(factor, factor.triu())
    samples = features.float().double().permute(2, 3, 0, 1).reshape(2, dims + 30, dims).numpy()
    for position in range(2):
        covariance = np.cov(samples[position], rowvar=False, ddof=1) + 0.01 * np.eye(dims)
        whitened = (factor[position] @ factor[position].T).numpy() @ covariance
        np.testing.assert_allclose(whitened, np.eye(dims), atol=1e-4)


def test_packed_layout_stores_about_half_of_the_full_matrices() -> None:
    dims = 1536
    blocks = -(-dims // FACTOR_BLOCK_WIDTH)
    stored_fraction = packed_factor_size(49, dims) / (49 * dims * dims)
    # Column block j keeps rows up to its last column: sum over j of (j + 1) / k^2 = (k + 1) / 2k.
    assert stored_fraction == pytest.approx((blocks + 1) / (2 * blocks))
    assert stored_fraction < 0.55


def test_float32_packed_distances_match_the_explicit_inverse() -> None:
    gaussian, test = fitted("float32")
    torch.testing.assert_close(gaussian(test).double(), reference_distances(gaussian, test), rtol=1e-5, atol=1e-6)


def test_float16_storage_halves_the_factor_and_moves_distances_by_rounding_only() -> None:
    exact, test = fitted("float32")
    compact, _ = fitted("float16")
    assert compact.precision_factor.dtype == torch.float16
    assert compact.precision_factor.shape == exact.precision_factor.shape
    assert compact.precision_factor.element_size() * 2 == exact.precision_factor.element_size()
    relative = (compact(test) - exact(test)).abs() / exact(test)
    assert relative.max() < 1e-3
    assert relative.max() > 0  # the factor really was rounded


def test_float16_factor_survives_a_weights_only_round_trip(tmp_path) -> None:
    compact, test = fitted("float16")
    path = tmp_path / "gaussian.pt"
    torch.save(compact.state_dict(), path)
    state = torch.load(path, weights_only=True)
    assert state["precision_factor"].dtype == torch.float16

    reloaded = StreamingGaussian(factor_dtype="float16")
    reloaded.load_state_dict(state)
    torch.testing.assert_close(reloaded(test), compact(test), rtol=0, atol=0)
    widened = StreamingGaussian(factor_dtype="float32")
    widened.load_state_dict(state)
    assert widened.precision_factor.dtype == torch.float32
    torch.testing.assert_close(widened(test), compact(test), rtol=1e-6, atol=0)


def test_predictions_follow_a_factor_loaded_after_the_first_prediction() -> None:
    first, test = fitted("float16", seed=1)
    second, _ = fitted("float16", seed=2)
    before = first(test)
    first.load_state_dict(second.state_dict())  # copies into the same storage
    after = first(test)
    torch.testing.assert_close(after, second(test), rtol=0, atol=0)
    assert not torch.allclose(before, after)


def test_factor_that_does_not_fit_the_mean_is_refused_on_load() -> None:
    exact, _ = fitted("float32")
    damaged = {"mean": exact.mean, "precision_factor": exact.precision_factor[:-7]}
    with pytest.raises(ValueError, match="does not fit a mean of shape"):
        StreamingGaussian().load_state_dict(damaged)


def test_statistics_are_exact_for_features_with_a_large_offset() -> None:
    """Centring on the first batch's mean keeps float64 sums accurate where raw sums of squares would not be."""
    generator = torch.Generator().manual_seed(5)
    features = torch.randn(40, 4, 1, 2, generator=generator, dtype=torch.float64) * 0.01 + 1e5
    gaussian = StreamingGaussian(epsilon=1e-6)
    for chunk in torch.split(features.float(), [3, 17, 20]):
        gaussian.update(chunk)
    gaussian.fit()
    samples = features.float().double().permute(2, 3, 0, 1).reshape(2, 40, 4).numpy()
    for position in range(2):
        expected = np.cov(samples[position], rowvar=False, ddof=1) + 1e-6 * np.eye(4)
        np.testing.assert_allclose(gaussian.covariance()[position].numpy(), expected, rtol=1e-4)


@pytest.mark.parametrize("factor_dtype", ["float32", "float16"])
def test_export_stores_the_packed_factor_once_and_computes_the_same(factor_dtype: str, tmp_path) -> None:
    gaussian, test = fitted(factor_dtype)
    gaussian.eval()
    gaussian(test)  # an eager call first: it must not leak a widened copy into the exported graph
    batch = torch.export.Dim("batch")
    exported = torch.export.export(gaussian, (test[:2],), dynamic_shapes=({0: batch},))
    torch.testing.assert_close(exported.module()(test), gaussian(test), rtol=1e-6, atol=1e-6)

    path = tmp_path / "gaussian.onnx"
    torch.onnx.export(gaussian, (test[:2],), str(path), dynamo=True, dynamic_shapes=({0: batch},))
    initializers = onnx.load(str(path)).graph.initializer
    factor_bytes = gaussian.precision_factor.numel() * gaussian.precision_factor.element_size()
    stored = {init.name: onnx.helper.tensor_dtype_to_np_dtype(init.data_type) for init in initializers}
    assert stored["precision_factor"] == np.dtype(factor_dtype)
    total = sum(np.prod(init.dims) * stored[init.name].itemsize for init in initializers)
    assert factor_bytes <= total < 1.1 * factor_bytes


def test_predictions_follow_every_refit_of_a_float16_factor() -> None:
    """The widened copy made for eager calls never outlives the factor it was made from."""
    generator = torch.Generator().manual_seed(9)
    batches = [torch.randn(12, 20, 2, 2, generator=generator) * (1 + index) for index in range(3)]
    test = torch.randn(4, 20, 2, 2, generator=generator)
    gaussian = StreamingGaussian(factor_dtype="float16")
    for index, batch in enumerate(batches):
        gaussian.update(batch)
        gaussian.fit()
        if index != 1:  # two refits in a row without a prediction in between, then one after the next
            fresh = StreamingGaussian(factor_dtype="float16")
            fresh.update(batch)
            fresh.fit()
            torch.testing.assert_close(gaussian(test), fresh(test), rtol=0, atol=0)


def test_lightning_model_stores_a_float16_factor_on_request() -> None:
    from anomalib_contnet import ConTNetPaDiM  # noqa: PLC0415

    model = ConTNetPaDiM(backbone="contnet_ti", pre_trained=False, factor_dtype="float16")
    features = model.model.extract_embedding(torch.rand(3, 3, 224, 224, generator=torch.Generator().manual_seed(0)))
    model.model.gaussian.update(features)
    model.model.gaussian.fit()
    assert model.hparams["factor_dtype"] == "float16"
    assert model.model.gaussian.state_dict()["precision_factor"].dtype == torch.float16
