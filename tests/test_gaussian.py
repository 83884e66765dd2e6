"""The streaming Gaussian against a float64 NumPy reference of Eq. 2 and Eq. 3 of the paper."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from anomalib_contnet.models.contnet_padim.gaussian import StreamingGaussian


def reference_distances(train: np.ndarray, test: np.ndarray, epsilon: float) -> np.ndarray:
    """Eq. 2 (unbiased covariance + εI per position) and Eq. 3 (Mahalanobis distance), position by position."""
    _, dims, height, width = train.shape
    out = np.zeros((test.shape[0], height, width))
    for row in range(height):
        for col in range(width):
            samples = train[:, :, row, col]
            mean = samples.mean(axis=0)
            centered = samples - mean
            covariance = centered.T @ centered / (len(samples) - 1) + epsilon * np.eye(dims)
            precision = np.linalg.inv(covariance)
            delta = test[:, :, row, col] - mean
            out[:, row, col] = np.sqrt(np.einsum("bi,ij,bj->b", delta, precision, delta))
    return out


def fit_in_batches(features: torch.Tensor, split: list[int], epsilon: float = 0.01) -> StreamingGaussian:
    gaussian = StreamingGaussian(epsilon)
    for chunk in torch.split(features, split):
        gaussian.update(chunk)
    gaussian.fit()
    return gaussian


@pytest.mark.parametrize(("count", "dims", "epsilon"), [(40, 6, 0.01), (5, 12, 0.01), (30, 8, 0.5)])
def test_distances_match_numpy_reference(count: int, dims: int, epsilon: float) -> None:
    generator = torch.Generator().manual_seed(count * dims)
    scale = torch.linspace(0.5, 3.0, dims).reshape(1, dims, 1, 1)
    train = torch.randn(count, dims, 3, 4, generator=generator) * scale + 2.0
    test = torch.randn(7, dims, 3, 4, generator=generator) * scale * 1.5 + 2.0
    gaussian = fit_in_batches(train, [count], epsilon)

    expected = reference_distances(train.double().numpy(), test.double().numpy(), epsilon)
    actual = gaussian(test).squeeze(1).double().numpy()
    np.testing.assert_allclose(actual, expected, rtol=1e-5)


def test_fitted_covariance_is_eq2() -> None:
    features = torch.randn(25, 5, 2, 2, generator=torch.Generator().manual_seed(3)) + 10.0
    gaussian = fit_in_batches(features, [25], epsilon=0.1)
    samples = features.double().permute(2, 3, 0, 1).reshape(4, 25, 5).numpy()
    for position in range(4):
        expected = np.cov(samples[position], rowvar=False, ddof=1) + 0.1 * np.eye(5)
        np.testing.assert_allclose(gaussian.covariance()[position].numpy(), expected, rtol=1e-5)


@settings(max_examples=25, deadline=None)
@given(sizes=st.lists(st.integers(min_value=1, max_value=9), min_size=1, max_size=8))
def test_streaming_fit_equals_one_shot_for_any_split(sizes: list[int]) -> None:
    total = max(sum(sizes), 2)
    sizes = sizes if sum(sizes) >= 2 else [*sizes, 2 - sum(sizes)]
    features = torch.randn(total, 6, 2, 3, generator=torch.Generator().manual_seed(total)) * 4.0 + 100.0
    one_shot = fit_in_batches(features, [total])
    streamed = fit_in_batches(features, sizes)
    torch.testing.assert_close(streamed.mean, one_shot.mean, rtol=1e-6, atol=0)
    torch.testing.assert_close(streamed.precision_factor, one_shot.precision_factor, rtol=1e-5, atol=1e-6)


def test_accumulators_are_freed_after_fit() -> None:
    gaussian = fit_in_batches(torch.randn(6, 4, 2, 2), [3, 3])
    assert gaussian.count == 0
    assert gaussian.is_fitted
    assert set(gaussian.state_dict()) == {"mean", "precision_factor"}


def test_single_image_is_refused_with_explanation() -> None:
    gaussian = StreamingGaussian()
    gaussian.update(torch.randn(1, 4, 2, 2))
    with pytest.raises(ValueError, match="at least 2 training images"):
        gaussian.fit()


def test_fewer_images_than_dimensions_warns_and_still_fits() -> None:
    gaussian = StreamingGaussian()
    gaussian.update(torch.randn(3, 16, 2, 2))
    with pytest.warns(UserWarning, match="3 training images for 16 feature dimensions"):
        gaussian.fit()
    assert torch.isfinite(gaussian(torch.randn(2, 16, 2, 2))).all()


def test_non_positive_epsilon_is_refused() -> None:
    with pytest.raises(ValueError, match="epsilon must be positive"):
        StreamingGaussian(epsilon=0.0)
