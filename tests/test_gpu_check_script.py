"""benchmarks/gpu_check.sh, the script the lead runs on a GPU machine, works end to end (here on the CPU)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_runs_on_cpu_with_tiny_settings_and_writes_its_report(tmp_path: Path) -> None:
    out = tmp_path / "results"
    environment = os.environ | {"OUT": str(out), "PYTHON": sys.executable}
    arguments = ["--device", "cpu", "--images", "8", "--batch", "4", "--backbone", "contnet_ti"]
    arguments += ["--n-features", "32", "--rounds", "1"]
    completed = subprocess.run(
        ["bash", str(REPO / "benchmarks" / "gpu_check.sh"), *arguments],
        env=environment,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-2000:]
    report = (out / "gpu_check.md").read_text()
    rows = [line for line in report.splitlines() if line.startswith("| float32") or line.startswith("| bfloat16")]
    assert len(rows) == 2
    predict_rates = [float(row.split("|")[5].replace(",", "")) for row in rows]
    assert all(rate > 0 for rate in predict_rates)
    assert (out / "environment.txt").is_file()
    assert not list(out.glob("*.tmp"))
