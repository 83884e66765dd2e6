"""Bytes and head time of the fitted Gaussians against those of an earlier commit, per training-set size N.

For every N: the Gaussians of contnet_b at 224 px (49 positions, 1536 dimensions)
are fitted on the same synthetic features (decaying spectrum, as real features
have) by the current ``StreamingGaussian`` and by the one of ``--baseline``
(read with ``git show``, so no second checkout is needed). Reported: the bytes of
the saved state (what a checkpoint holds), of the ONNX initializers, of the OpenVINO
IR ``.bin`` converted from that ONNX, the eager head time (Mahalanobis step only,
medians of interleaved rounds) at batch 1 and 8, and the largest relative difference
of the distances between the two.

Fit memory: ``benchmarks/fit_memory.py``.

Run from the repository root (about 10 minutes on 2 cores)::

    python benchmarks/gaussian_size.py --counts 60,200,391 --baseline 09eda79 --threads 1
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import openvino as ov
import torch
from _common import (
    add_threads_option,
    apply_threads,
    interleaved_timings,
    machine_summary,
    markdown_table,
    median,
)

from anomalib_contnet.models.contnet_padim.gaussian import StreamingGaussian

POSITIONS_SIDE, DIMS = 7, 1536
GAUSSIAN_PATH = "anomalib_contnet/models/contnet_padim/gaussian.py"


def baseline_class(commit: str, work: Path) -> type:
    """``StreamingGaussian`` as it was at ``commit``."""
    source = subprocess.run(["git", "show", f"{commit}:{GAUSSIAN_PATH}"], check=True, capture_output=True, text=True)
    path = work / f"gaussian_{commit}.py"
    path.write_text(source.stdout, encoding="utf-8")
    spec = importlib.util.spec_from_file_location(f"gaussian_{commit}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module.StreamingGaussian


def synthetic_features(count: int, seed: int) -> torch.Tensor:
    """(count, D, 7, 7) features whose variances fall off like a power law over the channels."""
    generator = torch.Generator().manual_seed(seed)
    spread = torch.arange(1, DIMS + 1, dtype=torch.float32).pow(-0.5).reshape(1, DIMS, 1, 1) * 4
    return torch.randn(count, DIMS, POSITIONS_SIDE, POSITIONS_SIDE, generator=generator) * spread + 1.0


def fitted(gaussian: torch.nn.Module, train: torch.Tensor) -> torch.nn.Module:
    for batch in torch.split(train, 32):
        gaussian.update(batch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gaussian.fit()
    return gaussian.eval()


def sizes(gaussian: torch.nn.Module, sample: torch.Tensor, work: Path, name: str) -> dict[str, float]:
    """MiB of the saved state, the ONNX initializers and the OpenVINO IR weights."""
    state_bytes = sum(tensor.nbytes for tensor in gaussian.state_dict().values())
    onnx_path = work / f"{name}.onnx"
    batch = torch.export.Dim("batch")
    torch.onnx.export(gaussian, (sample,), str(onnx_path), dynamo=True, dynamic_shapes=({0: batch},))
    onnx_bytes = onnx_path.stat().st_size + sum(path.stat().st_size for path in work.glob(f"{name}.onnx.data"))
    xml = work / f"{name}.xml"
    ov.save_model(ov.convert_model(onnx_path), xml, compress_to_fp16=False)
    ir_bytes = xml.with_suffix(".bin").stat().st_size
    return {"state": state_bytes / 2**20, "onnx": onnx_bytes / 2**20, "ir": ir_bytes / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--counts", default="60,200,391", help="comma-separated numbers of training images")
    parser.add_argument("--baseline", default="09eda79", help="commit whose gaussian.py is compared")
    parser.add_argument("--rounds", type=int, default=7)
    add_threads_option(parser)
    args = parser.parse_args()
    apply_threads(args.threads)
    print(machine_summary(), "\n")
    rows = []
    with tempfile.TemporaryDirectory() as folder, torch.no_grad():
        work = Path(folder)
        baseline = baseline_class(args.baseline, work)
        for count in (int(value) for value in args.counts.split(",")):
            train, test = synthetic_features(count, seed=count), synthetic_features(8, seed=0) * 1.2
            current, previous = fitted(StreamingGaussian(), train), fitted(baseline(), train)
            current_size = sizes(current, test[:1], work, f"current_{count}")
            previous_size = sizes(previous, test[:1], work, f"previous_{count}")
            difference = float(((current(test) - previous(test)).abs() / previous(test)).max())
            for batch in (1, 8):
                heads = {"current": current, "previous": previous}
                timings = interleaved_timings(
                    {name: lambda head=head, sample=test[:batch]: head(sample) for name, head in heads.items()},
                    rounds=args.rounds,
                )
                current_ms, previous_ms = (1e3 * median(timings[name]) for name in heads)
                sizes_mib = [f"{current_size[key]:.1f} / {previous_size[key]:.1f}" for key in ("state", "onnx", "ir")]
                rows.append(
                    [
                        count,
                        batch,
                        *sizes_mib,
                        f"{current_size['state'] / previous_size['state']:.3f}",
                        f"{current_ms:.1f} / {previous_ms:.1f}",
                        f"{current_ms / previous_ms:.2f}",
                        f"{difference:.1e}",
                    ]
                )
                print(markdown_table(HEADERS, rows[-1:]), flush=True)
    print(f"\n## Gaussians of contnet_b at 224 px (49 x 1536), current / {args.baseline}\n")
    print(markdown_table(HEADERS, rows))


HEADERS = [
    "N",
    "batch",
    "state MiB",
    "ONNX MiB",
    "IR MiB",
    "state ratio",
    "head ms",
    "head ratio",
    "max rel. distance diff.",
]

if __name__ == "__main__":
    main()
