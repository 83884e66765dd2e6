"""Fit memory against the number of training images: ConTNetPaDiM's streaming Gaussian against anomalib's Padim.

Every setting runs in a fresh child process that builds the model, feeds it
synthetic tensors (no data loading, no Lightning), fits, and reports its own
peak resident set size. ConTNetPaDiM gets one of two inputs:

- ``images``: random 224x224 images through the backbone and the statistics,
  what ``training_step`` does;
- ``embeddings``: random embeddings of the model's real shape handed straight to
  the statistics (the backbone is built, so its weights count, but not run),
  which makes 1,000 images affordable on a small CPU.

Padim keeps every training embedding until ``fit`` and grows linearly: resnet18
over several sizes, wide_resnet50_2 at two small sizes only (it needs about 16 GB
even then), extrapolated linearly to N=300 and marked as extrapolated.

The package is imported only in the children, so ``PYTHONPATH`` chooses the tree
measured. Run from the repository root (about 30 minutes; ``--quick`` for a smoke run)::

    OMP_NUM_THREADS=1 python benchmarks/fit_memory.py --threads 1
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch
from _common import (
    add_threads_option,
    apply_threads,
    available_memory_gb,
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
"""Free memory a Padim wide_resnet50_2 fit at 224 px needs: 15.6 GB peak RSS was measured at N=8."""


def _batch_sizes(images: int) -> list[int]:
    return [min(BATCH, images - first) for first in range(0, images, BATCH)]


def _fit_contnet_padim(setting: dict[str, Any], generator: torch.Generator) -> float:
    """Fit on ``setting["images"]`` random inputs; return the peak RSS before fitting (the built model)."""
    from anomalib_contnet import ConTNetPaDiMModel  # noqa: PLC0415  (children import only what they run)

    model = ConTNetPaDiMModel(backbone=setting["backbone"], pre_trained=False).eval()
    built_rss = peak_rss_mb()
    grid = SIDE // 32
    with torch.no_grad():
        for size in _batch_sizes(setting["images"]):
            if setting["input"] == "images":
                embedding = model.extract_embedding(torch.randn(size, 3, SIDE, SIDE, generator=generator))
            else:
                embedding = torch.randn(size, model.feature_index.numel(), grid, grid, generator=generator)
            model.gaussian.update(embedding)
        model.gaussian.fit()
    return built_rss


def _fit_padim(setting: dict[str, Any], generator: torch.Generator) -> float:
    """Fit anomalib's Padim on ``setting["images"]`` random images; return the peak RSS before fitting."""
    from anomalib.models import Padim  # noqa: PLC0415

    padim = Padim(backbone=setting["backbone"], pre_trained=False)
    padim.model.train()  # Padim's torch model appends to its memory bank only in training mode, as during fit
    built_rss = peak_rss_mb()
    for size in _batch_sizes(setting["images"]):
        padim.model(torch.randn(size, 3, SIDE, SIDE, generator=generator))
    padim.fit()
    return built_rss


def child(setting: dict[str, Any]) -> None:
    apply_threads(setting.get("threads"))
    fit = _fit_padim if setting["model"] == "padim" else _fit_contnet_padim
    built_rss = fit(setting, torch.Generator().manual_seed(0))
    report_child_result({"built_rss_mb": built_rss, "peak_rss_mb": peak_rss_mb()})


def settings(quick: bool) -> list[dict[str, Any]]:
    """The rows of the table: ConTNetPaDiM at small and large N, Padim over a range of N."""
    if quick:
        ours = [("contnet_ti", "embeddings", n) for n in (16, 64)]
        padim = [("resnet18", n) for n in (16, 64)]
    else:
        ours = [("contnet_b", kind, n) for kind, n in (("embeddings", 50), ("embeddings", 1000))]
        ours += [("contnet_b", "images", n) for n in (50, 300)]
        padim = [("resnet18", n) for n in (50, 200, 400, 1000)] + [("wide_resnet50_2", n) for n in (8, 40)]
    return [
        {"model": "contnet_padim", "backbone": backbone, "input": kind, "images": n} for backbone, kind, n in ours
    ] + [{"model": "padim", "backbone": backbone, "input": "images", "images": n} for backbone, n in padim]


def growth_lines(rows: list[list]) -> list[str]:
    """Peak at the largest N over the smallest, per model, backbone and input; Padim extrapolated to N=300."""
    groups: dict[tuple[str, str, str], list[tuple[int, float]]] = {}
    for model, backbone, kind, count, _, peak in rows:
        groups.setdefault((model, backbone, kind), []).append((count, peak))
    lines, padim_at_300 = [], {}
    for (model, backbone, kind), points in sorted(groups.items()):
        if len(points) < 2:
            continue
        (n0, p0), (n1, p1) = min(points), max(points)
        slope = (p1 - p0) / (n1 - n0)
        line = f"{model} {backbone} ({kind}): peak N={n1} / N={n0} = {p1 / p0:.3f}, {slope:.2f} MB per image"
        if model == "padim":
            padim_at_300[backbone] = p0 + slope * (300 - n0)
            line += f"; linear extrapolation to N=300: {padim_at_300[backbone]:,.0f} MB (not measured)"
        lines.append(line)
    ours = [row[-1] for row in rows if row[1:4] == ["contnet_b", "images", 300]]
    if ours and "wide_resnet50_2" in padim_at_300:
        ratio = ours[0] / padim_at_300["wide_resnet50_2"]
        lines.append(f"ConTNetPaDiM contnet_b at N=300 (measured) / Padim wide_resnet50_2 (extrapolated) = {ratio:.3f}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="tiny settings (contnet_ti, resnet18) for a smoke run")
    add_threads_option(parser)
    args = parser.parse_args()
    if args.child:
        child(json.loads(args.child))
        return
    apply_threads(args.threads)
    print(machine_summary(), "\n")
    rows = []
    for setting in settings(args.quick):
        if setting["backbone"] == "wide_resnet50_2" and available_memory_gb() < WIDE_RESNET_NEEDS_GB:
            print(f"skipped {setting}: {available_memory_gb():.1f} GB available, needs {WIDE_RESNET_NEEDS_GB}")
            continue
        result = run_child(SCRIPT, setting | {"threads": args.threads})
        rows.append([*setting.values(), result["built_rss_mb"], result["peak_rss_mb"]])
        print(rows[-1], flush=True)
    print("\n## Peak RSS of fitting (fresh process per row)\n")
    print(markdown_table(["model", "backbone", "input", "N", "RSS after build MB", "peak RSS MB"], rows))
    print("\n" + "\n".join(f"- {line}" for line in growth_lines(rows)))


if __name__ == "__main__":
    main()
