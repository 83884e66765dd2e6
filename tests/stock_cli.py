"""Running anomalib's own ``anomalib`` command in a fresh process, as a user would, for the tests that need it."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

ANOMALIB = str(Path(sys.executable).with_name("anomalib"))
OFFLINE = {"HF_HUB_OFFLINE": "1", "ANOMALIB_CONTNET_OFFLINE": "1", "COLUMNS": "200"}
"""Offline switches (no download is ever attempted) and a wide terminal, so metric tables are not wrapped."""


WORKSPACE_RACE = ("FileExistsError", "create_versioned_dir")
"""anomalib's own race: every DDP process of the stock CLI creates the run's ``vN`` folder and ``latest`` link,
and two can collide before any model code runs. Such a run says nothing about the plugin and is run again."""


def run_anomalib_process(*arguments: str, cwd: Path, environment: Mapping[str, str] | None = None) -> tuple[int, str]:
    """Exit status and stdout + stderr of ``anomalib <arguments>``, offline, with ``environment`` added.

    A run that lost anomalib's workspace race (:data:`WORKSPACE_RACE`) is repeated, at most twice.
    """
    for _ in range(3):
        result = subprocess.run(
            [ANOMALIB, *arguments],
            cwd=cwd,
            env=os.environ | OFFLINE | dict(environment or {}),
            capture_output=True,
            text=True,
            timeout=900,
            check=False,
        )
        output = result.stdout + result.stderr
        if not all(marker in output for marker in WORKSPACE_RACE):
            break
    return result.returncode, output


def run_anomalib(*arguments: str, cwd: Path, environment: Mapping[str, str] | None = None) -> str:
    """Output of a successful ``anomalib <arguments>``; the test fails with the output's end otherwise."""
    returncode, output = run_anomalib_process(*arguments, cwd=cwd, environment=environment)
    assert returncode == 0, output[-5000:]
    return output


def reported_metric(output: str, name: str) -> float:
    """A metric from the table the CLI prints after testing."""
    match = re.search(rf"{name}\s*│\s*([0-9.]+)", output)
    assert match, f"{name} missing from the CLI output:\n{output[-3000:]}"
    return float(match.group(1))
