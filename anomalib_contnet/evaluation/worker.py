"""The one fit-and-score path of the benchmark and the demo; a benchmark job runs it in a process of its own.

``python -m anomalib_contnet.evaluation.worker SPEC RESULT``: a process per job makes peak memory
that job's alone (``VmHWM`` of this process; ``getrusage`` in the parent would report the larger of
parent and child, since Linux carries the parent's peak across fork and exec), gives each job its own
environment (``ANOMALIB_CONTNET_WEIGHTS`` for anomalib's models on ConTNet) and lets a job that runs
out of memory fail alone. The result is a JSON file with ``status`` ``"ok"`` or ``"failed"`` and the reason.
"""

from __future__ import annotations

import json
import resource
import sys
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from anomalib_contnet.atomic_files import write_text_atomically
from anomalib_contnet.warning_filters import install_warning_filters

__all__ = ["JobResult", "JobSpec", "fit", "main", "score"]


@dataclass(frozen=True)
class JobSpec:
    """Everything a job needs; written by the parent as ``spec.json``."""

    job_id: str
    family: str
    """``contnet_padim``, ``padim``, ``patchcore`` or ``mhpatchcore``."""
    init_args: dict[str, Any]
    dataset_root: str
    category: str
    pixel_labels: bool
    work_dir: str
    image_size: int = 224
    seed: int = 0
    backbone_file: str | None = None
    """Weights loaded strictly into an anomalib model's timm feature extractor after it is built."""
    post_processing: bool = False
    """Keep anomalib's post-processor (the demo's export needs its thresholds); metrics stay on raw scores."""
    batch_size: int = 8
    keep_checkpoint: bool = False


@dataclass
class JobResult:
    """What a job measured; ``None`` where a value does not apply (pixel metrics without masks) or failed."""

    status: str = "failed"
    error: str | None = None
    image_auroc: float | None = None
    pixel_auroc: float | None = None
    aupro: float | None = None
    fit_s: float | None = None
    predict_images_per_s: float | None = None
    peak_rss_bytes: int | None = None
    checkpoint_bytes: int | None = None


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
    """The model, without evaluator and visualizer (and without post-processor unless asked)."""
    from anomalib.models import MHPatchcore, Padim, Patchcore  # noqa: PLC0415  (after the environment is final)

    from anomalib_contnet import ConTNetPaDiM  # noqa: PLC0415

    options = {"post_processor": spec.post_processing, "evaluator": False, "visualizer": False}
    size = (spec.image_size, spec.image_size)
    if spec.family == "contnet_padim":
        return ConTNetPaDiM(**spec.init_args, image_size=size, **options)
    model_class = {"padim": Padim, "patchcore": Patchcore, "mhpatchcore": MHPatchcore}[spec.family]
    # Same input for every model: resize to image_size and ImageNet normalisation (Padim's pre-processor), no
    # centre crop (a crop would cut defects off the masks; MHPatchcore's own crops to 224 px).
    model = model_class(**spec.init_args, pre_processor=Padim.configure_pre_processor(image_size=size), **options)
    if spec.backbone_file is not None:
        from safetensors.torch import load_file  # noqa: PLC0415

        model.model.feature_extractor.feature_extractor.load_state_dict(load_file(spec.backbone_file), strict=True)
    return model


def fit(spec: JobSpec) -> tuple[Any, Any, Any]:
    """Seed, build and fit the model through anomalib's ``Engine``; return ``(model, engine, datamodule)``."""
    from anomalib.callbacks import ModelCheckpoint  # noqa: PLC0415
    from anomalib.data import MVTecAD  # noqa: PLC0415
    from anomalib.engine import Engine  # noqa: PLC0415
    from lightning.pytorch import seed_everything  # noqa: PLC0415

    seed_everything(spec.seed, workers=True)  # random initialisation, channel subsets and coreset start
    model = build_model(spec)
    datamodule = MVTecAD(
        root=spec.dataset_root,
        category=spec.category,
        train_batch_size=spec.batch_size,
        eval_batch_size=spec.batch_size,
        num_workers=0,
    )
    datamodule.setup()
    # save_top_k=0 stands in for the Engine's checkpoint callback, whose file would land in a versioned run
    # folder: the caller writes the one checkpoint itself.
    work_dir = Path(spec.work_dir) / "engine"
    engine = Engine(
        default_root_dir=work_dir,
        callbacks=[ModelCheckpoint(dirpath=work_dir, save_top_k=0)],
        enable_progress_bar=False,
        enable_model_summary=False,
        logger=False,
    )
    if spec.post_processing:  # the validation pass is where the post-processor learns its thresholds
        engine.fit(model=model, datamodule=datamodule)
    else:  # training images only: nothing else is predicted during the fit
        engine.fit(model=model, train_dataloaders=datamodule.train_dataloader())
    return model, engine, datamodule


def score(model: Any, datamodule: Any, pixel_labels: bool) -> tuple[Any, dict[str, float | None]]:
    """Raw scores of the test split and their image AUROC, pixel AUROC and AUPRO (see :mod:`.metrics`)."""
    from anomalib_contnet.evaluation.metrics import localisation_aupro, raw_test_scores, roc_curve  # noqa: PLC0415

    started = time.perf_counter()
    scores = raw_test_scores(model, datamodule.test_dataloader())
    metrics: dict[str, float | None] = {
        "predict_images_per_s": scores.image_scores.numel() / (time.perf_counter() - started),
        "image_auroc": roc_curve(scores.image_scores, scores.image_labels).auc,
        "pixel_auroc": None,
        "aupro": None,
    }
    if pixel_labels:
        metrics["pixel_auroc"] = roc_curve(scores.anomaly_maps, scores.masks).auc
        metrics["aupro"] = localisation_aupro(scores.anomaly_maps, scores.masks)
    return scores, metrics


def run_job(spec: JobSpec) -> JobResult:
    """Fit, checkpoint, predict and score one model on one category; never raises for job failures."""
    result = JobResult()
    try:
        started = time.perf_counter()
        model, engine, datamodule = fit(spec)
        result.fit_s = time.perf_counter() - started
        checkpoint = Path(spec.work_dir) / "model.ckpt"
        engine.trainer.save_checkpoint(checkpoint, weights_only=False)  # all of it, said explicitly
        result.checkpoint_bytes = checkpoint.stat().st_size
        if not spec.keep_checkpoint:
            checkpoint.unlink()
        _, metrics = score(model, datamodule, spec.pixel_labels)
        for name, value in metrics.items():
            setattr(result, name, value)
        result.status = "ok"
    except Exception as error:  # noqa: BLE001  (any failure becomes a table row, with its reason)
        result.error = f"{type(error).__name__}: {error}"
        traceback.print_exc()
    result.peak_rss_bytes = peak_rss_bytes()
    return result


def main(argv: list[str] | None = None) -> int:
    """Read the spec, run the job, write the result; exit 0 when the job succeeded."""
    arguments = sys.argv[1:] if argv is None else argv
    if len(arguments) != 2:
        print("usage: python -m anomalib_contnet.evaluation.worker SPEC.json RESULT.json", file=sys.stderr)
        return 2
    install_warning_filters()
    spec = JobSpec(**json.loads(Path(arguments[0]).read_text(encoding="utf-8")))
    result = run_job(spec)
    write_text_atomically(Path(arguments[1]), json.dumps(asdict(result), indent=1) + "\n")
    return 0 if result.status == "ok" else 1


if __name__ == "__main__":
    sys.exit(main())
