"""The streaming Gaussian against a float64 reference of Eq. 2 and Eq. 3 of the paper, in both of its forms."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from anomalib_contnet.models.contnet_padim.gaussian import StreamingGaussian

DIMS = 24

pytestmark = pytest.mark.filterwarnings("ignore:.*training image")


def reference_distances(train: torch.Tensor, test: torch.Tensor, epsilon: float) -> np.ndarray:
    """Eq. 2 (unbiased covariance + εI per position) and Eq. 3 (Mahalanobis distance) in float64, by solving."""
    count, dims = train.shape[:2]
    samples = train.double().flatten(2).permute(2, 0, 1)  # (P, N, D)
    queries = test.double().flatten(2).permute(2, 0, 1)
    mean = samples.mean(dim=1, keepdim=True)
    centred = samples - mean
    scatter = centred.mT @ centred if count > 1 else torch.zeros(samples.shape[0], dims, dims, dtype=torch.float64)
    covariance = scatter / max(count - 1, 1) + epsilon * torch.eye(dims, dtype=torch.float64)
    residual = queries - mean
    squared = (residual * torch.linalg.solve(covariance, residual.mT).mT).sum(-1)
    return squared.sqrt().T.reshape(test.shape[0], *test.shape[2:]).numpy()


def features(count: int, seed: int, dims: int = DIMS, scale: float = 3.0) -> torch.Tensor:
    """(count, dims, 2, 3) features with unequal variances, correlated channels and a large offset."""
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(dims, dims, generator=generator) / dims**0.5
    spread = torch.logspace(-1, 0, dims) * scale
    raw = torch.randn(count, 2, 3, dims, generator=generator) * spread
    return (raw @ mixing).permute(0, 3, 1, 2).contiguous() + 50.0


def fit_in_batches(train: torch.Tensor, split: list[int], epsilon: float = 0.01) -> StreamingGaussian:
    gaussian = StreamingGaussian(epsilon)
    for chunk in torch.split(train, split):
        gaussian.update(chunk)
    gaussian.fit()
    return gaussian


@pytest.mark.parametrize("count", [1, 2, 5, DIMS - 1, DIMS, DIMS + 1, DIMS + 2, DIMS + 100])
def test_distances_match_a_float64_reference_on_both_sides_of_the_switch(count: int) -> None:
    train, test = features(count, seed=count), features(9, seed=1000 + count) * 1.5 - 25.0
    gaussian = fit_in_batches(train, [5] * (count // 5) + [count % 5])
    assert gaussian.basis.shape == (6, DIMS, min(count - 1, DIMS))
    expected = reference_distances(train, test, 0.01)
    np.testing.assert_allclose(gaussian(test).squeeze(1).double().numpy(), expected, rtol=1e-4)


@pytest.mark.parametrize("count", [10, DIMS + 10])
def test_a_residual_almost_inside_the_span_of_the_samples_keeps_its_precision(count: int) -> None:
    """Training samples nudged off their span: |r|² and its projection nearly cancel, the distance must not."""
    train = features(count, seed=7, scale=30.0)  # variances up to 900: about 1e5 times epsilon
    nudge = torch.randn(count, DIMS, 2, 3, generator=torch.Generator().manual_seed(8)) * 1e-3
    test = train + nudge
    gaussian = fit_in_batches(train, [count], epsilon=0.01)
    expected = reference_distances(train, test, 0.01)
    np.testing.assert_allclose(gaussian(test).squeeze(1).double().numpy(), expected, rtol=1e-4)


@settings(max_examples=20, deadline=None)
@given(sizes=st.lists(st.integers(min_value=1, max_value=9), min_size=1, max_size=8))
def test_streaming_fit_equals_one_shot_for_any_split(sizes: list[int]) -> None:
    train, test = features(sum(sizes), seed=sum(sizes), dims=6), features(4, seed=99, dims=6)
    one_shot = fit_in_batches(train, [sum(sizes)])
    streamed = fit_in_batches(train, sizes)
    torch.testing.assert_close(streamed.mean, one_shot.mean, rtol=1e-6, atol=0)
    torch.testing.assert_close(streamed(test), one_shot(test), rtol=1e-5, atol=0)


@pytest.mark.parametrize(("first", "second"), [(1, 7), (12, 8), (DIMS - 3, 10), (DIMS + 20, 15)])
def test_continuing_a_fit_gives_one_fit_on_all_images(first: int, second: int) -> None:
    train, test = features(first + second, seed=first), features(9, seed=3)
    continued = fit_in_batches(train[:first], [first])
    continued.reset_statistics(continue_from_fit=True)
    continued.update(train[first:])
    continued.fit()
    together = fit_in_batches(train, [first + second])
    assert int(continued.count) == first + second
    torch.testing.assert_close(continued.mean, together.mean, rtol=1e-6, atol=0)
    torch.testing.assert_close(continued(test), together(test), rtol=1e-5, atol=0)


def test_a_second_fit_without_continuing_forgets_the_first() -> None:
    gaussian = fit_in_batches(features(10, seed=1), [10])
    gaussian.reset_statistics()
    gaussian.update(features(6, seed=2))
    gaussian.fit()
    fresh = fit_in_batches(features(6, seed=2), [6])
    assert int(gaussian.count) == 6
    torch.testing.assert_close(gaussian(features(3, seed=4)), fresh(features(3, seed=4)), rtol=0, atol=0)


def test_one_image_gives_scaled_euclidean_distances() -> None:
    train, test = features(1, seed=0), features(3, seed=1)
    gaussian = StreamingGaussian(epsilon=0.04)
    gaussian.update(train)
    gaussian.fit()
    euclidean = (test - train).norm(dim=1, keepdim=True) / 0.2
    torch.testing.assert_close(gaussian(test), euclidean, rtol=1e-5, atol=0)


@pytest.mark.parametrize("count", [2, 4, 8, 16])
def test_few_images_fit_with_finite_scores(count: int) -> None:
    """What such scores mean is said by the model's fit (tests/test_reliability.py)."""
    gaussian = StreamingGaussian()
    gaussian.update(features(count, seed=count))
    gaussian.fit()
    assert torch.isfinite(gaussian(features(2, seed=0))).all()


def test_no_image_is_refused_with_explanation() -> None:
    with pytest.raises(ValueError, match="needs at least 1 training image"):
        StreamingGaussian().fit()


def test_state_holds_only_what_inference_and_continuing_need() -> None:
    gaussian = fit_in_batches(features(10, seed=1), [4, 6])
    assert gaussian.samples_seen == 0
    assert {name: tuple(value.shape) for name, value in gaussian.state_dict().items()} == {
        "mean": (6, DIMS),
        "basis": (6, DIMS, 9),
        "variances": (6, 9),
        "count": (),
    }


def test_non_positive_epsilon_is_refused() -> None:
    with pytest.raises(ValueError, match="epsilon must be positive"):
        StreamingGaussian(epsilon=0.0)


@pytest.mark.parametrize("count", [12, DIMS + 30])
def test_onnx_export_computes_the_same_and_holds_the_basis_once(count: int, tmp_path) -> None:
    gaussian = fit_in_batches(features(count, seed=count), [count]).eval()
    test = features(5, seed=5)
    batch = torch.export.Dim("batch")
    path = tmp_path / "gaussian.onnx"
    torch.onnx.export(gaussian, (test[:2],), str(path), dynamo=True, dynamic_shapes=({0: batch},))
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (exported,) = session.run(None, {session.get_inputs()[0].name: test.numpy()})
    np.testing.assert_allclose(exported, gaussian(test).numpy(), rtol=1e-5)
    stored = sum(np.prod(init.dims) * 4 for init in onnx.load(str(path)).graph.initializer)
    assert gaussian.basis.nbytes <= stored < 1.2 * gaussian.basis.nbytes + gaussian.mean.nbytes


def test_epsilon_negligible_beside_the_variances_still_fits() -> None:
    """Variances near 1e12 and epsilon 1e-9: no factorisation can fail, and the distances stay exact.

    Solving with the D x D covariance in float64 breaks down here (condition number 1e21),
    so the reference splits the residual by an SVD of the centred samples: inside their
    span it is weighted by 1/(variance + epsilon), outside by 1/epsilon.
    """
    train, test = features(3, seed=0) * 1e6, features(2, seed=1) * 1e6
    gaussian = fit_in_batches(train, [3], epsilon=1e-9)
    samples, queries = train.double().flatten(2).permute(2, 0, 1), test.double().flatten(2).permute(2, 0, 1)
    mean = samples.mean(dim=1, keepdim=True)
    _, singular, directions = torch.linalg.svd(samples - mean, full_matrices=False)
    directions, variances = directions[:, :2], singular[:, :2].square() / 2  # rank N - 1 = 2
    residual = queries - mean
    inside = residual @ directions.mT
    outside = residual - inside @ directions
    squared = outside.square().sum(-1) / 1e-9 + (inside.square() / (variances.unsqueeze(1) + 1e-9)).sum(-1)
    expected = squared.sqrt().T.reshape(2, 2, 3).numpy()
    np.testing.assert_allclose(gaussian(test).squeeze(1).double().numpy(), expected, rtol=1e-4)


def bytes_allocated(gaussian: StreamingGaussian, batches: list[torch.Tensor]) -> int:
    """CPU bytes torch allocates while ``gaussian`` takes ``batches``, freed again or not (torch's profiler)."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    with torch.profiler.profile(activities=activities, profile_memory=True) as profiler:
        for batch in batches:
            gaussian.update(batch)
    return sum(max(event.self_cpu_memory_usage, 0) for event in profiler.events())


def test_streaming_allocates_about_one_batch_per_batch_and_copies_no_statistics() -> None:
    """Fit memory at 448 px grew 3.3x when every batch copied all kept samples into a new tensor (torch.cat).

    16 positions x 256 dims, channels-last batches of 8 as the backbone gives them: kept
    samples (the first batch allocates their buffer), and past the switch the scatter
    matrix, which is 32 batches of float64 large. The code before the fix allocated 17.7
    and 2.6 batches per batch; now 1.4 and 1.5.
    """
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randn(8, 256, 4, 4, generator=generator).to(memory_format=torch.channels_last) for _ in range(60)]
    batch_bytes = 16 * 8 * 256 * 8
    kept, scatter = StreamingGaussian(), StreamingGaussian()
    kept.update(batches[0])
    for batch in batches[:34]:  # 272 samples: past the switch at 256
        scatter.update(batch)
    assert bytes_allocated(kept, batches[1:25]) <= 2 * 24 * batch_bytes  # up to 200 samples
    assert bytes_allocated(scatter, batches[34:]) <= 2 * 26 * batch_bytes
