"""ConTNetPaDiM (contnet_b) beside anomalib's Padim (wide_resnet50_2): predict speed and checkpoint size.

Both models get random backbone weights (speed and size do not depend on what
the weights learned) and the same 224x224 input tensors. Padim's Gaussian is
given parameters of its fitted shapes (mean 550 x 3136, inverse covariance
3136 x 550 x 550) instead of being fitted, which would need over 10 GB; its
prediction cost and checkpoint depend only on those shapes. ConTNetPaDiM's
Gaussian is fitted on random embeddings.

- predict: images/s, eager PyTorch, interleaved rounds, medians;
- checkpoint: bytes of ``torch.save(state_dict)``, what a Lightning checkpoint holds.

Fit memory against Padim: ``benchmarks/fit_memory.py``. Run from the repository
root (about 10 minutes on 2 busy cores)::

    python benchmarks/versus_padim.py --work /tmp/versus_padim --threads 1
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from _common import (
    add_threads_option,
    apply_threads,
    fitted_model,
    interleaved_timings,
    machine_summary,
    markdown_table,
    median,
)
from anomalib.models import Padim

SIDE = 224


def padim_with_fitted_shapes(backbone: str) -> torch.nn.Module:
    """Padim's torch model with random weights and Gaussian parameters of the shapes a fit would give."""
    padim = Padim(backbone=backbone, pre_trained=False).model.eval()
    with torch.no_grad():
        features = padim.feature_extractor(torch.zeros(1, 3, SIDE, SIDE))
    positions = features[padim.layers[0]].shape[-2] * features[padim.layers[0]].shape[-1]
    dims = padim.n_features
    padim.gaussian.mean = torch.randn(dims, positions, generator=torch.Generator().manual_seed(0))
    padim.gaussian.inv_covariance = torch.eye(dims).expand(positions, dims, dims).contiguous()
    return padim


def checkpoint_mb(model: torch.nn.Module, path: Path) -> float:
    """Size in MB of ``torch.save(state_dict)``, written to ``path`` and then removed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    size = path.stat().st_size / 1e6
    path.unlink()
    return size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, required=True, help="folder for temporary checkpoints")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch", type=int, default=8)
    add_threads_option(parser)
    args = parser.parse_args()
    apply_threads(args.threads)
    print(machine_summary(), "\n")

    models = {"ConTNetPaDiM contnet_b": fitted_model("contnet_b")}
    models["Padim wide_resnet50_2"] = padim_with_fitted_shapes("wide_resnet50_2")
    images = torch.randn(args.batch, 3, SIDE, SIDE, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        calls = {name: lambda model=model: model(images) for name, model in models.items()}
        timings = interleaved_timings(calls, rounds=args.rounds)
    rows = [
        [name, args.batch / median(timings[name]), checkpoint_mb(model, args.work / "model.pt")]
        for name, model in models.items()
    ]
    rows.append(["ConTNetPaDiM / Padim", *(ours / padim for ours, padim in zip(rows[0][1:], rows[1][1:], strict=True))])
    print(f"Eager, batch {args.batch}, {torch.get_num_threads()} threads, medians of {args.rounds} rounds\n")
    print(markdown_table(["model", "predict images/s", "checkpoint MB"], rows))


if __name__ == "__main__":
    main()
