"""Where the time of one predict batch goes: pre-processing, each backbone stage, the head, post-processing.

Runs the pieces of ``ConTNetPaDiM``'s forward one by one on the same batch
(random 256x256 images, so the pre-processor really resizes to 224), repeats
the whole sequence for several rounds and reports the median time of each
piece and its share of their sum; the full forward of the Lightning module
(pre-processor -> model -> post-processor, what an exported graph contains) is
timed in the same rounds as a check that the pieces add up. A second table
lists the operators that take the most time inside the backbone (torch profiler).

Run from the repository root (about 5 minutes on 2 busy cores)::

    python benchmarks/profile_predict.py --threads 1
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
from _common import add_threads_option, apply_threads, fit_on_random_embeddings, machine_summary, markdown_table, median
from anomalib.data import InferenceBatch

from anomalib_contnet import ConTNetPaDiM
from anomalib_contnet.backbones.contnet import STAGE_NAMES


def fitted_module(backbone: str) -> ConTNetPaDiM:
    """The Lightning module at its defaults with random backbone weights and Gaussians fitted on random embeddings."""
    module = ConTNetPaDiM(backbone=backbone, pre_trained=False).eval()
    fit_on_random_embeddings(module.model)
    return module


def pieces(module: ConTNetPaDiM, raw: torch.Tensor) -> list[tuple[str, Callable[[], object]]]:
    """The forward cut into named steps; each step reads what the previous produced (kept in ``state``)."""
    model = module.model
    backbone = model.feature_extractor.backbone
    wanted = model.feature_extractor.layers
    last = max(STAGE_NAMES.index(name) for name in wanted)
    state: dict[str, object] = {}

    def stage(name: str, source: str) -> Callable[[], object]:
        def run() -> None:
            state[name] = getattr(backbone, name)(state[source])

        return run

    def embedding() -> None:
        maps = [state[name] for name in wanted]
        grid = max((feature.shape[-2:] for feature in maps), key=lambda size: size[0] * size[1])
        resized = [f if f.shape[-2:] == grid else torch.nn.functional.interpolate(f, size=grid) for f in maps]
        state["embedding"] = torch.cat(resized, dim=1)

    steps: list[tuple[str, Callable[[], object]]] = [
        ("pre-processing (resize 256->224, normalise)", lambda: state.update(images=module.pre_processor(raw)))
    ]
    source = "images"
    for name in STAGE_NAMES[: last + 1]:
        steps.append((f"backbone {name}", stage(name, source)))
        source = name
    steps += [
        ("embedding (concatenate layers)", embedding),
        ("head: Mahalanobis", lambda: state.update(distances=model.gaussian(state["embedding"]))),
        (
            "head: upsample + blur (factored)",
            lambda: state.update(
                anomaly_map=model.anomaly_map_generator(state["distances"], state["images"].shape[-2:])
            ),
        ),
        ("head: image score (max)", lambda: state.update(score=torch.amax(state["anomaly_map"], dim=(-2, -1)))),
        (
            "post-processing (normalise, threshold)",
            lambda: module.post_processor(InferenceBatch(pred_score=state["score"], anomaly_map=state["anomaly_map"])),
        ),
    ]
    return steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", default="contnet_b")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5)
    add_threads_option(parser)
    args = parser.parse_args()
    apply_threads(args.threads)
    print(machine_summary(), "\n")
    module = fitted_module(args.backbone)
    raw = torch.rand(args.batch, 3, 256, 256, generator=torch.Generator().manual_seed(1))
    steps = pieces(module, raw)
    seconds: dict[str, list[float]] = {name: [] for name, _ in steps} | {"whole forward": []}
    with torch.no_grad():
        for round_index in range(args.rounds + 1):  # the first round warms up and is dropped
            for name, step in steps:
                start = time.perf_counter()
                step()
                if round_index:
                    seconds[name].append(time.perf_counter() - start)
            start = time.perf_counter()
            module(raw)
            if round_index:
                seconds["whole forward"].append(time.perf_counter() - start)
        with torch.profiler.profile() as profiler:
            model = module.model
            model.feature_extractor(module.pre_processor(raw))

    medians = {name: 1e3 * median(values) for name, values in seconds.items()}
    total = sum(value for name, value in medians.items() if name != "whole forward")
    rows = [[name, value, 100 * value / total] for name, value in medians.items() if name != "whole forward"]
    rows.append(["sum of the pieces", total, 100.0])
    rows.append(["whole forward (pre -> model -> post), timed alone", medians["whole forward"], ""])
    title = f"## One predict batch: {args.backbone}, batch {args.batch}, {torch.get_num_threads()} threads"
    print(f"{title}, medians of {args.rounds} rounds\n")
    print(markdown_table(["step", "ms", "% of sum"], rows))

    events = sorted(profiler.key_averages(), key=lambda event: event.self_cpu_time_total, reverse=True)[:10]
    backbone_us = sum(event.self_cpu_time_total for event in profiler.key_averages())
    operator_rows = [
        [event.key, event.count, event.self_cpu_time_total / 1e3, 100 * event.self_cpu_time_total / backbone_us]
        for event in events
    ]
    print("\n## Backbone operators by self time (torch profiler, one batch)\n")
    print(markdown_table(["operator", "calls", "ms", "% of backbone"], operator_rows))


if __name__ == "__main__":
    main()
