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


def run_anomalib_process(*arguments: str, cwd: Path, environment: Mapping[str, str] | None = None) -> tuple[int, str]:
    """Exit status and stdout + stderr of ``anomalib <arguments>``, offline, with ``environment`` added."""
    result = subprocess.run(
        [ANOMALIB, *arguments],
        cwd=cwd,
        env=os.environ | OFFLINE | dict(environment or {}),
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    return result.returncode, result.stdout + result.stderr


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
