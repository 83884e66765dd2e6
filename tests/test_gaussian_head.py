"""The Gaussian head's levers (neighbourhood, shift tolerance, shared covariance) against float64 loop references.

The references never call the package's shifting code: neighbours are gathered by index,
covariances inverted densely, minima taken position by position.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from anomalib_contnet.models.contnet_padim.gaussian import StreamingGaussian

DIMS = 8
HEIGHT, WIDTH = 3, 4

pytestmark = pytest.mark.filterwarnings("ignore:.*training image")


def features(count: int, seed: int) -> torch.Tensor:
    """(count, DIMS, 3, 4) float32 features with correlated channels and a position-dependent mean."""
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(DIMS, DIMS, generator=generator) / DIMS**0.5
    raw = torch.randn(count, HEIGHT, WIDTH, DIMS, generator=generator) * torch.logspace(-1, 0, DIMS) * 3
    layout = torch.arange(HEIGHT * WIDTH, dtype=torch.float32).reshape(1, 1, HEIGHT, WIDTH)
    return (raw @ mixing).permute(0, 3, 1, 2) + 5.0 + layout


def clamped(index: int, size: int) -> int:
    return min(max(index, 0), size - 1)


def shrunk_covariance_of_all_patches(train: torch.Tensor) -> torch.Tensor:
    """The unbiased covariance of every patch of every position, 7 % of it moved to its mean variance (float64)."""
    patches = train.double().permute(0, 2, 3, 1).reshape(-1, DIMS)
    covariance = torch.cov(patches.T)
    return 0.93 * covariance + 0.07 * covariance.diagonal().mean() * torch.eye(DIMS).double()


def reference_gaussians(train: torch.Tensor, epsilon: float, radius: int, shared: bool = False) -> dict:
    """Per position (i, j): mean and dense precision of the patches of every position within ``radius`` cells.

    The regulariser is ``epsilon`` times the identity, or with ``shared`` the covariance of all patches.
    """
    regulariser = shrunk_covariance_of_all_patches(train) if shared else torch.eye(DIMS).double()
    train = train.double()
    gaussians = {}
    for i, j in itertools.product(range(HEIGHT), range(WIDTH)):
        rows = [
            train[:, :, clamped(i + di, HEIGHT), clamped(j + dj, WIDTH)]
            for di, dj in itertools.product(range(-radius, radius + 1), repeat=2)
        ]
        samples = torch.cat(rows)
        mean = samples.mean(0)
        centred = samples - mean
        covariance = centred.T @ centred / max(len(samples) - 1, 1) + epsilon * regulariser
        gaussians[i, j] = (mean, torch.linalg.inv(covariance))
    return gaussians


def reference_distances(gaussians: dict, test: torch.Tensor, tolerance: int) -> np.ndarray:
    """Smallest Mahalanobis distance of each test patch under the Gaussians within ``tolerance`` cells (in the grid)."""
    test = test.double()
    out = np.empty((test.shape[0], HEIGHT, WIDTH))
    for i, j in itertools.product(range(HEIGHT), range(WIDTH)):
        candidates = []
        for di, dj in itertools.product(range(-tolerance, tolerance + 1), repeat=2):
            if (i + di, j + dj) in gaussians:
                mean, precision = gaussians[i + di, j + dj]
                residual = test[:, :, i, j] - mean
                candidates.append(((residual @ precision) * residual).sum(-1).sqrt())
        out[:, i, j] = torch.stack(candidates).amin(0).numpy()
    return out


def fitted(train: torch.Tensor, batches: list[int], **levers) -> StreamingGaussian:
    gaussian = StreamingGaussian(0.01, **levers)
    for chunk in torch.split(train, batches):
        gaussian.update(chunk)
    gaussian.fit()
    return gaussian


@pytest.mark.parametrize("count", [1, 3, 12])  # 1 and 3 images: fewer samples than DIMS once the radius is 0
@pytest.mark.parametrize(
    "levers",
    [
        {"neighbourhood": 1},
        {"shift_tolerance": 1},
        {"neighbourhood": 2, "shift_tolerance": 2},  # radius 2 > the grid's 3 rows / 2: border cells repeat
        {"neighbourhood": 1, "shift_tolerance": 1},
        {"shared_covariance": True},
        {"shared_covariance": True, "neighbourhood": 1, "shift_tolerance": 1},
    ],
    ids=str,
)
def test_each_lever_computes_its_definition(count: int, levers: dict) -> None:
    train, test = features(count, seed=count), features(5, seed=100 + count) * 1.3
    gaussian = fitted(train, [2] * (count // 2) + [count % 2], **levers)
    reference = reference_gaussians(train, 0.01, levers.get("neighbourhood", 0), levers.get("shared_covariance", False))
    expected = reference_distances(reference, test, levers.get("shift_tolerance", 0))
    np.testing.assert_allclose(gaussian(test).squeeze(1).double().numpy(), expected, rtol=1e-4)
    assert int(gaussian.count) == count * (2 * levers.get("neighbourhood", 0) + 1) ** 2


@pytest.mark.parametrize(
    "levers", [{"neighbourhood": 1, "shift_tolerance": 1}, {"shared_covariance": True, "neighbourhood": 1}], ids=str
)
def test_a_continued_fit_is_one_fit_on_all_images(levers: dict) -> None:
    """The shared covariance too: the continued fit restores its moments and those of the unwhitened Gaussians."""
    train, test = features(9, seed=1), features(4, seed=2)
    continued = fitted(train[:2], [2], **levers)
    continued.reset_statistics(continue_from_fit=True)
    continued.update(train[2:])
    continued.fit()
    together = fitted(train, [9], **levers)
    torch.testing.assert_close(continued.variances, together.variances, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(continued(test), together(test), rtol=1e-5, atol=0)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"neighbourhood": -1}, "neighbourhood must be a whole number"),
        ({"neighbourhood": 1.5}, "neighbourhood must be a whole number"),
        ({"shift_tolerance": True}, "shift_tolerance must be a whole number"),
        ({"shared_covariance": 1}, "shared_covariance must be True or False"),
    ],
)
def test_bad_lever_values_are_refused(arguments: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        StreamingGaussian(0.01, **arguments)
