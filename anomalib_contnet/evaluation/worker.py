"""The one fit-and-score path of the benchmark and the demo; a benchmark job runs it in a process of its own.

``python -m anomalib_contnet.evaluation.worker SPEC RESULT``: a process per job makes peak memory
that job's alone (its own ``getrusage``; in the parent it would report the larger of parent and child),
gives each job its own environment (``ANOMALIB_CONTNET_WEIGHTS`` for anomalib's models on ConTNet)
and lets a job that runs out of memory fail alone. The result is a JSON file: the metrics, or the error.

Metrics are computed on the raw scores with scikit-learn, not with anomalib's ``AUROC``: that is
torchmetrics' ``BinaryROC``, which applies a sigmoid to any score outside [0, 1]. Raw Mahalanobis or
nearest-neighbour distances are mostly above ~17, where the float32 sigmoid is exactly 1.0, so most
scores tie and the area collapses towards 0.5 (scores ``[20, 25, 30, 18, 22, 40]`` with labels
``[0, 0, 1, 0, 1, 1]`` give 0.5 instead of 0.889). AUPRO is anomalib's, which sorts raw scores as they are.
"""

from __future__ import annotations

import json
import resource
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from anomalib_contnet.atomic_files import write_text_atomically
from anomalib_contnet.warning_filters import install_warning_filters

__all__ = ["JobSpec", "auroc", "fit", "main", "run_job", "score"]


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
    keep_checkpoint: bool = False


def _build_model(spec: JobSpec) -> Any:  # an AnomalibModule; typed loosely to keep anomalib out of module import
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

    seed_everything(spec.seed, workers=True, verbose=False)  # random initialisation, channel subsets, coreset start
    model = _build_model(spec)
    batch = {"train_batch_size": 8, "eval_batch_size": 8}
    datamodule = MVTecAD(root=spec.dataset_root, category=spec.category, num_workers=0, **batch)
    datamodule.setup()
    # save_top_k=0 stands in for the Engine's own checkpoint callback: the caller writes the one checkpoint itself.
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


def auroc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Area under the ROC of raw ``scores`` (higher = more anomalous), ties as one threshold, in float64.

    Raises:
        ValueError: for one class only (scikit-learn only warns) or NaN scores.
    """
    from sklearn.metrics import roc_auc_score  # noqa: PLC0415

    labels = labels.reshape(-1).bool()
    if labels.all() or not labels.any():
        msg = f"the ROC needs normal and anomalous samples; got {int(labels.sum())} anomalous of {len(labels)}"
        raise ValueError(msg)
    return float(roc_auc_score(labels.numpy(), scores.reshape(-1).double().numpy()))


@torch.no_grad()
def score(model: Any, datamodule: Any, pixel_labels: bool) -> tuple[dict[str, torch.Tensor], dict[str, float | None]]:
    """Raw test scores straight from the torch model (before any post-processor) and their metrics.

    Images and masks go through the module's own pre-processor, as in its Lightning test step.
    """
    from anomalib.data import ImageBatch  # noqa: PLC0415
    from anomalib.metrics import AUPRO  # noqa: PLC0415

    model.eval()
    started = time.perf_counter()
    parts: dict[str, list[torch.Tensor]] = {"image_scores": [], "image_labels": [], "anomaly_maps": [], "masks": []}
    for batch in datamodule.test_dataloader():
        images, truth = model.pre_processor.transform(batch.image, batch.gt_mask)
        output = model.model(images)
        parts["anomaly_maps"].append(output.anomaly_map.reshape(len(images), *output.anomaly_map.shape[-2:]).float())
        parts["image_scores"].append(output.pred_score.reshape(-1).float())
        parts["image_labels"].append(batch.gt_label.reshape(-1).bool())
        parts["masks"].append(truth.reshape(parts["anomaly_maps"][-1].shape).bool())
    raw = {name: torch.cat(values) for name, values in parts.items()}
    metrics: dict[str, float | None] = {
        "predict_images_per_s": len(raw["image_scores"]) / (time.perf_counter() - started),
        "image_auroc": auroc(raw["image_scores"], raw["image_labels"]),
        "pixel_auroc": None,
        "aupro": None,
    }
    if pixel_labels:
        metrics["pixel_auroc"] = auroc(raw["anomaly_maps"], raw["masks"])
        aupro = AUPRO(fields=["anomaly_map", "gt_mask"], fpr_limit=0.3)  # MVTec AD's convention
        placeholder_images = torch.zeros(len(raw["masks"]), 3, 1, 1)  # AUPRO reads only the maps and masks
        aupro.update(ImageBatch(image=placeholder_images, anomaly_map=raw["anomaly_maps"], gt_mask=raw["masks"]))
        metrics["aupro"] = float(aupro.compute())
    return raw, metrics


def run_job(spec: JobSpec) -> dict[str, Any]:
    """Fit, checkpoint, predict and score one model on one category; a failure becomes ``status`` with its reason."""
    result: dict[str, Any] = {"status": "failed"}
    try:
        started = time.perf_counter()
        model, engine, datamodule = fit(spec)
        result["fit_s"] = time.perf_counter() - started
        checkpoint = Path(spec.work_dir) / "model.ckpt"
        engine.trainer.save_checkpoint(checkpoint, weights_only=False)  # all of it, said explicitly
        result["checkpoint_mb"] = checkpoint.stat().st_size / 2**20
        if not spec.keep_checkpoint:
            checkpoint.unlink()
        result |= score(model, datamodule, spec.pixel_labels)[1]
        result["status"] = "ok"
    except Exception as error:  # noqa: BLE001  (any failure becomes a table row, with its reason)
        result["status"] = f"failed: {type(error).__name__}: {error}"
        traceback.print_exc()
    return result


def main(argv: list[str] | None = None) -> int:
    """Read the spec, run the job, write the result with this process's peak memory; exit 0 when it succeeded."""
    spec_path, result_path = sys.argv[1:] if argv is None else argv
    install_warning_filters()
    result = run_job(JobSpec(**json.loads(Path(spec_path).read_text(encoding="utf-8"))))
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    write_text_atomically(Path(result_path), json.dumps(result, indent=1) + "\n")
    return 0 if result["status"] == "ok" else 1


if __name__ == "__main__":
    sys.exit(main())
