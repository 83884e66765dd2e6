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

``--engine`` measures instead whole ``Engine().fit`` runs at 448 px (196 patch
positions) on an anomalib ``Folder`` of generated PNG files (written once under
``--data``), batches of 20, no loader workers: contnet_ti at N = 40 and 1000,
contnet_b at N = 400 and 1000 (``--only contnet_ti`` for the first two), with the
peak RSS before the Gaussians' ``fit()`` and overall, and the ratios against the
targets of issue "fit memory at 448 px".

The package is imported only in the children, so ``PYTHONPATH`` chooses the tree
measured. Run from the repository root (about 30 minutes; ``--quick`` for a smoke run)::

    OMP_NUM_THREADS=1 python benchmarks/fit_memory.py --threads 1
    python benchmarks/fit_memory.py --engine --data /tmp/fit_memory_data   # about 1 hour on 2 cores
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
ENGINE_SIDE, ENGINE_BATCH = 448, 20
ENGINE_SETTINGS = [("contnet_ti", 40), ("contnet_ti", 1000), ("contnet_b", 400), ("contnet_b", 1000)]
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


def write_images(root: Path, count: int) -> Path:
    """``count`` smooth random 448 px PNG files in ``root/good`` (kept between runs), and a small test split."""
    import numpy as np  # noqa: PLC0415
    from PIL import Image  # noqa: PLC0415

    rng = np.random.default_rng(0)
    for folder, images in (("good", count), ("test_good", 4), ("test_bad", 4)):
        (root / folder).mkdir(parents=True, exist_ok=True)
        for index in range(images):
            path = root / folder / f"{index:05d}.png"
            if not path.exists():  # coarse noise upsampled: textured, yet small files
                coarse = rng.integers(0, 256, (ENGINE_SIDE // 8, ENGINE_SIDE // 8, 3), dtype=np.uint8)
                Image.fromarray(coarse).resize((ENGINE_SIDE, ENGINE_SIDE), Image.BILINEAR).save(path)
    return root


def _fit_engine(setting: dict[str, Any]) -> dict[str, float]:
    """``Engine().fit`` on ``setting["images"]`` images: peak RSS before the Gaussians' ``fit()``, and after."""
    import tempfile  # noqa: PLC0415

    from anomalib.data import Folder  # noqa: PLC0415
    from anomalib.engine import Engine  # noqa: PLC0415
    from lightning.pytorch import Callback  # noqa: PLC0415

    from anomalib_contnet import ConTNetPaDiM  # noqa: PLC0415

    class StreamingPeak(Callback):  # callbacks' hooks run before the model's, which fits the Gaussians
        streaming_peak = 0.0

        def on_validation_start(self, *_: object) -> None:
            self.streaming_peak = self.streaming_peak or peak_rss_mb()

        on_train_epoch_end = on_validation_start

    with tempfile.TemporaryDirectory() as work:
        train = Path(work) / "train"
        train.mkdir()
        for image in sorted((Path(setting["data"]) / "good").iterdir())[: setting["images"]]:
            (train / image.name).symlink_to(image)
        data = Folder(
            name="fit_memory", root=setting["data"], normal_dir=train, normal_test_dir="test_good",
            abnormal_dir="test_bad", train_batch_size=ENGINE_BATCH, eval_batch_size=ENGINE_BATCH, num_workers=0,
        )  # fmt: skip
        model = ConTNetPaDiM(backbone=setting["backbone"], pre_trained=False, image_size=(ENGINE_SIDE, ENGINE_SIDE))
        built_rss, callback = peak_rss_mb(), StreamingPeak()
        engine = Engine(default_root_dir=work, logger=False, enable_progress_bar=False, callbacks=[callback])
        engine.fit(model=model, datamodule=data)
    return {"built_rss_mb": built_rss, "streaming_peak_mb": callback.streaming_peak, "peak_rss_mb": peak_rss_mb()}


def engine_main(args: argparse.Namespace) -> None:
    """The ``--engine`` table: one fresh child per setting, then the ratios against the issue's targets."""
    settings_ = [(backbone, n) for backbone, n in ENGINE_SETTINGS if args.only in (None, backbone)]
    data = write_images(Path(args.data), max(n for _, n in settings_))
    print(machine_summary(), "\n")
    rows, peaks = [], {}
    for backbone, count in settings_:
        setting = {"model": "engine", "backbone": backbone, "images": count, "data": str(data), "threads": args.threads}
        result = run_child(SCRIPT, setting)
        peaks[backbone, count] = result["peak_rss_mb"]
        rows.append([backbone, count, result["built_rss_mb"], result["streaming_peak_mb"], result["peak_rss_mb"]])
        print(rows[-1], flush=True)
    print(f"\n## Peak RSS of Engine().fit at {ENGINE_SIDE} px, batches of {ENGINE_BATCH} (fresh process per row)\n")
    print(markdown_table(["backbone", "N", "RSS after build MB", "peak before fit() MB", "peak RSS MB"], rows))
    if ("contnet_ti", 40) in peaks and ("contnet_ti", 1000) in peaks:
        bound = (peaks["contnet_ti", 40] + 520) * 1.1
        print(f"- contnet_ti N=1000 / ((N=40 + 520 MB) x 1.1) = {peaks['contnet_ti', 1000] / bound:.3f} (target <= 1)")
    for count in (400, 1000):
        if ("contnet_b", count) in peaks:
            print(f"- contnet_b N={count} / 12 GB = {peaks['contnet_b', count] / 12000:.3f} (target < 1)")


def child(setting: dict[str, Any]) -> None:
    apply_threads(setting.get("threads"))
    if setting["model"] == "engine":
        report_child_result(_fit_engine(setting))
        return
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
    parser.add_argument("--engine", action="store_true", help="Engine().fit at 448 px on PNG files instead")
    parser.add_argument("--data", default="/tmp/fit_memory_data", help="where --engine writes its PNG files")
    parser.add_argument("--only", choices=["contnet_ti", "contnet_b"], help="--engine rows of one backbone only")
    add_threads_option(parser)
    args = parser.parse_args()
    if args.child:
        child(json.loads(args.child))
        return
    if args.engine:
        engine_main(args)
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
