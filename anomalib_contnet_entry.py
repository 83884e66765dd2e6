"""The ``anomalib-contnet`` console script: quiet from the first line, and quick when no model is needed.

``import anomalib_contnet`` registers ConTNetPaDiM with anomalib, so it imports anomalib: seconds of start-up,
and third-party warnings printed while anomalib loads. This module sits outside the package so that the command
can install the warning filters (:mod:`anomalib_contnet.warning_filters`) before any third-party import, and
run ``--help`` and the ``weights`` commands from the package's submodules without anomalib: the package's module
object is created from its spec but its ``__init__`` runs only when the requested command needs the model
(:func:`anomalib_contnet.cli.needs_model`). In every other process ``import anomalib_contnet`` is unchanged.
"""

from __future__ import annotations

import importlib.util
import sys

PACKAGE = "anomalib_contnet"


def main() -> int:
    """Run ``anomalib-contnet`` with the warning filters in place and the package imported only if needed."""
    package = sys.modules.get(PACKAGE)
    deferred = package is None
    if deferred:
        spec = importlib.util.find_spec(PACKAGE)
        package = importlib.util.module_from_spec(spec)
        sys.modules[PACKAGE] = package  # submodules now import without running the package's __init__
    from anomalib_contnet import cli, warning_filters  # noqa: PLC0415  (only after the line above)

    warning_filters.install_warning_filters()
    if deferred and cli.needs_model(sys.argv[1:]):
        package.__spec__.loader.exec_module(package)  # the ordinary package import: registers the model
    return cli.main()


if __name__ == "__main__":
    sys.exit(main())
