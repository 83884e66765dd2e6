"""Eager predict speed of the working tree against an earlier commit, both measured in one run, as a ratio.

A refactor must not slow prediction down, and on a small shared machine two
separate runs differ by more than the 5 % that matters. So the baseline commit
is exported (``git archive`` of ``anomalib_contnet/`` into a temporary folder,
which leaves the repository, its index and its worktree list untouched) and each
tree gets its own long-lived worker process (same interpreter and virtual
environment, ``PYTHONPATH`` pointing at that tree, same thread count). Each
worker builds ``ConTNetPaDiMModel`` with the same arguments (random seeded
backbone weights: speed does not depend on what the weights learned), fits its
Gaussian on the same random embeddings of the model's own grid, and then times
one eager float32 forward (eval, ``no_grad``) of the same random batch whenever
the parent asks. The parent alternates the two workers
round by round in the order A B, B A, A B, ... so that load from other jobs and
slow drift hit both alike, and reports medians and the ratio of median times
new / baseline (above 1 = the working tree is slower) with a bootstrap 95 %
interval over the rounds and the range of the per-round ratios.

Two effects that belong to a process rather than to the code are kept out: both
workers are pinned to the same CPU (they never run at once, so neither gets the
core that also serves interrupts or other jobs), and ``--pairs`` fresh pairs of
workers are started one after the other, in alternating start order, each timed
for ``--rounds`` rounds (where a process's memory happens to lie can move its
speed by several per cent for its whole life: an A/A run with one pair measured
1.117 at 256 px with every round above 1).

Wall time is the speed a user sees, but on a shared machine it includes the time
the worker waited for a core. The CPU time of the worker process is reported
beside it: with one thread it leaves that waiting out, so when the two ratios
disagree, the machine's load (not the code) moved the wall-time ratio.

Both workers must report the same embedding shape and Gaussian buffer shapes,
otherwise the comparison would not be like for like and the script stops.

``--fit-images N`` times fitting instead: each request is one ``Engine.fit`` of a
fresh ``ConTNetPaDiM`` (same seeded random backbone, ``--batch`` images per training
step) on the same N texture images at the size given, written once per worker by
``make_tiny_mvtec``; the table then gives seconds per fit and training images/s.

``--new REV`` measures an exported commit instead of the working tree;
``--new`` equal to ``--baseline`` is an A/A run that shows the noise level.

Run from the repository root (about 2 minutes per size and 7 rounds at 224 px on 2 busy cores)::

    python benchmarks/predict_speed_vs_commit.py --baseline e052bb9 --sizes 224 256 --pairs 3 --rounds 5
    python benchmarks/predict_speed_vs_commit.py --baseline e052bb9 --new e052bb9 --sizes 224 256 --pairs 3 --rounds 5
    python benchmarks/predict_speed_vs_commit.py --sizes 1024 --n-features 100 --batch 2 --rounds 3
    python benchmarks/predict_speed_vs_commit.py --baseline 09eda79 --fit-images 48 --pairs 1 --rounds 3

At 1024 px with all 1536 dimensions the statistics alone would need about 19 GB
(1024 positions x 1536^2 float64 sums); ``--n-features`` (anomalib Padim's random
channel subset, both trees support it) makes such sizes affordable.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import torch
from _common import (
    CHILD_RESULT_PREFIX,
    available_memory_gb,
    machine_summary,
    markdown_table,
    median,
    report_child_result,
)

SCRIPT = Path(__file__).resolve()
REPOSITORY = SCRIPT.parent.parent
PACKAGE = "anomalib_contnet"
CLOCKS = ("wall", "cpu")
"""Wall time (what a user waits) and the worker's CPU time (insensitive to waiting for a busy core)."""


def git(*arguments: str) -> str:
    """Output of a read-only git command in the repository, stripped; a failure names the command."""
    completed = subprocess.run(["git", *arguments], cwd=REPOSITORY, capture_output=True, text=True, check=False)
    if completed.returncode:
        msg = f"git {' '.join(arguments)} failed: {completed.stderr.strip()}"
        raise SystemExit(msg)
    return completed.stdout.strip()


def export_package(revision: str, destination: Path) -> str:
    """Write ``anomalib_contnet/`` as it is at ``revision`` under ``destination``; return the one-line commit."""
    commit = git("rev-parse", "--verify", "--quiet", f"{revision}^{{commit}}")
    archive = subprocess.run(["git", "archive", commit, PACKAGE], cwd=REPOSITORY, capture_output=True, check=True)
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        tar.extractall(destination, filter="data")
    return git("log", "-1", "--format=%h %s", commit)


def working_tree_label() -> str:
    """HEAD's short hash, and whether the package has changes not yet committed."""
    dirty = git("status", "--porcelain", "--", PACKAGE)
    return git("rev-parse", "--short", "HEAD") + (" + uncommitted changes" if dirty else "")


def serve(setting: dict[str, Any]) -> None:
    """Worker: build and fit the model, report its shapes, then time one forward per line read from stdin.

    The package imported at the top of this file is the one of the worker's tree
    (its ``PYTHONPATH`` comes first on ``sys.path``); that is checked before anything runs.
    """
    import anomalib_contnet  # noqa: PLC0415  (only workers import the package: each its own tree's)
    from anomalib_contnet import ConTNetPaDiMModel  # noqa: PLC0415

    os.sched_setaffinity(0, {setting["cpu"]})
    torch.set_num_threads(setting["threads"])
    loaded_from = Path(anomalib_contnet.__file__).resolve()
    if not loaded_from.is_relative_to(Path(setting["tree"]).resolve()):
        msg = f"{PACKAGE} was imported from {loaded_from}, not from the tree {setting['tree']} (check PYTHONPATH)"
        raise RuntimeError(msg)
    if setting["fit_images"]:
        serve_fits(setting, loaded_from.parent)
        return
    torch.manual_seed(0)
    model = ConTNetPaDiMModel(backbone=setting["backbone"], pre_trained=False, n_features=setting["n_features"])
    model.eval()
    side, batch = setting["side"], setting["batch"]
    with torch.no_grad():
        grid = model.extract_embedding(torch.zeros(1, 3, side, side)).shape[1:]
        dimensions, positions = grid[0], grid[1] * grid[2]
        statistics_gb = 2 * positions * dimensions**2 * 8 / 1e9  # float64 sums, then the factor and its workspace
        if statistics_gb > available_memory_gb() / 2:
            msg = (
                f"fitting {dimensions} dimensions at {positions} positions ({side} px) needs about "
                f"{statistics_gb:.0f} GB, over half of what is free; pass --n-features (e.g. 100) or a smaller side"
            )
            raise MemoryError(msg)
        generator = torch.Generator().manual_seed(0)
        for _ in range(0, setting["fit_samples"], 8):
            model.gaussian.update(torch.randn(8, *grid, generator=generator))
        model.gaussian.fit()
        images = torch.randn(batch, 3, side, side, generator=torch.Generator().manual_seed(1))
        model(images)  # warm-up: first-call allocations and kernel selection are not what is compared
        report_child_result(
            {
                "package": str(loaded_from.parent),
                "embedding": list(grid),
                "positions_and_dims": list(model.gaussian.mean.shape),
                "gaussian_bytes": sum(buffer.nbytes for buffer in model.gaussian.state_dict().values()),
                "parameters": sum(parameter.numel() for parameter in model.parameters()),
                "threads": torch.get_num_threads(),
            }
        )
        for _ in sys.stdin:
            start, start_cpu = time.perf_counter(), time.process_time()
            model(images)
            report_child_result({"wall": time.perf_counter() - start, "cpu": time.process_time() - start_cpu})


def serve_fits(setting: dict[str, Any], package: Path) -> None:
    """Worker for ``--fit-images``: write the training images once, then time one ``Engine.fit`` per request."""
    from anomalib.data import MVTecAD  # noqa: PLC0415  (workers only, see serve)
    from anomalib.engine import Engine  # noqa: PLC0415

    from anomalib_contnet import ConTNetPaDiM  # noqa: PLC0415
    from anomalib_contnet.data import make_tiny_mvtec  # noqa: PLC0415

    side, batch = setting["side"], setting["batch"]
    with tempfile.TemporaryDirectory(prefix="fit-speed-") as work:
        root = make_tiny_mvtec(Path(work, "data"), n_train=setting["fit_images"], image_size=side, seed=0)
        datamodule = MVTecAD(root=root, category="brick", train_batch_size=batch, eval_batch_size=batch, num_workers=0)

        def fit() -> ConTNetPaDiM:
            torch.manual_seed(0)
            model = ConTNetPaDiM(
                backbone=setting["backbone"],
                pre_trained=False,
                n_features=setting["n_features"],
                image_size=(side, side),
            )
            engine = Engine(default_root_dir=Path(work, "run"), logger=False, enable_progress_bar=False)
            engine.fit(model=model, datamodule=datamodule)
            return model

        model = fit()  # warm-up, as for predict
        report_child_result(
            {
                "package": str(package),
                "embedding": list(model.model.gaussian.mean.shape),  # positions x dimensions
                "positions_and_dims": list(model.model.gaussian.mean.shape),
                "threads": torch.get_num_threads(),
            }
        )
        for _ in sys.stdin:
            start, start_cpu = time.perf_counter(), time.process_time()
            fit()
            report_child_result({"wall": time.perf_counter() - start, "cpu": time.process_time() - start_cpu})


@dataclass
class Worker:
    """One tree's worker process, and the place its stderr goes (read back when it fails)."""

    label: str
    process: subprocess.Popen
    stderr: IO[str]
    info: dict[str, Any]
    """What the worker reported once its model was fitted (package path, shapes, threads)."""

    @classmethod
    def start(cls, label: str, tree: Path, setting: dict[str, Any]) -> Worker:
        """Start the worker for ``tree``; it builds and fits its model while the caller starts the other one."""
        threads = str(setting["threads"])
        environment = os.environ | {"PYTHONPATH": str(tree), "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
        stderr = tempfile.TemporaryFile("w+")  # noqa: SIM115  (closed in stop(), read on failure)
        process = subprocess.Popen(
            [sys.executable, str(SCRIPT), "--worker", json.dumps(setting | {"tree": str(tree)})],
            cwd=tree,
            env=environment,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
        )
        return cls(label, process, stderr, {})

    def read_result(self) -> dict[str, Any]:
        """The next marked result line of the worker; its stderr in the error when it ends without one."""
        for line in self.process.stdout:
            if line.startswith(CHILD_RESULT_PREFIX):
                return json.loads(line.removeprefix(CHILD_RESULT_PREFIX))
        self.stderr.seek(0)
        msg = f"the {self.label} worker ended (exit {self.process.wait()}):\n{self.stderr.read()[-3000:]}"
        raise RuntimeError(msg)

    def time_forward(self) -> dict[str, float]:
        """Wall and CPU seconds of one forward of the worker's batch."""
        self.process.stdin.write("forward\n")
        self.process.stdin.flush()
        return self.read_result()

    def stop(self) -> None:
        """Close the worker's input (it then exits) and wait for it."""
        self.process.stdin.close()
        self.process.wait()
        self.stderr.close()


def bootstrap_interval(baseline: list[float], new: list[float], samples: int = 2000) -> tuple[float, float]:
    """2.5 and 97.5 percentiles of median(new) / median(baseline) over rounds resampled in pairs (seeded)."""
    generator = random.Random(0)
    indices = range(len(baseline))
    ratios = []
    for _ in range(samples):
        chosen = generator.choices(indices, k=len(baseline))
        ratios.append(median([new[i] for i in chosen]) / median([baseline[i] for i in chosen]))
    ratios.sort()
    return ratios[int(0.025 * samples)], ratios[int(0.975 * samples) - 1]


def compare(trees: dict[str, Path], setting: dict[str, Any], rounds: int, pairs: int) -> dict[str, Any]:
    """``pairs`` fresh pairs of workers for one setting, each timed alternately for ``rounds`` rounds; pooled."""
    seconds: dict[str, dict[str, list[float]]] = {clock: {label: [] for label in trees} for clock in CLOCKS}
    info: dict[str, Any] = {}
    for pair in range(pairs):
        order = list(trees.items()) if pair % 2 == 0 else list(trees.items())[::-1]
        result = compare_pair(dict(order), setting, rounds)
        for clock in CLOCKS:
            for label in trees:
                seconds[clock][label] += result["seconds"][clock][label]
        info = result["info"]
    return {"seconds": seconds, "info": info}


def compare_pair(trees: dict[str, Path], setting: dict[str, Any], rounds: int) -> dict[str, Any]:
    """Both workers for one setting, timed alternately for ``rounds`` rounds; seconds per clock and tree, shapes."""
    workers: list[Worker] = []
    try:
        for label, tree in trees.items():
            workers.append(Worker.start(label, tree, setting))
        for worker in workers:
            worker.info = worker.read_result()
        baseline, new = sorted(workers, key=lambda worker: worker.label)  # "baseline" < "new"
        for key in ("embedding", "positions_and_dims"):  # the same problem; its representation may differ
            if baseline.info[key] != new.info[key]:
                msg = f"{key} differs between the trees: baseline {baseline.info[key]}, new {new.info[key]}"
                raise RuntimeError(msg)
        seconds: dict[str, dict[str, list[float]]] = {clock: {w.label: [] for w in workers} for clock in CLOCKS}
        for round_index in range(rounds):
            for worker in workers if round_index % 2 == 0 else workers[::-1]:
                for clock, value in worker.time_forward().items():
                    seconds[clock][worker.label].append(value)
    finally:
        for worker in workers:
            worker.stop()
    return {"seconds": seconds, "info": {worker.label: worker.info for worker in workers}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--baseline", default="HEAD~1", help="git revision to compare with (default: HEAD~1)")
    parser.add_argument("--new", help="git revision to measure instead of the working tree (e.g. to rerun old pairs)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[224], help="square image sides in px")
    parser.add_argument("--backbone", default="contnet_b")
    parser.add_argument("--n-features", type=int, default=None, help="random channel subset (default: all)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=7, help="timed forwards per tree, size and worker pair")
    parser.add_argument("--pairs", type=int, default=3, help="fresh worker pairs per size, run one after another")
    parser.add_argument("--threads", type=int, default=1, help="torch/OpenMP threads of each worker (default: 1)")
    parser.add_argument("--fit-images", type=int, default=0, help="time Engine.fit on this many images instead")
    parser.add_argument(
        "--fit-samples", type=int, default=200, help="random embeddings the timed model's Gaussians are fitted on"
    )
    parser.add_argument("--tolerance", type=float, default=0.05, help="allowed slowdown (default: 0.05 = 5 %%)")
    args = parser.parse_args()
    if args.worker:
        serve(json.loads(args.worker))
        return
    if args.rounds < 2:
        parser.error("--rounds must be at least 2 for a spread estimate")

    print(machine_summary(), "\n")
    with tempfile.TemporaryDirectory(prefix="predict-speed-trees-") as exported:
        trees = {"baseline": Path(exported, "baseline"), "new": Path(exported, "new") if args.new else REPOSITORY}
        baseline_label = export_package(args.baseline, trees["baseline"])
        new_label = export_package(args.new, trees["new"]) if args.new else f"working tree at {working_tree_label()}"
        rows = []
        images_per_request = args.fit_images or args.batch
        for side in args.sizes:
            setting = {
                "backbone": args.backbone,
                "n_features": args.n_features,
                "side": side,
                "batch": args.batch,
                "threads": args.threads,
                "cpu": max(os.sched_getaffinity(0)),
                "fit_images": args.fit_images,
                "fit_samples": args.fit_samples,
            }
            result = compare(trees, setting, args.rounds, args.pairs)
            info = result["info"]["new"]
            for clock in CLOCKS:
                baseline, new = result["seconds"][clock]["baseline"], result["seconds"][clock]["new"]
                ratio = median(new) / median(baseline)
                low, high = bootstrap_interval(baseline, new)
                per_round = [n / b for b, n in zip(baseline, new, strict=True)]
                rows.append(
                    [
                        side,
                        "x".join(map(str, info["embedding"])),
                        clock,
                        1e3 * median(baseline),
                        1e3 * median(new),
                        images_per_request / median(baseline),
                        images_per_request / median(new),
                        f"{ratio:.3f}",
                        f"{low:.3f}-{high:.3f}",
                        f"{min(per_round):.3f}-{max(per_round):.3f}",
                        "yes" if ratio <= 1 + args.tolerance else "**no**",
                    ]
                )
            print(f"{side} px: baseline {result['info']['baseline']}\n{side} px: new {info}", flush=True)

    timed = f"Engine.fit on {args.fit_images} images" if args.fit_images else "Eager predict"
    print(
        f"\n## {timed}, {args.backbone}, batch {args.batch}, {args.threads} thread(s), "
        f"{args.pairs} worker pairs x {args.rounds} rounds, both pinned to CPU {max(os.sched_getaffinity(0))}\n"
    )
    print(f"baseline: {baseline_label}\nnew: {new_label}\n")
    headers = [
        "side px",
        "embedding",
        "clock",
        f"baseline ms/{'fit' if args.fit_images else 'batch'}",
        f"new ms/{'fit' if args.fit_images else 'batch'}",
        "baseline img/s",
        "new img/s",
        "time new / baseline",
        "bootstrap 95 %",
        "per-round ratios",
        f"within {100 * args.tolerance:.0f} %",
    ]
    print(markdown_table(headers, rows))


if __name__ == "__main__":
    main()
