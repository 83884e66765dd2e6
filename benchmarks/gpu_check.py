"""Fit and predict images/s of ConTNetPaDiM on a GPU, with a float32 and a half-precision backbone.

For each backbone precision (float32, then float16 on CUDA / bfloat16 on CPU):

- fit: random images in batches through ``extract_embedding`` and the Gaussian
  statistics, then ``fit()``; images/s over the whole thing (the one-off
  factorisation included) and without it;
- predict: images/s of the model's forward at the chosen batch size, medians of
  several rounds after a warm-up;
- the largest relative change of the predicted image scores against the float32
  backbone, on the same images.

Only the backbone changes precision: the Gaussian statistics are accumulated in
float64, factorised in float64 and applied in float32 whatever the backbone's
dtype (the half-precision embedding is widened before the Mahalanobis step).
Backbone weights are random (``pre_trained=False``): speed does not depend on them.

Results are printed and written as markdown to ``<out>/gpu_check.md``. Run it
through ``benchmarks/gpu_check.sh``; on a CPU, ``--device cpu --images 16
--batch 8 --backbone contnet_ti --n-features 64 --rounds 1`` is a quick smoke test.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import torch

from anomalib_contnet import ConTNetPaDiMModel


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so wall-clock times measure it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build(
    backbone: str, n_features: int | None, device: torch.device, backbone_dtype: torch.dtype
) -> ConTNetPaDiMModel:
    """The model with random weights on ``device``; only the feature extractor is cast to ``backbone_dtype``."""
    torch.manual_seed(0)
    model = ConTNetPaDiMModel(backbone=backbone, pre_trained=False, n_features=n_features).eval().to(device)
    model.feature_extractor.to(backbone_dtype)
    return model


def random_batches(count: int, batch: int, side: int, seed: int) -> list[torch.Tensor]:
    """CPU batches of random images, the same for every precision (made once, moved to the device per use)."""
    generator = torch.Generator().manual_seed(seed)
    sizes = [min(batch, count - start) for start in range(0, count, batch)]
    return [torch.rand(size, 3, side, side, generator=generator) for size in sizes]


def measure_fit(
    model: ConTNetPaDiMModel, batches: list[torch.Tensor], device: torch.device, dtype: torch.dtype
) -> dict[str, float]:
    """Seconds of the streaming statistics over all batches (host-to-device copies included) and of ``fit()``."""
    with torch.no_grad():
        model.gaussian.update(model.extract_embedding(batches[0].to(device, dtype)))  # warm-up, then start over
        model.gaussian.reset_statistics()
        synchronize(device)
        start = time.perf_counter()
        for images in batches:
            model.gaussian.update(model.extract_embedding(images.to(device, dtype)))
        synchronize(device)
        streaming = time.perf_counter() - start
        start = time.perf_counter()
        model.gaussian.fit()
        synchronize(device)
    return {"streaming_s": streaming, "fit_s": time.perf_counter() - start}


def measure_predict(
    model: ConTNetPaDiMModel, images: torch.Tensor, device: torch.device, dtype: torch.dtype, rounds: int
) -> tuple[float, torch.Tensor]:
    """Median seconds of one forward of ``images`` (already on the device) and the image scores it gave."""
    batch = images.to(device, dtype)
    with torch.no_grad():
        scores = model(batch).pred_score.float().cpu()  # warm-up
        seconds = []
        for _ in range(rounds):
            synchronize(device)
            start = time.perf_counter()
            model(batch)
            synchronize(device)
            seconds.append(time.perf_counter() - start)
    return statistics.median(seconds), scores


def describe_device(device: torch.device) -> str:
    """Name the accelerator (or CPU) and the software versions."""
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        name = f"{properties.name}, {properties.total_memory / 2**30:.0f} GiB, CUDA {torch.version.cuda}"
    else:
        name = f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    return f"{name}; torch {torch.__version__}; Python {platform.python_version()}"


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
    half = torch.float16 if device.type == "cuda" else torch.bfloat16
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # float32 means float32 here
        torch.backends.cudnn.allow_tf32 = False

    batches = random_batches(args.images, args.batch, 224, seed=0)
    test_images = random_batches(args.batch, args.batch, 224, seed=1)[0]
    rows, reference_scores = [], None
    for dtype in (torch.float32, half):
        model = build(args.backbone, args.n_features, device, dtype)
        fit = measure_fit(model, batches, device, dtype)
        predict_s, scores = measure_predict(model, test_images, device, dtype, args.rounds)
        reference_scores = scores if reference_scores is None else reference_scores
        change = float(((scores - reference_scores).abs() / reference_scores.abs()).max())
        rows.append(
            [
                str(dtype).removeprefix("torch."),
                args.images / fit["streaming_s"],
                args.images / (fit["streaming_s"] + fit["fit_s"]),
                fit["fit_s"],
                args.batch / predict_s,
                change,
            ]
        )
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()

    headers = [
        "backbone dtype",
        "fit img/s (streaming)",
        "fit img/s (incl. fit())",
        "fit() s",
        f"predict img/s (batch {args.batch})",
        "max score change vs float32",
    ]
    lines = [
        f"# ConTNetPaDiM GPU check: {args.backbone}, 224x224, random weights",
        "",
        describe_device(device),
        "",
        f"Fit: {args.images} random images in batches of {args.batch}; Gaussian statistics float64, "
        "factorisation float64, Mahalanobis float32 in every row. Predict: median of "
        f"{args.rounds} forwards after a warm-up.",
        "",
        "| " + " | ".join(headers) + " |",
        "|" + "---|" * len(headers),
    ]
    lines += ["| " + " | ".join(f"{v:.4g}" if isinstance(v, float) else v for v in row) + " |" for row in rows]
    lines += ["", f"half / float32 predict images/s: {rows[1][4] / rows[0][4]:.2f}x"]
    report = "\n".join(lines) + "\n"
    args.out.mkdir(parents=True, exist_ok=True)
    temporary = args.out / "gpu_check.md.tmp"
    temporary.write_text(report)
    temporary.replace(args.out / "gpu_check.md")
    print(report)


if __name__ == "__main__":
    main()
