"""Fit memory and fit throughput: ConTNetPaDiM's streaming Gaussian against anomalib's Padim.

Every setting runs in a fresh child process that builds the model, feeds it
synthetic tensors (no data loading, no Lightning), fits, and reports its own
peak resident set size. Two kinds of input:

- ``images``: random 224x224 images through the whole training step (backbone,
  embedding, statistics), exactly what ``training_step`` does;
- ``embeddings``: random embeddings of the model's real shape handed straight to
  the statistics. The backbone is still built (its weights count in the RSS) but
  not run, which makes 1,000 images affordable on a small CPU. Only the
  statistics can grow with the number of images; this isolates them.

Padim keeps every training embedding until ``fit`` and grows linearly; it is
shown with resnet18 (cheap) over several sizes, and with wide_resnet50_2 at small
sizes only: at N=300 it needs more memory than a shared 24 GB machine can spare
(see ANOMALIB_NOTES.md), so that figure is extrapolated from the measured
per-image slope, and the table says so.

``--previous-gaussian FILE`` adds the statistics alone (no backbone in the
process) for the current ``StreamingGaussian`` and for the class in FILE, for
example the version before this optimisation, taken from git::

    git show cab6a70:anomalib_contnet/models/contnet_padim/gaussian.py > /tmp/previous_gaussian.py

The throughput part times, batch by batch on the same batches, the backbone
alone (``extract_embedding``) against the training step (``extract_embedding``
+ ``update``), interleaved so that background load hits both, then the one-off
factorisation in ``fit()``.

Run from the repository root (about 25 minutes on 2 busy cores; ``--quick`` for a smoke run)::

    python benchmarks/fit_memory.py --threads 1 --previous-gaussian /tmp/previous_gaussian.py
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import time
from pathlib import Path
from typing import Any

import torch
from _common import (
    add_threads_option,
    apply_threads,
    available_memory_gb,
    interleaved_timings,
    machine_summary,
    markdown_table,
    peak_rss_mb,
    report_child_result,
    run_child,
)

SCRIPT = Path(__file__).resolve()
SIDE = 224
BATCH = 8
WIDE_RESNET_NEEDS_GB = 16.0
"""Free GB a Padim wide_resnet50_2 fit at 224 px needs: 3136 covariances of 550x550 take 3.8 GB, three copies at once.

Measured here: 15.6 GB peak RSS at N=8, of which about 1 GB is the interpreter and libraries.
"""


def _batches(count: int, generator: torch.Generator, shape: tuple[int, ...]) -> list[torch.Tensor]:
    """Random batches of ``BATCH`` samples (the last one smaller) totalling ``count`` samples."""
    sizes = [min(BATCH, count - start) for start in range(0, count, BATCH)]
    return [torch.randn(size, *shape, generator=generator) for size in sizes]


def _fit_contnet_padim(setting: dict[str, Any]) -> dict[str, Any]:
    from anomalib_contnet import ConTNetPaDiMModel  # noqa: PLC0415  (children import only what they run)

    model = ConTNetPaDiMModel(
        backbone=setting["backbone"], pre_trained=False, factor_dtype=setting.get("factor_dtype", "float32")
    ).eval()
    built_rss = peak_rss_mb()
    generator = torch.Generator().manual_seed(0)
    grid = SIDE // 32
    start = time.perf_counter()
    with torch.no_grad():
        for first in range(0, setting["images"], BATCH):
            size = min(BATCH, setting["images"] - first)
            if setting["input"] == "images":
                embedding = model.extract_embedding(torch.randn(size, 3, SIDE, SIDE, generator=generator))
            else:
                embedding = torch.randn(size, model.embedding_dim, grid, grid, generator=generator)
            model.gaussian.update(embedding)
        model.gaussian.fit()
    return {"built_rss_mb": built_rss, "seconds": time.perf_counter() - start}


def _fit_gaussian_alone(setting: dict[str, Any]) -> dict[str, Any]:
    """Only the statistics, fed random (B, 1536, 7, 7) embeddings: the current class or one loaded from a file."""
    if setting["source"] == "current":
        from anomalib_contnet.models.contnet_padim.gaussian import StreamingGaussian  # noqa: PLC0415

        gaussian = StreamingGaussian()
    else:
        specification = importlib.util.spec_from_file_location("previous_gaussian", setting["source"])
        module = importlib.util.module_from_spec(specification)
        specification.loader.exec_module(module)
        gaussian = module.StreamingGaussian()
    built_rss = peak_rss_mb()
    generator = torch.Generator().manual_seed(0)
    update_seconds = 0.0
    for first in range(0, setting["images"], BATCH):
        embedding = torch.randn(min(BATCH, setting["images"] - first), 1536, 7, 7, generator=generator)
        start = time.perf_counter()
        gaussian.update(embedding)
        update_seconds += time.perf_counter() - start
    start = time.perf_counter()
    gaussian.fit()
    return {"built_rss_mb": built_rss, "update_s": update_seconds, "fit_s": time.perf_counter() - start}


def _fit_padim(setting: dict[str, Any]) -> dict[str, Any]:
    from anomalib.models import Padim  # noqa: PLC0415

    padim = Padim(backbone=setting["backbone"], pre_trained=False)
    padim.model.train()  # Padim's torch model appends to its memory bank only in training mode, as during fit
    built_rss = peak_rss_mb()
    generator = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    for first in range(0, setting["images"], BATCH):
        size = min(BATCH, setting["images"] - first)
        padim.model(torch.randn(size, 3, SIDE, SIDE, generator=generator))
    padim.fit()
    return {"built_rss_mb": built_rss, "seconds": time.perf_counter() - start}


def _throughput(setting: dict[str, Any]) -> dict[str, Any]:
    from anomalib_contnet import ConTNetPaDiMModel  # noqa: PLC0415

    model = ConTNetPaDiMModel(backbone=setting["backbone"], pre_trained=False).eval()
    generator = torch.Generator().manual_seed(0)
    backbone_seconds, step_seconds = [], []
    with torch.no_grad():
        for batch in _batches(setting["images"], generator, (3, SIDE, SIDE)):
            timings = interleaved_timings(
                {
                    "backbone": lambda batch=batch: model.extract_embedding(batch),
                    "step": lambda batch=batch: model.gaussian.update(model.extract_embedding(batch)),
                },
                rounds=1,
                warmup=0,
            )
            backbone_seconds += timings["backbone"]
            step_seconds += timings["step"]
        # The statistics saw every batch once through "step"; fit() turns them into the Gaussian.
        start = time.perf_counter()
        model.gaussian.fit()
        fit_seconds = time.perf_counter() - start
    return {"backbone_s": sum(backbone_seconds), "steps_s": sum(step_seconds), "fit_s": fit_seconds}


def child(setting: dict[str, Any]) -> None:
    apply_threads(setting.get("threads"))
    if setting["kind"] == "throughput":
        result = _throughput(setting)
    elif setting["kind"] == "gaussian":
        result = _fit_gaussian_alone(setting)
    elif setting["model"] == "padim":
        result = _fit_padim(setting)
    else:
        result = _fit_contnet_padim(setting)
    result["peak_rss_mb"] = peak_rss_mb()
    report_child_result(result)


def memory_settings(quick: bool) -> list[dict[str, Any]]:
    if quick:
        return [
            {"kind": "memory", "model": "contnet_padim", "backbone": "contnet_ti", "input": "embeddings", "images": n}
            for n in (16, 64)
        ] + [{"kind": "memory", "model": "padim", "backbone": "resnet18", "images": n} for n in (16, 64)]
    ours = [
        {"kind": "memory", "model": "contnet_padim", "backbone": "contnet_b", "input": kind, "images": n}
        for kind, n in (("embeddings", 50), ("embeddings", 1000), ("images", 50), ("images", 300))
    ]
    resnet = [{"kind": "memory", "model": "padim", "backbone": "resnet18", "images": n} for n in (50, 200, 400, 1000)]
    wide = [{"kind": "memory", "model": "padim", "backbone": "wide_resnet50_2", "images": n} for n in (8, 40)]
    return ours + resnet + wide


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="tiny settings (contnet_ti, resnet18) for a smoke run")
    parser.add_argument("--throughput-images", type=int, default=64, help="images for the throughput part")
    parser.add_argument("--skip-memory", action="store_true", help="only the throughput part")
    parser.add_argument("--previous-gaussian", type=Path, help="gaussian.py of an earlier version to compare with")
    add_threads_option(parser)
    args = parser.parse_args()
    if args.child:
        child(json.loads(args.child))
        return

    apply_threads(args.threads)
    print(machine_summary(), "\n")
    if not args.skip_memory:
        rows, results = [], {}
        for setting in memory_settings(args.quick):
            setting["threads"] = args.threads
            if setting["backbone"] == "wide_resnet50_2" and available_memory_gb() < WIDE_RESNET_NEEDS_GB:
                print(f"skipped {setting}: {available_memory_gb():.1f} GB available, needs {WIDE_RESNET_NEEDS_GB}")
                continue
            result = run_child(SCRIPT, setting)
            key = (setting["model"], setting["backbone"], setting.get("input", "images"), setting["images"])
            results[key] = result
            rows.append([*key, result["built_rss_mb"], result["peak_rss_mb"], result["seconds"]])
            print(markdown_table(["model", "backbone", "input", "N", "RSS built MB", "peak RSS MB", "s"], rows[-1:]))
        print("\n## Peak RSS of fitting (fresh process per row)\n")
        print(markdown_table(["model", "backbone", "input", "N", "RSS after build MB", "peak RSS MB", "s"], rows))
        print("\n## Ratios\n")
        print_memory_ratios(results)

    if args.previous_gaussian:
        compare_with_previous(args.previous_gaussian.resolve(), args.threads)

    backbone = "contnet_ti" if args.quick else "contnet_b"
    images = 16 if args.quick else args.throughput_images
    setting = {"kind": "throughput", "backbone": backbone, "images": images, "threads": args.threads}
    result = run_child(SCRIPT, setting)
    streaming = result["steps_s"] / result["backbone_s"]
    total = (result["steps_s"] + result["fit_s"]) / result["backbone_s"]
    per_image = result["backbone_s"] / images
    print(f"\n## Fit throughput, {backbone}, {images} random images, batch {BATCH} (same batches, interleaved)\n")
    print(
        markdown_table(
            ["backbone only img/s", "training steps img/s", "steps / backbone time", "fit() s", "all / backbone time"],
            [[images / result["backbone_s"], images / result["steps_s"], streaming, result["fit_s"], total]],
        )
    )
    fit_images = result["fit_s"] / per_image
    margin = 0.15 - (streaming - 1)
    break_even = f"from about {fit_images / margin:.0f} training images on" if margin > 0 else "for no N"
    print(
        f"\nfit() is a one-off cost worth {fit_images:.1f} images of backbone time. With this run's streaming "
        f"overhead of {100 * (streaming - 1):.1f} %, the whole fit stays within 15 % of the backbone time {break_even} "
        f"(time ratio = {streaming:.3f} + {fit_images:.1f} / N)."
    )


def compare_with_previous(previous: Path, threads: int | None) -> None:
    """Statistics alone, current class vs the one in ``previous``, at N=50 and N=1000 (fresh process per row)."""
    rows = []
    for source in ("current", str(previous)):
        for count in (50, 1000):
            setting = {"kind": "gaussian", "source": source, "images": count, "threads": threads}
            result = run_child(SCRIPT, setting)
            label = "current" if source == "current" else f"previous ({previous.name})"
            rows.append(
                [
                    label,
                    count,
                    result["built_rss_mb"],
                    result["peak_rss_mb"],
                    1e3 * result["update_s"] / count,
                    result["fit_s"],
                ]
            )
    print("\n## Gaussian statistics alone, 1536 dims, 7x7 positions, batch 8 (fresh process per row)\n")
    headers = ["version", "N", "RSS before MB", "peak RSS MB", "update ms/image", "fit() s"]
    print(markdown_table(headers, rows))


def print_memory_ratios(results: dict[tuple, dict[str, Any]]) -> None:
    """Print the growth ratios the performance targets are stated in, for whatever settings were run."""
    groups: dict[tuple[str, str, str], list[tuple[int, float]]] = {}
    for (model, backbone, input_kind, count), result in results.items():
        groups.setdefault((model, backbone, input_kind), []).append((count, result["peak_rss_mb"]))
    lines = []
    wide_at_300 = None
    for (model, backbone, input_kind), points in sorted(groups.items()):
        if len(points) < 2:
            continue
        (n0, p0), (n1, p1) = sorted(points)[0], sorted(points)[-1]
        slope = (p1 - p0) / (n1 - n0)
        line = f"{model} {backbone} ({input_kind}): peak N={n1} / N={n0} = {p1 / p0:.3f}, {slope:.2f} MB per image"
        if model == "padim":
            at_300 = p0 + slope * (300 - n0)
            line += f"; linear extrapolation to N=300: {at_300:,.0f} MB (extrapolated, not measured)"
            wide_at_300 = at_300 if backbone == "wide_resnet50_2" else wide_at_300
        lines.append(line)
    ours_at_300 = results.get(("contnet_padim", "contnet_b", "images", 300))
    if ours_at_300 and wide_at_300:
        ours_mb = ours_at_300["peak_rss_mb"]
        lines.append(
            f"ConTNetPaDiM contnet_b at N=300 ({ours_mb:,.0f} MB, measured) / Padim wide_resnet50_2 at N=300 "
            f"({wide_at_300:,.0f} MB, extrapolated) = {ours_mb / wide_at_300:.3f}"
        )
    print("\n".join(f"- {line}" for line in lines))


if __name__ == "__main__":
    main()
