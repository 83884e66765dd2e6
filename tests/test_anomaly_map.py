"""The factored upsample + blur equals anomalib's bilinear upsampling followed by its GaussianBlur2d."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from anomalib.models.components.filters import GaussianBlur2d

from anomalib_contnet.models.contnet_padim.anomaly_map import AnomalyMapGenerator


def upsample_then_blur(distances: torch.Tensor, image_size: tuple[int, int], sigma: float) -> torch.Tensor:
    """The direct computation: full-resolution bilinear map, then anomalib's 2-D convolution with reflected borders."""
    kernel_size = 2 * int(4.0 * sigma + 0.5) + 1
    blur = GaussianBlur2d(sigma=(sigma, sigma), channels=1, kernel_size=(kernel_size, kernel_size))
    return blur(F.interpolate(distances, size=image_size, mode="bilinear", align_corners=False))


@pytest.mark.parametrize(
    ("grid", "image_size", "sigma"),
    [((7, 7), (224, 224), 4.0), ((14, 7), (448, 224), 4.0), ((7, 5), (224, 160), 1.5), ((3, 3), (40, 40), 4.0)],
)
def test_factored_map_equals_upsample_then_blur(
    grid: tuple[int, int], image_size: tuple[int, int], sigma: float
) -> None:
    distances = torch.rand(3, 1, *grid, generator=torch.Generator().manual_seed(sum(grid))) * 20
    expected = upsample_then_blur(distances, image_size, sigma)
    actual = AnomalyMapGenerator(sigma)(distances, image_size)
    assert actual.shape == expected.shape == (3, 1, *image_size)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))


def test_factored_map_exports_with_a_dynamic_batch() -> None:
    generator = AnomalyMapGenerator(4.0).eval()

    class Wrapper(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.generator = generator

        def forward(self, distances: torch.Tensor) -> torch.Tensor:
            return self.generator(distances, (224, 224))

    distances = torch.rand(5, 1, 7, 7)
    exported = torch.export.export(Wrapper(), (distances[:2],), dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.testing.assert_close(exported.module()(distances), generator(distances, (224, 224)))
