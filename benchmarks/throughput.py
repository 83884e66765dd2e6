"""Predict throughput against what this CPU's matrix-multiply rate allows, in float32 and bfloat16.

1. The matrix-multiply rate of this CPU: best GFLOP/s of a square float32 and
   bfloat16 product, in torch and in OpenVINO (oneDNN) with the same thread
   count, measured in this run; the better of the two is the CPU's rate (torch's
   float32 product uses MKL, which reaches about half of oneDNN's rate on AMD CPUs).
2. The model's floating-point operations per image, counted by torch's
   ``FlopCounterMode`` over the whole forward (backbone stages up to layer4,
   Mahalanobis step, anomaly map), with ``contnet_flops_per_image`` for the
   backbone alone.
3. Images/s at batch 8: eager PyTorch (float32), and the ONNX export converted
   to OpenVINO (as anomalib exports) compiled with ``INFERENCE_PRECISION_HINT``
   ``f32`` and ``bf16`` (the CPU plugin's default on CPUs with AVX512-BF16 or AMX).
   The runtimes are timed interleaved, medians reported.

"efficiency" = images/s x FLOPs per image / matmul rate of the same precision:
the share of the machine's multiply rate the whole model sustains.

Run from the repository root (about 10 minutes on 2 busy cores)::

    python benchmarks/throughput.py --work /tmp/throughput --threads 1
"""

from __future__ import annotations

import argparse
from pathlib import Path

import openvino as ov
import torch
from _common import (
    add_threads_option,
    apply_threads,
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

from anomalib_contnet import ConTNetPaDiMModel
from anomalib_contnet.backbones.contnet import contnet_flops_per_image


def model_flops(model: ConTNetPaDiMModel, side: int) -> int:
    """FLOPs of one image through the whole forward (2 per multiply-add), as torch counts them."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, 3, side, side))
    return int(counter.get_total_flops())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, required=True, help="folder for the ONNX/OpenVINO files")
    parser.add_argument("--backbone", default="contnet_b")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--factor-dtype", default="float32", choices=("float32", "float16"))
    add_threads_option(parser)
    args = parser.parse_args()
    apply_threads(args.threads)
    threads = torch.get_num_threads()
    print(machine_summary(), "\n")

    model = fitted_model(args.backbone, args.factor_dtype)
    side = 224
    flops = model_flops(model, side)
    backbone_flops = contnet_flops_per_image(model.feature_extractor.backbone, side)
    images = torch.randn(args.batch, 3, side, side, generator=torch.Generator().manual_seed(1))

    onnx_path = export_onnx(model, args.work / "model.onnx", images[:2])
    converted = ov.convert_model(onnx_path)
    core = ov.Core()
    compiled = {
        precision: core.compile_model(
            converted,
            "CPU",
            {"INFERENCE_PRECISION_HINT": precision, "PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": threads},
        )
        for precision in ("f32", "bf16")
    }
    default_precision = core.get_property("CPU", "INFERENCE_PRECISION_HINT")
    pixels = images.numpy()

    with torch.no_grad():
        timings = interleaved_timings(
            {
                "eager fp32": lambda: model(images),
                "OpenVINO f32": lambda: compiled["f32"](pixels),
                "OpenVINO bf16": lambda: compiled["bf16"](pixels),
            },
            rounds=args.rounds,
        )
    rates = {
        ("float32", "torch (MKL)"): matmul_rate(torch.float32),
        ("float32", "OpenVINO (oneDNN)"): openvino_matmul_rate("f32", threads),
        ("bfloat16", "torch (oneDNN)"): matmul_rate(torch.bfloat16),
        ("bfloat16", "OpenVINO (oneDNN)"): openvino_matmul_rate("bf16", threads),
    }
    best = {dtype: max(rate for (kind, _), rate in rates.items() if kind == dtype) for dtype in ("float32", "bfloat16")}
    print(f"## Matrix-multiply rate, 2048x2048, {threads} threads\n")
    print(markdown_table(["dtype", "library", "GFLOP/s"], [[*key, rate] for key, rate in rates.items()]))
    print(f"\nbfloat16 / float32 (best of each): {best['bfloat16'] / best['float32']:.2f}x\n")
    print(
        f"FLOPs per image at {side} px: whole model {flops / 1e9:.2f} G (backbone {backbone_flops / 1e9:.2f} G); "
        f"float32 ideal = best float32 rate / FLOPs = {best['float32'] * 1e9 / flops:.2f} images/s; "
        f"OpenVINO's default inference precision here: {default_precision}\n"
    )
    rows = []
    for name, seconds in timings.items():
        rate = args.batch / median(seconds)
        dtype = "bfloat16" if "bf16" in name else "float32"
        rows.append([name, rate, rate * flops / 1e9, rate * flops / (best[dtype] * 1e9)])
    print(f"## Predict throughput, {args.backbone}, batch {args.batch}, {threads} threads, {args.rounds} rounds\n")
    print(markdown_table(["runtime", "images/s", "GFLOP/s sustained", "efficiency vs best matmul rate"], rows))
    openvino_f32 = args.batch / median(timings["OpenVINO f32"])
    openvino_bf16 = args.batch / median(timings["OpenVINO bf16"])
    print(f"\n- OpenVINO bf16 / f32 images/s: {openvino_bf16 / openvino_f32:.2f}x")
    print(f"- OpenVINO f32 / eager images/s: {openvino_f32 / (args.batch / median(timings['eager fp32'])):.2f}x")


if __name__ == "__main__":
    main()
