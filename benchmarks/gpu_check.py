"""Fit and predict images/s of ConTNetPaDiM on a GPU, with a float32 and a half-precision backbone.

For each backbone precision (float32, then float16 on CUDA / bfloat16 on CPU): fit = random images in
batches through ``extract_embedding`` and the Gaussian statistics, then ``fit()``, in images/s without and
with the one-off factorisation; predict = images/s of one forward at the batch size, median of several
rounds after a warm-up; and the largest relative change of the image scores against the float32 backbone.
Only the backbone changes precision: the Gaussians are accumulated and factorised in float64 and applied
in float32 whatever its dtype. Backbone weights are random (``pre_trained=False``): speed does not depend
on them. Results are printed and written to ``<out>/gpu_check.md``. Run it through
``benchmarks/gpu_check.sh``; on a CPU, ``--device cpu --images 16 --batch 8 --backbone contnet_ti
--n-features 64 --rounds 1`` is a quick smoke test.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

import torch
from _common import machine_summary, markdown_table, median

from anomalib_contnet import ConTNetPaDiMModel
from anomalib_contnet.atomic_files import write_text_atomically


def seconds_of(call: Callable[[], object], device: torch.device) -> float:
    """Wall seconds of ``call()``, waiting for the GPU work it queued."""
    start = time.perf_counter()
    call()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def measure(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> tuple[list[float], torch.Tensor]:
    """Fit and predict rates of a model whose backbone runs in ``dtype``; its image scores on the test batch."""
    torch.manual_seed(0)
    model = ConTNetPaDiMModel(backbone=args.backbone, pre_trained=False, n_features=args.n_features).eval().to(device)
    model.feature_extractor.to(dtype)
    generator = torch.Generator().manual_seed(0)  # the same images for every precision
    sizes = [min(args.batch, args.images - start) for start in range(0, args.images, args.batch)]
    batches = [torch.rand(size, 3, 224, 224, generator=generator) for size in sizes]
    test_images = torch.rand(args.batch, 3, 224, 224, generator=generator).to(device, dtype)

    def stream(batches: list[torch.Tensor]) -> None:
        for images in batches:
            model.gaussian.update(model.extract_embedding(images.to(device, dtype)))

    with torch.no_grad():
        stream(batches[:1])  # warm-up, then start over
        model.gaussian.reset_statistics()
        streaming = seconds_of(lambda: stream(batches), device)
        factorising = seconds_of(model.gaussian.fit, device)
        scores = model(test_images).pred_score.float().cpu()  # also the predict warm-up
        predict = median([seconds_of(lambda: model(test_images), device) for _ in range(args.rounds)])
    rates = [args.images / streaming, args.images / (streaming + factorising), factorising, args.batch / predict]
    return rates, scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu")
    parser.add_argument("--images", type=int, default=512, help="training images for the fit measurement")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=20, help="timed predict rounds")
    parser.add_argument("--backbone", default="contnet_b")
    parser.add_argument("--n-features", type=int, default=None, help="random embedding channels (default: all)")
    parser.add_argument("--out", type=Path, required=True, help="folder for gpu_check.md")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda given but torch sees no CUDA device; pass --device cpu for a smoke test")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # float32 means float32 here
        torch.backends.cudnn.allow_tf32 = False
        described = f"{torch.cuda.get_device_name(device)}, CUDA {torch.version.cuda}; {machine_summary()}"
    else:
        described = machine_summary()
    rows, reference_scores = [], None
    for dtype in (torch.float32, torch.float16 if device.type == "cuda" else torch.bfloat16):
        rates, scores = measure(args, device, dtype)
        reference_scores = scores if reference_scores is None else reference_scores
        change = float(((scores - reference_scores).abs() / reference_scores.abs()).max())
        rows.append([str(dtype).removeprefix("torch."), *rates, change])
    headers = ["backbone dtype", "fit img/s (streaming)", "fit img/s (incl. fit())", "fit() s"]
    headers += [f"predict img/s (batch {args.batch})", "max score change vs float32"]
    report = (
        f"# ConTNetPaDiM GPU check: {args.backbone}, 224x224, random weights\n\n{described}\n\n"
        f"Fit: {args.images} random images in batches of {args.batch}. Predict: median of {args.rounds} forwards "
        f"after a warm-up.\n\n{markdown_table(headers, rows)}\n\n"
        f"half / float32 predict images/s: {rows[1][4] / rows[0][4]:.2f}x\n"
    )
    args.out.mkdir(parents=True, exist_ok=True)
    write_text_atomically(args.out / "gpu_check.md", report)
    print(report)


if __name__ == "__main__":
    main()
