"""``anomalib-contnet``: the tasks around the model that anomalib's own CLI does not cover.

Each command group lives next to the code it drives and contributes its
sub-parser through a ``register(subparsers)`` function. This module imports a
group's module only when that group is on the command line, so ``--help`` and
the ``weights`` commands load neither anomalib nor the model; the top-level help
lists the groups from :data:`COMMAND_GROUPS`.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

__all__ = ["main", "needs_model"]


COMMAND_GROUPS: dict[str, tuple[str, str]] = {
    "weights": ("anomalib_contnet.backbones.weights_cli", "list, download and import ConTNet ImageNet checkpoints"),
    "data": ("anomalib_contnet.data.cli", "prepare offline datasets in MVTec AD layout"),
    "benchmark": (
        "anomalib_contnet.evaluation.cli",
        "ConTNetPaDiM vs anomalib Padim/Patchcore/MHPatchcore on the same data: CSV + markdown table",
    ),
    "demo": ("anomalib_contnet.demo.cli", "offline end-to-end demo: data, training, test, OpenVINO export, report"),
}
"""Each group's module (with ``register(subparsers)``) and its line in the top-level help."""
WITHOUT_MODEL = {"weights"}
"""Groups that use neither anomalib nor the model, so the package need not be imported (registered) for them."""


def _requested_group(argv: Sequence[str]) -> str | None:
    """The command group named on the command line (its first word that is not an option), if any."""
    first_word = next((word for word in argv if not word.startswith("-")), None)
    return first_word if first_word in COMMAND_GROUPS else None


def needs_model(argv: Sequence[str]) -> bool:
    """Whether the command in ``argv`` needs anomalib and the registered model."""
    return _requested_group(argv) not in {None, *WITHOUT_MODEL}


def build_parser(argv: Sequence[str] = ()) -> argparse.ArgumentParser:
    """The parser with the full sub-parser of the group named in ``argv``, and a help line for the others."""
    parser = argparse.ArgumentParser(
        prog="anomalib-contnet",
        description="Weights, offline data, side-by-side benchmark and demo for the ConTNetPaDiM anomalib plugin.",
    )
    groups = parser.add_subparsers(dest="group", required=True, metavar="{" + ",".join(COMMAND_GROUPS) + "}")
    requested = _requested_group(argv)
    for name, (module, summary) in COMMAND_GROUPS.items():
        if name == requested:
            importlib.import_module(module).register(groups)
        else:
            groups.add_parser(name, help=summary)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the process exit status."""
    arguments = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(arguments).parse_args(arguments)
    return int(args.handler(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
