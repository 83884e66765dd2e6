"""``anomalib-contnet``: the tasks around the model that anomalib's own CLI does not cover.

Each command group lives next to the code it drives and contributes its
sub-parser through a ``register(subparsers)`` function; this module only
assembles them, so a new group is one import and one line here.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from anomalib_contnet.backbones import weights_cli
from anomalib_contnet.benchmark import cli as benchmark_cli
from anomalib_contnet.data import cli as data_cli
from anomalib_contnet.demo import cli as demo_cli


def build_parser() -> argparse.ArgumentParser:
    """Assemble the parser from every command group."""
    parser = argparse.ArgumentParser(
        prog="anomalib-contnet",
        description="Weights, offline data, side-by-side benchmark and demo for the ConTNetPaDiM anomalib plugin.",
    )
    groups = parser.add_subparsers(dest="group", required=True, metavar="{weights,data,benchmark,demo}")
    weights_cli.register(groups)
    data_cli.register(groups)
    benchmark_cli.register(groups)
    demo_cli.register(groups)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the process exit status."""
    args = build_parser().parse_args(argv)
    return int(args.handler(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
