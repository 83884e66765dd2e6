"""Predict throughput: eager PyTorch against OpenVINO, and both against this CPU's matrix-multiply rate.

1. The matrix-multiply rates of this CPU, per thread count: a square 2048 product
   in float32 and bfloat16, in torch and in OpenVINO (oneDNN), and the encoders'
   typical float32 product (1568x512 by 512x2048: contnet_b's stage-3 MLP at batch 8)
   through torch's ``F.linear`` (MKL) and through the oneDNN primitive the
   backbone uses for CPU inference (``cpu_inference.linear``).
2. The model's floating-point operations per image, counted by torch's
   ``FlopCounterMode`` over the whole forward (backbone stages up to layer4,
   Mahalanobis step, anomaly map), and over the backbone alone.
3. Images/s per thread count and batch size: eager PyTorch (float32), and the ONNX
   export converted to OpenVINO (as anomalib exports) compiled with
   ``INFERENCE_PRECISION_HINT`` ``f32`` and ``bf16`` (the CPU plugin's default on
   CPUs with AVX512-BF16 or AMX), timed interleaved in this process, medians reported.

"efficiency" = images/s x FLOPs per image / matmul rate of the same precision:
the share of the machine's multiply rate the whole model sustains. The last table
gives the ratios the performance targets name: eager / OpenVINO f32 images/s and
OpenVINO f32's efficiency against the best float32 rate of the same run.

Run from the repository root (about 5 minutes on 2 busy cores)::

    python benchmarks/throughput.py --work /tmp/throughput --threads 1 2 --batches 1 8
"""

from __future__ import annotations

import argparse
from functools import partial
from pathlib import Path

import openvino as ov
import torch
from _common import (
    export_onnx,
    fitted_model,
    interleaved_timings,
    machine_summary,
    markdown_table,
    matmul_rate,
    median,
    openvino_matmul_rate,
)
from torch.utils.flop_counter import FlopCounterMode

from anomalib_contnet.backbones.cpu_inference import linear


def flops_per_image(module: torch.nn.Module, side: int) -> int:
    """FLOPs of one RGB image through ``module`` (2 per multiply-add), as torch's counter counts them."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        module(torch.zeros(1, 3, side, side))
    return int(counter.get_total_flops())


def encoder_product_rates(rounds: int = 5) -> dict[str, float]:
    """Best GFLOP/s of the encoders' typical float32 product through MKL (``F.linear``) and oneDNN (``linear``)."""
    tokens, inputs, outputs = 1568, 512, 2048
    layer = torch.nn.Linear(inputs, outputs)
    sample = torch.randn(tokens, inputs)
    with torch.no_grad():
        seconds = interleaved_timings(
            {
                "torch F.linear (MKL)": lambda: torch.nn.functional.linear(sample, layer.weight, layer.bias),
                "torch cpu_inference.linear (oneDNN)": lambda: linear(sample, layer),
            },
            rounds,
        )
    return {name: 2 * tokens * inputs * outputs / min(times) / 1e9 for name, times in seconds.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, required=True, help="folder for the ONNX/OpenVINO files")
    parser.add_argument("--backbone", default="contnet_b")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="torch and OpenVINO thread counts")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    print(machine_summary(), "\n")

    model = fitted_model(args.backbone)
    side = 224
    flops = flops_per_image(model, side)
    backbone_flops = flops_per_image(model.feature_extractor.backbone, side)
    images = torch.randn(max(args.batches), 3, side, side, generator=torch.Generator().manual_seed(1))
    converted = ov.convert_model(export_onnx(model, args.work / "model.onnx", images[:2]))
    core = ov.Core()
    print(
        f"FLOPs per image at {side} px: whole model {flops / 1e9:.2f} G (backbone {backbone_flops / 1e9:.2f} G); "
        f"OpenVINO's default inference precision here: {core.get_property('CPU', 'INFERENCE_PRECISION_HINT')}\n"
    )

    rate_rows, speed_rows, ratio_rows = [], [], []
    for threads in args.threads:
        torch.set_num_threads(threads)
        config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": threads}
        compiled = {
            precision: core.compile_model(converted, "CPU", {**config, "INFERENCE_PRECISION_HINT": precision})
            for precision in ("f32", "bf16")
        }
        rates = {
            ("float32", "2048 square", "torch (MKL)"): matmul_rate(torch.float32),
            ("float32", "2048 square", "OpenVINO (oneDNN)"): openvino_matmul_rate("f32", threads),
            ("bfloat16", "2048 square", "torch (oneDNN)"): matmul_rate(torch.bfloat16),
            ("bfloat16", "2048 square", "OpenVINO (oneDNN)"): openvino_matmul_rate("bf16", threads),
        }
        rates.update({("float32", "1568x512x2048", name): rate for name, rate in encoder_product_rates().items()})
        rate_rows += [[threads, *key, rate] for key, rate in rates.items()]
        best = {dtype: max(rate for key, rate in rates.items() if key[0] == dtype) for dtype in ("float32", "bfloat16")}
        for batch in args.batches:
            batch_images = images[:batch]
            pixels = batch_images.numpy()
            with torch.no_grad():
                timings = interleaved_timings(
                    {
                        "eager fp32": partial(model, batch_images),
                        "OpenVINO f32": partial(compiled["f32"], pixels),
                        "OpenVINO bf16": partial(compiled["bf16"], pixels),
                    },
                    rounds=args.rounds,
                )
            per_second = {name: batch / median(seconds) for name, seconds in timings.items()}
            for name, rate in per_second.items():
                dtype = "bfloat16" if "bf16" in name else "float32"
                speed_rows.append([threads, batch, name, rate, rate * flops / 1e9, rate * flops / (best[dtype] * 1e9)])
            ratio_rows.append(
                [
                    threads,
                    batch,
                    per_second["eager fp32"] / per_second["OpenVINO f32"],
                    per_second["OpenVINO f32"] * flops / (best["float32"] * 1e9),
                    per_second["OpenVINO bf16"] / per_second["OpenVINO f32"],
                ]
            )

    print("## Matrix-multiply rates\n")
    print(markdown_table(["threads", "dtype", "product", "library", "GFLOP/s"], rate_rows))
    print(f"\n## Predict throughput, {args.backbone}, {side} px, {args.rounds} rounds\n")
    headers = ["threads", "batch", "runtime", "images/s", "GFLOP/s sustained", "efficiency vs best matmul rate"]
    print(markdown_table(headers, speed_rows))
    print("\n## Ratios\n")
    headers = ["threads", "batch", "eager / OpenVINO f32", "OpenVINO f32 / best float32 rate", "OpenVINO bf16 / f32"]
    print(markdown_table(headers, ratio_rows))


if __name__ == "__main__":
    main()
