"""One benchmark job, run in a process of its own: ``python -m anomalib_contnet.evaluation.worker SPEC RESULT``.

A process per job is what makes the numbers honest: peak memory is that job's
alone (read from ``VmHWM``, the high-water mark of this process's own address
space; ``getrusage`` in the parent would report the larger of parent and child,
because Linux carries the parent's peak across fork and exec), the
environment is the job's own (``HF_HUB_CACHE`` of the converted EfficientNet
weights, in place before ``huggingface_hub`` is imported; ``ANOMALIB_CONTNET_WEIGHTS``,
the ConTNet checkpoint that anomalib's Padim and Patchcore load through timm),
and a job that runs out of memory takes down only itself.

The job fits the model through anomalib's ``Engine`` on the training split,
saves a checkpoint (timed and sized separately), predicts the test split with
the post-processor disabled, and scores the raw outputs (see
:mod:`anomalib_contnet.evaluation.metrics`). The result is a JSON file, written
atomically, with ``status`` ``"ok"`` or ``"failed"`` and the reason.
"""

from __future__ import annotations

import json
import resource
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from anomalib_contnet.atomic_files import write_text_atomically
from anomalib_contnet.warning_filters import install_warning_filters

__all__ = ["JobResult", "JobSpec", "main", "peak_rss_bytes"]


@dataclass(frozen=True)
class JobSpec:
    """Everything a job needs; written by the parent as ``spec.json``."""

    job_id: str
    family: str
    init_args: dict[str, Any]
    dataset_root: str
    category: str
    pixel_labels: bool
    work_dir: str
    image_size: int = 224
    crop_resize: int | None = None
    """Resize side before a centre crop to ``image_size`` (ConTNetPaDiM only), or None for a plain resize."""
    pixel_eval: str = "input"
    """``input``: pixel AUROC on the masks resized to ``image_size``; ``native``: on each mask at its own size."""
    seed: int = 0
    train_batch_size: int = 8
    eval_batch_size: int = 8
    keep_checkpoint: bool = False

    @classmethod
    def from_json(cls, text: str) -> JobSpec:
        """Parse ``spec.json``."""
        return cls(**json.loads(text))


@dataclass
class JobResult:
    """What a job measured; ``None`` where a value does not apply (pixel metrics without masks) or failed."""

    status: str = "failed"
    error: str | None = None
    image_auroc: float | None = None
    pixel_auroc: float | None = None
    aupro: float | None = None
    setup_s: float | None = None
    fit_s: float | None = None
    checkpoint_save_s: float | None = None
    predict_s: float | None = None
    predict_images_per_s: float | None = None
    n_predicted: int | None = None
    peak_rss_bytes: int | None = None
    checkpoint_bytes: int | None = None
    timings: dict[str, float] = field(default_factory=dict)


def peak_rss_bytes() -> int:
    """Peak resident memory of this process since exec (``VmHWM``); ``ru_maxrss`` where /proc is missing."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    maximum = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maximum if sys.platform == "darwin" else maximum * 1024  # macOS reports bytes, Linux kibibytes


def build_model(spec: JobSpec) -> Any:  # an AnomalibModule; typed loosely to keep anomalib out of module import
    """Construct the model with raw outputs: no post-processor, evaluator or visualizer."""
    from anomalib.models import Padim, Patchcore  # noqa: PLC0415  (imported after the environment is final)

    from anomalib_contnet import ConTNetPaDiM  # noqa: PLC0415

    raw_outputs = {"post_processor": False, "evaluator": False, "visualizer": False}
    size = (spec.image_size, spec.image_size)
    if spec.family == "contnet_padim":
        # ConTNetPaDiM's own pre-processor normalises with the backbone's training statistics.
        model = ConTNetPaDiM(**spec.init_args, image_size=size, **raw_outputs)
        if spec.crop_resize is not None:
            model.pre_processor = _centre_crop_pre_processor(spec.crop_resize, size, model)
        return model
    if spec.crop_resize is not None:
        msg = "the centre-crop choice is implemented for ConTNetPaDiM only"
        raise ValueError(msg)
    families = {"padim": Padim, "patchcore": Patchcore}
    if spec.family not in families:
        msg = f"unknown model family {spec.family!r}; expected contnet_padim, padim or patchcore"
        raise ValueError(msg)
    model_class = families[spec.family]
    # Same input for every model: resize to image_size, no centre crop (a crop would cut defects off the masks).
    pre_processor = model_class.configure_pre_processor(image_size=size)
    return model_class(**spec.init_args, pre_processor=pre_processor, **raw_outputs)


def _centre_crop_pre_processor(resize_side: int, size: tuple[int, int], model: Any) -> Any:
    """Resize to ``resize_side``, cut the central ``size``, normalise like the backbone; masks follow the image.

    Replaces the model's pre-processor before ``Engine.fit``, which collects it as a callback then,
    so the crop applies to training, prediction and the masks the pixel metrics read.
    """
    from anomalib.pre_processing import PreProcessor  # noqa: PLC0415
    from torchvision.transforms.v2 import CenterCrop, Compose, Normalize  # noqa: PLC0415

    from anomalib_contnet.models.contnet_padim.pre_processor import AntialiasedResize  # noqa: PLC0415

    mean, std = model.model.feature_extractor.normalization
    transform = Compose(
        [
            AntialiasedResize((resize_side, resize_side)),  # the resize of ConTNetPaDiM's own pre-processor
            CenterCrop(size),
            Normalize(mean=list(mean), std=list(std)),
        ]
    )
    return PreProcessor(transform=transform)


def run_job(spec: JobSpec) -> JobResult:
    """Fit, checkpoint, predict and score one model on one category; never raises for job failures."""
    result = JobResult()
    try:
        _run(spec, result)
        result.status = "ok"
    except Exception as error:  # noqa: BLE001  (any failure becomes a table row, with its reason)
        result.error = f"{type(error).__name__}: {error}"
        traceback.print_exc()
    result.peak_rss_bytes = peak_rss_bytes()
    return result


def _run(spec: JobSpec, result: JobResult) -> None:
    started = time.perf_counter()
    from anomalib.callbacks import ModelCheckpoint  # noqa: PLC0415
    from anomalib.data import MVTecAD  # noqa: PLC0415
    from anomalib.engine import Engine  # noqa: PLC0415
    from lightning.pytorch import seed_everything  # noqa: PLC0415

    from anomalib_contnet.evaluation.metrics import (  # noqa: PLC0415
        collect_raw_scores,
        localisation_aupro,
        native_size_pixel_roc,
        roc_curve,
    )

    seed_everything(spec.seed, workers=True)  # random initialisation, channel subsets and coreset start
    model = build_model(spec)
    datamodule = MVTecAD(
        root=spec.dataset_root,
        category=spec.category,
        train_batch_size=spec.train_batch_size,
        eval_batch_size=spec.eval_batch_size,
        num_workers=0,
    )
    datamodule.setup()
    work_dir = Path(spec.work_dir)
    # save_top_k=0 stands in for the Engine's own checkpoint callback so fitting writes nothing:
    # the checkpoint is written (and timed) separately below.
    engine = Engine(
        default_root_dir=work_dir / "engine",
        callbacks=[ModelCheckpoint(dirpath=work_dir / "engine", save_top_k=0)],
        enable_progress_bar=False,
        logger=False,
    )
    result.setup_s = time.perf_counter() - started

    started = time.perf_counter()
    # Training images only: without a validation loader nothing is predicted during fit.
    engine.fit(model=model, train_dataloaders=datamodule.train_dataloader())
    result.fit_s = time.perf_counter() - started

    checkpoint = work_dir / "model.ckpt"
    started = time.perf_counter()
    engine.trainer.save_checkpoint(checkpoint)
    result.checkpoint_save_s = time.perf_counter() - started
    result.checkpoint_bytes = checkpoint.stat().st_size
    if not spec.keep_checkpoint:
        checkpoint.unlink()

    started = time.perf_counter()
    predictions = engine.predict(model=model, dataloaders=datamodule.test_dataloader(), return_predictions=True)
    result.predict_s = time.perf_counter() - started
    scores = collect_raw_scores(predictions or [])
    result.n_predicted = int(scores.image_scores.numel())
    result.predict_images_per_s = result.n_predicted / result.predict_s

    started = time.perf_counter()
    result.image_auroc = roc_curve(scores.image_scores, scores.image_labels).auc
    if spec.pixel_labels and scores.masks is not None:
        if spec.pixel_eval not in {"input", "native"}:
            msg = f"pixel_eval must be 'input' or 'native', got {spec.pixel_eval!r}"
            raise ValueError(msg)
        if spec.pixel_eval == "native":
            result.pixel_auroc = native_size_pixel_roc(scores).auc
        else:
            result.pixel_auroc = roc_curve(scores.anomaly_maps, scores.masks).auc
        result.aupro = localisation_aupro(scores.anomaly_maps, scores.masks)
    result.timings["metrics_s"] = time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    """Read the spec, run the job, write the result; exit 0 when the job succeeded."""
    arguments = sys.argv[1:] if argv is None else argv
    if len(arguments) != 2:
        print("usage: python -m anomalib_contnet.evaluation.worker SPEC.json RESULT.json", file=sys.stderr)
        return 2
    install_warning_filters()
    spec = JobSpec.from_json(Path(arguments[0]).read_text(encoding="utf-8"))
    result = run_job(spec)
    write_text_atomically(Path(arguments[1]), json.dumps(asdict(result), indent=1) + "\n")
    return 0 if result.status == "ok" else 1


if __name__ == "__main__":
    sys.exit(main())
