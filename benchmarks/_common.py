"""Shared pieces of the performance benchmarks: timing under load, child processes, tables, machine facts.

The machines these scripts were written on are small and shared (2 cores, other
jobs running), so single timings mean little. Everything compared is therefore
measured in the same process, interleaved round by round (A, B, A, B, ...), and
reported as a ratio of medians: load from other processes then hits both sides
alike. Peak memory is measured in a fresh child process per setting, because a
process's peak resident size never goes down.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:  # imported where used, so that a script can compare package trees without loading this one
    from anomalib_contnet import ConTNetPaDiMModel

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("ANOMALIB_CONTNET_OFFLINE", "1")

CHILD_RESULT_PREFIX = "BENCHMARK-RESULT "
"""Marks the one stdout line of a child process that carries its JSON result."""


def add_threads_option(parser: argparse.ArgumentParser) -> None:
    """``--threads N``: torch threads for the whole run.

    On a machine whose cores are shared with other jobs, every multi-threaded
    operation waits at its barrier for a thread that the scheduler has parked,
    which turns a 50 µs operation into a 10 ms one; one thread then gives far more
    stable (if slower) numbers. Tables name the thread count they were made with.
    """
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")


def apply_threads(threads: int | None) -> None:
    """Set torch's thread count when ``--threads`` was given."""
    if threads is not None:
        torch.set_num_threads(threads)


def interleaved_timings(functions: dict[str, Callable[[], object]], rounds: int, warmup: int = 1) -> dict[str, list]:
    """Seconds per call of every function, called in turn each round so that background load hits all alike."""
    for _ in range(warmup):
        for function in functions.values():
            function()
    timings: dict[str, list[float]] = {name: [] for name in functions}
    for _ in range(rounds):
        for name, function in functions.items():
            start = time.perf_counter()
            function()
            timings[name].append(time.perf_counter() - start)
    return timings


def median(values: Sequence[float]) -> float:
    """Median, the statistic every table reports (robust to a few slow rounds on a busy machine)."""
    return statistics.median(values)


def matmul_rate(dtype: torch.dtype, size: int = 2048, rounds: int = 5) -> float:
    """Best observed GFLOP/s of one square matrix product of ``size`` on all torch threads."""
    left = torch.randn(size, size).to(dtype)
    right = torch.randn(size, size).to(dtype)
    seconds = interleaved_timings({"matmul": lambda: left @ right}, rounds)["matmul"]
    return 2 * size**3 / min(seconds) / 1e9


def openvino_matmul_rate(precision: str, threads: int, size: int = 2048, rounds: int = 5) -> float:
    """Best GFLOP/s of a square product in OpenVINO's CPU plugin (oneDNN kernels), precision ``f32`` or ``bf16``.

    torch's float32 product goes through MKL, which on some CPUs (AMD here) runs
    far below the rate oneDNN reaches; the machine's rate is the better of the two.
    """
    import numpy as np  # noqa: PLC0415  (only this measurement needs OpenVINO and NumPy)
    import openvino as ov  # noqa: PLC0415
    import openvino.opset13 as ops  # noqa: PLC0415

    rng = np.random.default_rng(0)
    left = ops.parameter([size, size], np.float32)
    right = ops.constant(rng.standard_normal((size, size), dtype=np.float32))
    model = ov.Model([ops.matmul(left, right, False, False)], [left])
    config = {"INFERENCE_PRECISION_HINT": precision, "INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY"}
    request = ov.Core().compile_model(model, "CPU", config).create_infer_request()
    values = rng.standard_normal((size, size), dtype=np.float32)
    seconds = interleaved_timings({"matmul": lambda: request.infer([values])}, rounds)["matmul"]
    return 2 * size**3 / min(seconds) / 1e9


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MB (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def available_memory_gb() -> float:
    """MemAvailable from /proc/meminfo in GB: what can be allocated without pushing others out of memory."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 1e6
    return float("inf")


def report_child_result(result: dict[str, Any]) -> None:
    """Hand a child's result to its parent on stdout (one marked JSON line)."""
    print(CHILD_RESULT_PREFIX + json.dumps(result), flush=True)


def run_child(script: Path, setting: dict[str, Any], timeout: float | None = None) -> dict[str, Any]:
    """Run ``script --child SETTING`` in a fresh interpreter and return its JSON result.

    A fresh process per setting is what makes peak-RSS numbers comparable: each
    starts from the same empty state and nothing freed earlier hides a peak.
    """
    completed = subprocess.run(
        [sys.executable, str(script), "--child", json.dumps(setting)],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    for line in completed.stdout.splitlines():
        if line.startswith(CHILD_RESULT_PREFIX):
            return json.loads(line.removeprefix(CHILD_RESULT_PREFIX))
    msg = f"child {setting} failed (exit {completed.returncode}):\n{completed.stderr[-3000:]}"
    raise RuntimeError(msg)


class ScoresAndMaps(nn.Module):
    """Export wrapper: images -> (pred_score, anomaly_map), the two tensors anomalib's exports return."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the model and unpack its InferenceBatch."""
        output = self.model(images)
        return output.pred_score, output.anomaly_map


def export_onnx(model: nn.Module, path: Path, sample: torch.Tensor) -> Path:
    """Export ``model`` to ONNX as anomalib does (``torch.onnx.export(dynamo=True)``, dynamic batch)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.onnx.export(
        ScoresAndMaps(model).eval(),
        (sample,),
        str(path),
        dynamo=True,
        dynamic_shapes=({0: torch.export.Dim("batch")},),
        input_names=["input"],
        output_names=["pred_score", "anomaly_map"],
    )
    return path


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub-markdown table; floats get three significant figures (whole numbers from 100 up)."""

    def cell(value: object) -> str:
        if isinstance(value, float):
            return f"{value:.3g}" if abs(value) < 100 else f"{value:,.0f}"
        return str(value)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(value) for value in row) + " |" for row in rows]
    return "\n".join(lines)


def machine_summary() -> str:
    """One paragraph naming the CPU, cores, instruction sets that matter, memory, software and current load."""
    fields: dict[str, str] = {}
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in lscpu.splitlines():
            key, _, value = line.partition(":")
            fields[key.strip()] = value.strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    flags = set(fields.get("Flags", "").split())
    wanted = [flag for flag in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "avx512_fp16") if flag in flags]
    memory_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
    return (
        f"CPU: {fields.get('Model name', platform.processor())}, {fields.get('CPU(s)', os.cpu_count())} logical CPUs "
        f"({fields.get('Thread(s) per core', '?')} thread(s)/core), L3 {fields.get('L3 cache', '?')}, "
        f"flags {' '.join(wanted) or 'none of avx2/avx512'}; RAM {memory_gb:.0f} GB; "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads); Python {platform.python_version()}; "
        f"load average at start {os.getloadavg()[0]:.1f}"
    )


def fit_on_random_embeddings(
    model: ConTNetPaDiMModel, training_images: int = 200, side: int = 224
) -> ConTNetPaDiMModel:
    """Fit ``model``'s Gaussians on random embeddings of its grid at ``side`` px (speed only), in eval mode.

    The Gaussians' size, and so the head's cost, grows with the number of training images
    up to the embedding dimension; 200 is a typical MVTec AD category.
    """
    model.eval()
    with torch.no_grad():
        grid = model.extract_embedding(torch.zeros(1, 3, side, side)).shape[1:]
    generator = torch.Generator().manual_seed(0)
    for _ in range(0, training_images, 8):
        model.gaussian.update(torch.randn(8, *grid, generator=generator))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fewer images than dimensions: expected here
        model.gaussian.fit()
    return model


def fitted_model(backbone: str) -> ConTNetPaDiMModel:
    """Model with random backbone weights and Gaussians fitted by :func:`fit_on_random_embeddings`."""
    from anomalib_contnet import ConTNetPaDiMModel  # noqa: PLC0415  (see the TYPE_CHECKING import above)

    return fit_on_random_embeddings(ConTNetPaDiMModel(backbone=backbone, pre_trained=False))
