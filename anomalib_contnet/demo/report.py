"""The demo's ``report.md``: what ran, on which weights and data, what it measured, and how to go further."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # annotations only; the pipeline imports this module
    from anomalib_contnet.demo.pipeline import BackboneChoice, DemoOptions
    from anomalib_contnet.evaluation.subsets import CategorySubset

__all__ = ["render_report"]


def render_report(
    *,
    options: DemoOptions,
    choice: BackboneChoice,
    subset: CategorySubset,
    metrics: dict[str, Any],
    timings: list[tuple[str, float]],
    model_xml: Path,
    checkpoint: Path,
    contnet_help: str,
    created: datetime,
) -> str:
    """Assemble the markdown report (paths relative to the report's folder)."""
    raw = metrics["raw"]
    lines = [
        "# anomalib-contnet demo",
        "",
        f"Created {created.strftime('%Y-%m-%d %H:%M UTC')}. Model: **ConTNetPaDiM** (Dini & Rahtu 2023: frozen "
        "backbone features, one Gaussian per patch position, Mahalanobis distance as the anomaly map).",
        "",
        "## Backbone and weights",
        "",
        f"- Backbone: `{choice.config.backbone}`, layers `{', '.join(choice.config.layers)}`",
        f"- Weights: **{choice.weights_label}**",
        f"- Why: {choice.reason}.",
        "",
        *_weights_explanation(choice, contnet_help),
        "",
        "## Data",
        "",
        f"Category `{subset.category}` from `{subset.source}`: {subset.n_train} training images (normal only), "
        f"{subset.n_test_normal} normal and {subset.n_test_anomalous} anomalous test images, picked by seed "
        f"{options.seed} and copied to `data/{subset.category}`. Inputs are resized to "
        f"{options.image_size}x{options.image_size} px.",
        "",
        *_data_explanation(subset),
        "",
        "## Results",
        "",
        "Detection and localisation on the raw scores the model computes (no normalisation, no threshold):",
        "",
        "| Image AUROC | Pixel AUROC | AUPRO (FPR <= 0.3) |",
        "|---|---|---|",
        f"| {_number(raw['image_auroc'])} | {_number(raw['pixel_auroc'])} | {_number(raw['aupro'])} |",
        "",
        "![ROC curves](roc.png)",
        "",
        "anomalib's `Engine.test` on the same images (its default post-processor normalises the scores to [0, 1] "
        "and learns the image and pixel thresholds on the validation pass, which for MVTec AD-layout data is the "
        "test set itself, so F1 scores are optimistic):",
        "",
        "| Metric | Value |",
        "|---|---|",
        *[f"| {name} | {value:.3f} |" for name, value in sorted(metrics["anomalib_engine_test"].items())],
        "",
        "## Exported model (OpenVINO)",
        "",
        "The trained model was exported with `anomalib_contnet.deploy.export_model` (anomalib's `Engine.export`: "
        f"pre-processing, model and post-processing in one graph) to `{model_xml}`, checked with `check_export`, "
        "and run with anomalib's `OpenVINOInferencer` (float32 precision hint) on "
        f"{len(metrics['samples'])} test images, {metrics['openvino_ms_per_image']:.0f} ms per image on this "
        "machine. Columns: the image, the true defect mask, the normalised anomaly map over the image, and the "
        "predicted mask (red; the true defect outlined in green).",
        "",
        "![Predictions](predictions.png)",
        "",
        "| Image | Score (normalised) | Predicted |",
        "|---|---|---|",
        *[
            f"| `{sample['image']}` | {sample['score']:.3f} | {'anomalous' if sample['anomalous'] else 'normal'} |"
            for sample in metrics["samples"]
        ],
        "",
        "## Steps and timings",
        "",
        "| Step | Seconds |",
        "|---|---|",
        *[f"| {title} | {seconds:.1f} |" for title, seconds in timings],
        "",
        "## Files",
        "",
        "- `report.md` (this file), `metrics.json` (all numbers), `roc.png`, `predictions.png`",
        f"- `{model_xml}`, `{model_xml.with_suffix('.bin')}` and the export manifest next to them: the OpenVINO model",
        f"- `{checkpoint}`: the Lightning checkpoint (`ConTNetPaDiM.load_from_checkpoint`)",
        f"- `data/{subset.category}`: the exact images used",
        "",
        "For a side-by-side comparison with anomalib's Padim and Patchcore, see `docs/benchmarks.md` "
        "(`anomalib-contnet benchmark --help`).",
    ]
    return "\n".join(lines) + "\n"


def _weights_explanation(choice: BackboneChoice, contnet_help: str) -> list[str]:
    if choice.untrained:
        return [
            "**The features are untrained (random initialisation).** These results show that the pipeline runs "
            "end to end; they say nothing about how well ConTNet-B features detect anomalies, which is the paper's "
            "claim. The method needs the ImageNet weights.",
            "",
            "```",
            contnet_help,
            "```",
        ]
    if choice.config.backbone != "contnet_b":
        return [
            "This is not the paper's backbone: the results show what the ConTNetPaDiM method does with real "
            "ImageNet features from a compact CNN. The ConTNet-B weights (the paper's setting) could not be used "
            "because they are not on this machine and cannot be downloaded offline. Running ConTNet-B untrained "
            "instead would have produced features without any ImageNet knowledge (`--backbone contnet_b "
            "--random-init` shows that).",
            "",
            "```",
            contnet_help,
            "```",
        ]
    return ["These are the paper's backbone and weights."]


def _data_explanation(subset: CategorySubset) -> list[str]:
    if not subset.pixel_labels:
        return [
            "This category has image labels only (its masks cover whole images), so pixel metrics are not reported."
        ]
    if subset.category in ("brick", "grass", "gravel"):
        return [
            "The normal images are crops of a real photograph that ships with scikit-image; the defects "
            "(scratches, stains, spot clusters) were drawn by `anomalib-contnet data prepare textures`, which "
            "records exactly which pixels it altered, so the ground-truth masks are exact. The defects are "
            "stronger than most real ones: treat the numbers as a working check, not as an MVTec AD result."
        ]
    return ["Pixel metrics use the category's ground-truth masks."]


def _number(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"
