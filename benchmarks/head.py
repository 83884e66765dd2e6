"""Cost of the head (Mahalanobis distance + upsampling + blur + image score) against the backbone.

At the defaults (contnet_b, 224 px, layer3+layer4, 1536 dimensions, 7x7 grid)
the head multiplies every patch by a 1536x1536 triangular factor per position.
The factor is far larger than any cache, so at small batches the head is bound
by memory bandwidth: this script also measures the read bandwidth of this
machine and prints the lower bound that follows from the bytes the head must
read. For reference it times the head as it was before the packed factor and
the factored blur (full 49x1536x1536 float32 factor, 33x33 convolution on the
upsampled map), rebuilt here from the same fitted Gaussian.

Backbone, head and the old head are timed interleaved (one call of each per
round), so load from other processes hits all of them; medians are reported.

Run from the repository root (about 5 minutes on 2 busy cores)::

    python benchmarks/head.py
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F  # noqa: N812
from _common import (
    add_threads_option,
    apply_threads,
    fitted_model,
    interleaved_timings,
    machine_summary,
    markdown_table,
    median,
    memory_bandwidth,
)
from anomalib.models.components.filters import GaussianBlur2d

from anomalib_contnet import ConTNetPaDiMModel
from anomalib_contnet.models.contnet_padim.gaussian import unpack_factor


def head(model: ConTNetPaDiMModel, embedding: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
    """The model's head, as its forward runs it after the backbone."""
    anomaly_map = model.anomaly_map_generator(model.gaussian(embedding), image_size)
    return torch.amax(anomaly_map, dim=(-2, -1))


class PreviousHead:
    """The head before this optimisation: one full (P, D, D) float32 factor and a direct 33x33 convolution."""

    def __init__(self, model: ConTNetPaDiMModel) -> None:
        gaussian = model.gaussian
        self.mean = gaussian.mean
        self.factor = unpack_factor(gaussian.precision_factor.float(), *gaussian.mean.shape).contiguous()
        self.blur = GaussianBlur2d(sigma=(4.0, 4.0), channels=1, kernel_size=(33, 33))

    def __call__(self, embedding: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
        """Image scores (B,) of ``embedding`` the previous way."""
        batch, channels, height, width = embedding.shape
        delta = embedding.reshape(batch, channels, -1).permute(2, 0, 1) - self.mean.unsqueeze(1)
        distances = torch.bmm(delta, self.factor).square().sum(-1).sqrt().transpose(0, 1)
        upsampled = F.interpolate(distances.reshape(batch, 1, height, width), size=image_size, mode="bilinear")
        return torch.amax(self.blur(upsampled), dim=(-2, -1))


def measure(model: ConTNetPaDiMModel, batches: list[int], rounds: int, read_bandwidth: float) -> list[list]:
    """Table rows for one fitted model: backbone, head, previous head and the bandwidth floor, per batch size."""
    previous = PreviousHead(model)
    factor_bytes = model.gaussian.precision_factor.numel() * 4  # read as float32 at inference either way
    image_size = (224, 224)
    rows = []
    with torch.no_grad():
        for batch in batches:
            images = torch.randn(batch, 3, *image_size, generator=torch.Generator().manual_seed(batch))
            embedding = model.extract_embedding(images)
            timings = interleaved_timings(
                {
                    "backbone": lambda images=images: model.extract_embedding(images),
                    "head": lambda embedding=embedding: head(model, embedding, image_size),
                    "previous": lambda embedding=embedding: previous(embedding, image_size),
                },
                rounds=rounds,
            )
            backbone_s, head_s, previous_s = (median(timings[name]) for name in ("backbone", "head", "previous"))
            floor_s = factor_bytes / (read_bandwidth * 1e9)
            rows.append(
                [
                    model.gaussian.factor_dtype,
                    batch,
                    1e3 * backbone_s,
                    1e3 * head_s,
                    100 * head_s / backbone_s,
                    1e3 * previous_s,
                    100 * previous_s / backbone_s,
                    1e3 * floor_s,
                    100 * floor_s / backbone_s,
                ]
            )
            print(markdown_table(HEADERS, rows[-1:]), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", default="contnet_b")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--batches", default="1,8", help="comma-separated batch sizes")
    add_threads_option(parser)
    args = parser.parse_args()
    apply_threads(args.threads)
    print(machine_summary(), "\n")
    bandwidth = memory_bandwidth()
    print(f"memory bandwidth (best of 5, 512 MB buffers): {bandwidth}\n")
    batches = [int(size) for size in args.batches.split(",")]
    rows = []
    for factor_dtype in ("float32", "float16"):
        rows += measure(fitted_model(args.backbone, factor_dtype), batches, args.rounds, bandwidth["read GB/s"])
    print(f"\n## Head vs backbone, {args.backbone}, 224x224, medians of {args.rounds} interleaved rounds\n")
    print(markdown_table(HEADERS, rows))
    print(
        "\n'floor' = bytes of the float32 factor the head reads per call / measured read bandwidth: no "
        "implementation that reads the factor once per batch can be faster on this machine."
    )


HEADERS = [
    "factor storage",
    "batch",
    "backbone ms",
    "head ms",
    "head % of backbone",
    "previous head ms",
    "previous %",
    "floor ms",
    "floor %",
]

if __name__ == "__main__":
    main()
