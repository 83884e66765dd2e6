"""The Gaussian head's levers one at a time: image AUROC, pixel AUROC and AUPRO per category and N.

Reads the training draws and the test set that ``anomalib-contnet benchmark --few-shot`` wrote
under ``<out>/data/n<N>_s<seed>/<category>`` (so the cells are those of the few-shot table) and
runs, per draw, the real ``ConTNetPaDiM`` pipeline on the offline ImageNet EfficientNet-Lite0:
its pre-processor, ``extract_embedding`` -> ``StreamingGaussian.update`` / ``fit``, and the
torch model's forward, scored by the benchmark worker's own metrics. Lightning's loop is left
out: it adds seconds per fit and nothing to the scores. Settings: the paper's head,
each lever alone on the paper's head, the preset (``contnet_padim_best``) and the preset with a lever it leaves out.

Run from the repository root after the few-shot benchmark (about 15 minutes on 1 core)::

    python benchmarks/gaussian_head.py --subsets results/few-shot/data --categories elpv_mono,brick,grass \
        --counts 1,4,16,0 --seeds 0,1,2 --image-size 128 --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import warnings
from pathlib import Path

import torch
from _common import add_threads_option, apply_threads, machine_summary, markdown_table

from anomalib_contnet import ConTNetPaDiM
from anomalib_contnet.evaluation.configs import MODEL_CONFIGS
from anomalib_contnet.evaluation.worker import score
from anomalib_contnet.pretrained import offline_efficientnet_lite0

PAPER = MODEL_CONFIGS["contnet_padim_efficientnet_lite0"]
BEST = MODEL_CONFIGS["contnet_padim_best_efficientnet_lite0"]
METRICS = ("image_auroc", "pixel_auroc", "aupro")


def settings() -> dict[str, dict]:
    """Constructor arguments of every compared head, by row name: each lever alone, then the preset's combination."""
    paper, finer = {"layers": PAPER.layers}, {"layers": BEST.layers}
    return {
        "paper head": paper,
        "stages one octave finer (blocks.2+4)": finer,
        "shift_tolerance 1": paper | {"shift_tolerance": 1},
        "neighbourhood 1": paper | {"neighbourhood": 1},
        "patch_context 1": paper | {"patch_context": 1},
        "shared_covariance": paper | {"shared_covariance": True},
        "preset (contnet_padim_best)": finer | BEST.options,
        "preset + shift_tolerance 1": finer | BEST.options | {"shift_tolerance": 1},
    }


@torch.no_grad()
def run_cell(arguments: dict, folder: Path, category: str, image_size: int, weights: str) -> dict[str, float | None]:
    """Fit one head on one draw and score the shared test set."""
    from anomalib.data import MVTecAD  # noqa: PLC0415

    model = ConTNetPaDiM(backbone="efficientnet_lite0", weights=weights, image_size=(image_size,) * 2, **arguments)
    model.model.feature_extractor.load_pretrained(weights)
    datamodule = MVTecAD(root=folder, category=category, num_workers=0, train_batch_size=8, eval_batch_size=8)
    datamodule.setup()
    model.model.gaussian.reset_statistics()
    for batch in datamodule.train_dataloader():
        model.model.gaussian.update(model.model.extract_embedding(model.pre_processor.transform(batch.image)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the few-images warning, expected here
        model.fit()
    pixel_labels = category != "elpv_mono"
    return score(model, datamodule, pixel_labels)[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--subsets", type=Path, required=True, help="<benchmark --out>/data")
    parser.add_argument("--categories", default="elpv_mono,brick,grass")
    parser.add_argument("--counts", default="1,2,4,8,16,32,0")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--image-size", type=int, default=128)
    add_threads_option(parser)
    args = parser.parse_args()
    apply_threads(args.threads)
    weights = str(offline_efficientnet_lite0())
    categories, counts = args.categories.split(","), [int(n) for n in args.counts.split(",")]
    seeds = [int(seed) for seed in args.seeds.split(",")]
    print(machine_summary(), flush=True)
    means: dict[str, dict[str, list[float]]] = {}
    for name, arguments in settings().items():
        cells = {metric: [] for metric in METRICS}
        for category in categories:
            for count in counts:
                results = [
                    run_cell(arguments, args.subsets / f"n{count}_s{seed}", category, args.image_size, weights)
                    for seed in seeds
                ]
                for metric in METRICS:
                    if results[0][metric] is not None:
                        cells[metric].append(statistics.fmean(result[metric] for result in results))
        means[name] = cells
        print(name, {metric: round(statistics.fmean(values), 4) for metric, values in cells.items()}, flush=True)
    header = ["head", "mean image AUROC", "mean pixel AUROC", "mean AUPRO"]
    rows = [[name, *(f"{statistics.fmean(cells[m]):.3f}" for m in METRICS)] for name, cells in means.items()]
    print(
        f"\nMeans over {len(categories)} categories x N in {counts} (each the mean of seeds {seeds}); pixel "
        "metrics over the categories with defect masks.\n"
    )
    print(markdown_table(header, rows))


if __name__ == "__main__":
    main()
