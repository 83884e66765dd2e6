"""Eager predict speed of the working tree against an earlier commit, both measured in one run, as a ratio.

The baseline's ``anomalib_contnet/`` is exported with ``git archive`` into a temporary folder; each tree
gets a worker process (``PYTHONPATH`` = that tree, one thread, both pinned to one CPU) that builds
``ConTNetPaDiMModel`` with seeded random weights, fits its Gaussians on random embeddings and times one
eager forward per request. The parent alternates the workers round by round (A B, B A, ...) and starts
``--pairs`` fresh pairs, since where a process's memory lies can move its speed for its whole life.
Reported: median time new / baseline (above 1 = slower), wall and CPU time, and the per-round range.
``--new`` equal to ``--baseline`` is the A/A run that shows the noise level: run one beside every
comparison. ``--fit-images N`` times a whole ``Engine.fit`` of ``ConTNetPaDiM`` on N generated PNG files
per request instead of one forward. Method and results: docs/performance.md, sections 10 and 11.
From the repository root::

    python benchmarks/predict_speed_vs_commit.py --baseline 09eda79 --sizes 224 --pairs 2 --rounds 5
    python benchmarks/predict_speed_vs_commit.py --baseline 09eda79 --new 09eda79 --sizes 224 --pairs 2 --rounds 5
    python benchmarks/predict_speed_vs_commit.py --sizes 1024 --n-features 100 --batch 2 --rounds 3
    python benchmarks/predict_speed_vs_commit.py --baseline 385760d --fit-images 48 --pairs 1 --rounds 3
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _common import fit_on_random_embeddings, machine_summary, markdown_table, median
from PIL import Image

SCRIPT = Path(__file__).resolve()
REPOSITORY = SCRIPT.parent.parent
PACKAGE = "anomalib_contnet"


def git(*arguments: str) -> str:
    """Output of a read-only git command in the repository; a failure stops the script with git's message."""
    completed = subprocess.run(["git", *arguments], cwd=REPOSITORY, capture_output=True, text=True, check=False)
    if completed.returncode:
        raise SystemExit(f"git {' '.join(arguments)} failed: {completed.stderr.strip()}")
    return completed.stdout.strip()


def export_package(revision: str, destination: Path) -> str:
    """Write ``anomalib_contnet/`` as it is at ``revision`` under ``destination``; return the one-line commit."""
    commit = git("rev-parse", "--verify", "--quiet", f"{revision}^{{commit}}")
    archive = subprocess.run(["git", "archive", commit, PACKAGE], cwd=REPOSITORY, capture_output=True, check=True)
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        tar.extractall(destination, filter="data")
    return git("log", "-1", "--format=%h %s", commit)


def serve(setting: dict[str, Any]) -> None:
    """Worker: build and fit the model, print its Gaussians' shape, then time one forward per line read from stdin."""
    import anomalib_contnet  # noqa: PLC0415  (only workers import the package: each its own tree's)

    os.sched_setaffinity(0, {setting["cpu"]})
    torch.set_num_threads(1)
    if not Path(anomalib_contnet.__file__).resolve().is_relative_to(Path(setting["tree"]).resolve()):
        raise RuntimeError(f"{PACKAGE} was imported from {anomalib_contnet.__file__}, not from {setting['tree']}")
    if setting["fit_folder"]:
        serve_fits(anomalib_contnet, setting)
        return
    torch.manual_seed(0)
    model = anomalib_contnet.ConTNetPaDiMModel(
        backbone=setting["backbone"], pre_trained=False, n_features=setting["n_features"]
    )
    side = setting["side"]
    images = torch.randn(setting["batch"], 3, side, side, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        fit_on_random_embeddings(model, side=side)
        model(images)  # warm-up: first-call allocations and kernel selection are not what is compared
        print(json.dumps(list(model.gaussian.mean.shape)), flush=True)
        for _ in sys.stdin:
            start, start_cpu = time.perf_counter(), time.process_time()
            model(images)
            print(json.dumps([time.perf_counter() - start, time.process_time() - start_cpu]), flush=True)


def serve_fits(anomalib_contnet: Any, setting: dict[str, Any]) -> None:
    """Worker of ``--fit-images``: one ``Engine.fit`` on the generated folder per line read from stdin."""
    from anomalib.data import Folder  # noqa: PLC0415  (the package's own anomalib, imported after the pinning)
    from anomalib.engine import Engine  # noqa: PLC0415

    def fit() -> Any:
        torch.manual_seed(0)
        model = anomalib_contnet.ConTNetPaDiM(
            backbone=setting["backbone"], pre_trained=False, n_features=setting["n_features"], evaluator=False
        )
        data = Folder(name="fit", root=setting["fit_folder"], normal_dir="good", train_batch_size=setting["batch"])
        engine = Engine(default_root_dir=Path(setting["fit_folder"], "runs"), logger=False, enable_progress_bar=False)
        with contextlib.redirect_stdout(sys.stderr):  # stdout carries the timings only
            engine.fit(model, datamodule=data)
        return model

    print(json.dumps(list(fit().model.gaussian.mean.shape)), flush=True)  # also the warm-up
    for _ in sys.stdin:
        start, start_cpu = time.perf_counter(), time.process_time()
        fit()
        print(json.dumps([time.perf_counter() - start, time.process_time() - start_cpu]), flush=True)


def write_fit_images(count: int, side: int, folder: Path) -> None:
    """``count`` random-noise PNG files of ``side`` px under ``folder/good``, the normal images of the fits."""
    (folder / "good").mkdir(parents=True)
    generator = np.random.default_rng(0)
    for index in range(count):
        pixels = generator.integers(0, 256, (side, side, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / "good" / f"{index:03d}.png")


def start_worker(tree: Path, setting: dict[str, Any]) -> subprocess.Popen:
    """The worker of ``tree``; it builds and fits its model while the caller starts the other one."""
    environment = os.environ | {"PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    command = [sys.executable, str(SCRIPT), "--worker", json.dumps(setting | {"tree": str(tree)})]
    pipes = {"stdin": subprocess.PIPE, "stdout": subprocess.PIPE}
    return subprocess.Popen(command, cwd=tree, env=environment, text=True, **pipes)


def read_line(worker: subprocess.Popen) -> Any:
    """The worker's next line, as JSON; its traceback went to this process's stderr when it ended without one."""
    line = worker.stdout.readline()
    if not line:
        raise RuntimeError(f"a worker ended with exit status {worker.wait()} (its error is printed above)")
    return json.loads(line)


def time_pair(trees: dict[str, Path], setting: dict[str, Any], rounds: int) -> dict[str, list[list[float]]]:
    """One fresh worker per tree, timed alternately for ``rounds`` rounds: ``{label: [[wall, cpu], ...]}``."""
    workers = {label: start_worker(tree, setting) for label, tree in trees.items()}
    try:
        shapes = {label: read_line(worker) for label, worker in workers.items()}
        if len(set(map(tuple, shapes.values()))) > 1:  # the same problem on both sides, or no comparison
            raise RuntimeError(f"the trees fit Gaussians of different shapes: {shapes}")
        seconds: dict[str, list[list[float]]] = {label: [] for label in workers}
        for round_index in range(rounds):
            for label in list(workers)[:: 1 if round_index % 2 == 0 else -1]:
                workers[label].stdin.write("forward\n")
                workers[label].stdin.flush()
                seconds[label].append(read_line(workers[label]))
    finally:
        for worker in workers.values():
            worker.stdin.close()
            worker.wait()
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--baseline", default="HEAD~1", help="git revision to compare with (default: HEAD~1)")
    parser.add_argument("--new", help="git revision to measure instead of the working tree (--new = --baseline: A/A)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[224], help="square image sides in px")
    parser.add_argument("--backbone", default="contnet_b")
    parser.add_argument("--n-features", type=int, default=None, help="random channel subset (default: all)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=7, help="timed forwards per tree, size and worker pair")
    parser.add_argument("--pairs", type=int, default=3, help="fresh worker pairs per size, run one after another")
    parser.add_argument("--fit-images", type=int, default=0, help="time Engine.fit on this many images instead")
    args = parser.parse_args()
    if args.worker:
        serve(json.loads(args.worker))
        return
    print(machine_summary(), "\n")
    cpu = max(os.sched_getaffinity(0))
    rows = []
    with tempfile.TemporaryDirectory(prefix="predict-speed-trees-") as exported:
        trees = {"baseline": Path(exported, "baseline"), "new": Path(exported, "new") if args.new else REPOSITORY}
        baseline_label = export_package(args.baseline, trees["baseline"])
        new_label = export_package(args.new, trees["new"]) if args.new else "working tree"
        for side in args.sizes:
            setting = {"backbone": args.backbone, "n_features": args.n_features, "side": side, "batch": args.batch}
            setting["fit_folder"] = str(Path(exported, f"fit-{side}")) if args.fit_images else None
            if args.fit_images:
                write_fit_images(args.fit_images, side, Path(setting["fit_folder"]))
            seconds: dict[str, list[list[float]]] = {"baseline": [], "new": []}
            for pair in range(args.pairs):  # alternating which worker starts first
                order = dict(list(trees.items())[:: 1 if pair % 2 == 0 else -1])
                for label, values in time_pair(order, setting | {"cpu": cpu}, args.rounds).items():
                    seconds[label] += values
            for clock_index, clock in enumerate(("wall", "cpu")):
                baseline, new = ([times[clock_index] for times in seconds[label]] for label in ("baseline", "new"))
                per_round = [n / b for b, n in zip(baseline, new, strict=True)]
                ratio = median(new) / median(baseline)
                milliseconds = [1e3 * median(baseline), 1e3 * median(new)]
                rows.append([side, clock, *milliseconds, f"{ratio:.3f}", f"{min(per_round):.3f}-{max(per_round):.3f}"])
    what = f"Engine.fit on {args.fit_images} images" if args.fit_images else "Eager predict"
    print(f"## {what}, {args.backbone}, batch {args.batch}, 1 thread, {args.pairs} pairs x {args.rounds} rounds")
    print(f"\nbaseline: {baseline_label}\nnew: {new_label}\n")
    headers = ["side px", "clock", "baseline ms", "new ms", "time new / baseline", "per-round ratios"]
    print(markdown_table(headers, rows))


if __name__ == "__main__":
    main()
