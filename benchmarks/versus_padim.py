"""ConTNetPaDiM side by side with anomalib's Padim (wide_resnet50_2): predict speed, checkpoint size, fit memory.

Both models get random backbone weights (``pre_trained=False``: speed, size and
memory do not depend on what the weights learned) and the same 224x224 input
tensors; wide_resnet50_2 up to layer3 costs about as much as ConTNet-B up to
layer4. Padim's Gaussian is filled with parameters of its fitted shapes (mean
550 x 3136, inverse covariance 3136 x 550 x 550) instead of being fitted, since
fitting it needs over 10 GB and its prediction cost and checkpoint depend only
on those shapes. ConTNetPaDiM's Gaussian is fitted on random embeddings.

- predict: images/s at batch 8, eager PyTorch, interleaved rounds, medians;
- checkpoint: ``torch.save`` of each model's state_dict (what a Lightning
  checkpoint holds), ConTNetPaDiM with float32 (default) and float16 factors;
- fit memory at N=300: ConTNetPaDiM measured (training step on 300 random
  images in a fresh process, see fit_memory.py), Padim wide_resnet50_2 measured
  at small N and extrapolated linearly to 300 when ``--memory`` is given (it
  grows by its memory bank; measuring it at 300 needs more memory than a shared
  24 GB machine can spare). Without ``--memory`` the table points to fit_memory.py.

Run from the repository root (about 10 minutes, 40 more with ``--memory``, on 2 busy cores)::

    python benchmarks/versus_padim.py --work /tmp/versus_padim --threads 1 --memory
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from _common import (
    add_threads_option,
    apply_threads,
    available_memory_gb,
    fitted_model,
    interleaved_timings,
    machine_summary,
    markdown_table,
    median,
    run_child,
)
from anomalib.models import Padim
from fit_memory import SCRIPT as FIT_MEMORY_SCRIPT
from fit_memory import WIDE_RESNET_NEEDS_GB

SIDE = 224


def padim_with_fitted_shapes(backbone: str) -> torch.nn.Module:
    """Padim's torch model with random weights and Gaussian parameters of the shapes a fit would give."""
    padim = Padim(backbone=backbone, pre_trained=False).model.eval()
    with torch.no_grad():
        features = padim.feature_extractor(torch.zeros(1, 3, SIDE, SIDE))
        positions = features[padim.layers[0]].shape[-2] * features[padim.layers[0]].shape[-1]
    dims = padim.n_features
    generator = torch.Generator().manual_seed(0)
    padim.gaussian.mean = torch.randn(dims, positions, generator=generator)
    padim.gaussian.inv_covariance = torch.eye(dims).expand(positions, dims, dims).contiguous()
    return padim


def checkpoint_mb(model: torch.nn.Module, path: Path) -> float:
    """Size in MB of ``torch.save(state_dict)``, written to ``path`` and then removed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    size = path.stat().st_size / 1e6
    path.unlink()
    return size


def fit_memory_rows(threads: int | None) -> list[list]:
    """Peak RSS of ConTNetPaDiM at N=300 and of Padim wide_resnet50_2 at small N with its linear extrapolation."""
    ours = run_child(
        FIT_MEMORY_SCRIPT,
        {"kind": "memory", "model": "contnet_padim", "backbone": "contnet_b", "input": "images", "images": 300}
        | {"threads": threads},
    )
    rows = [["ConTNetPaDiM contnet_b", 300, ours["peak_rss_mb"], "measured"]]
    points = []
    for count in (8, 40):
        if available_memory_gb() < WIDE_RESNET_NEEDS_GB:
            rows.append(["Padim wide_resnet50_2", count, float("nan"), f"skipped: {available_memory_gb():.1f} GB free"])
            continue
        setting = {"kind": "memory", "model": "padim", "backbone": "wide_resnet50_2", "images": count}
        points.append((count, run_child(FIT_MEMORY_SCRIPT, setting | {"threads": threads})["peak_rss_mb"]))
        rows.append(["Padim wide_resnet50_2", count, points[-1][1], "measured"])
    if len(points) == 2:
        (n0, p0), (n1, p1) = points
        at_300 = p0 + (p1 - p0) / (n1 - n0) * (300 - n0)
        rows.append(["Padim wide_resnet50_2", 300, at_300, "extrapolated linearly from the two rows above"])
        rows.append(["ratio ConTNetPaDiM / Padim at N=300", 300, ours["peak_rss_mb"] / at_300, ""])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, required=True, help="folder for temporary checkpoints")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--memory", action="store_true", help="also measure fit memory (long)")
    add_threads_option(parser)
    args = parser.parse_args()
    apply_threads(args.threads)
    print(machine_summary(), "\n")

    ours = fitted_model("contnet_b", "float32")
    sizes = {
        "ConTNetPaDiM contnet_b, float32 factor (default)": checkpoint_mb(ours, args.work / "ours32.pt"),
        "ConTNetPaDiM contnet_b, float16 factor": checkpoint_mb(
            fitted_model("contnet_b", "float16"), args.work / "ours16.pt"
        ),
    }
    padim = padim_with_fitted_shapes("wide_resnet50_2")
    sizes["Padim wide_resnet50_2"] = checkpoint_mb(padim, args.work / "padim.pt")
    images = torch.randn(args.batch, 3, SIDE, SIDE, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        timings = interleaved_timings(
            {"ConTNetPaDiM": lambda: ours(images), "Padim wide_resnet50_2": lambda: padim(images)}, rounds=args.rounds
        )
    rates = {name: args.batch / median(seconds) for name, seconds in timings.items()}

    print(f"## Predict, eager, batch {args.batch}, {torch.get_num_threads()} threads, {args.rounds} rounds\n")
    print(markdown_table(["model", "images/s"], [[name, rate] for name, rate in rates.items()]))
    print(f"\nConTNetPaDiM / Padim images/s: {rates['ConTNetPaDiM'] / rates['Padim wide_resnet50_2']:.2f}x\n")
    print("## Checkpoint (state_dict)\n")
    padim_mb = sizes["Padim wide_resnet50_2"]
    print(markdown_table(["model", "MB", "/ Padim"], [[name, mb, mb / padim_mb] for name, mb in sizes.items()]))
    if args.memory:
        print("\n## Fit peak RSS (fresh process per row)\n")
        print(markdown_table(["model", "N", "peak RSS MB", "how"], fit_memory_rows(args.threads)))
    else:
        print("\nFit memory: run with --memory, or see benchmarks/fit_memory.py.")


if __name__ == "__main__":
    main()
