"""The plugin as users install it: a built wheel in a clean environment, and anomalib's own tools finding it."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[1]
OFFLINE = {"HF_HUB_OFFLINE": "1", "ANOMALIB_CONTNET_OFFLINE": "1", "COLUMNS": "200"}


def run(command: list[str], cwd: Path, timeout: int = 600) -> str:
    """Run ``command``; return its standard output (warnings go to stderr), failing the test with both on error."""
    result = subprocess.run(
        command, cwd=cwd, env=os.environ | OFFLINE, capture_output=True, text=True, timeout=timeout, check=False
    )
    assert result.returncode == 0, f"{command} failed:\n{(result.stdout + result.stderr)[-4000:]}"
    return result.stdout


@pytest.fixture(scope="module")
def wheel_environment(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv holding only the built wheel; torch, anomalib & co. come from the test environment.

    The test environment's site-packages is added as a plain path, so its ``.pth``
    files (including the editable install's) are not processed there: whatever
    registers the plugin in this venv comes from the wheel alone.
    """
    work = tmp_path_factory.mktemp("wheel")
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(work / "dist"), str(REPO)], cwd=work)
    (wheel,) = (work / "dist").glob("anomalib_contnet-*.whl")
    venv = work / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=work)
    python = venv / "bin" / "python"
    purelib = Path(
        run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=work).strip()
    )
    (purelib / "test_environment.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--quiet", str(wheel)], cwd=work)
    return python


@pytest.mark.slow
def test_wheel_install_registers_the_model_when_anomalib_loads(wheel_environment: Path, tmp_path: Path) -> None:
    script = (
        "import sys, anomalib.models as models\n"
        "assert 'anomalib_contnet' in sys.modules, 'plugin not loaded by importing anomalib.models'\n"
        "import anomalib_contnet\n"
        "print(anomalib_contnet.__file__)\n"
        "print(type(models.get_model('ConTNetPaDiM', backbone='contnet_ti', pre_trained=False)).__name__)\n"
        "print('con_t_net_pa_di_m' in models.list_models())\n"
    )
    output = run([str(wheel_environment), "-c", script], cwd=tmp_path).splitlines()
    assert str(wheel_environment.parents[1]) in output[-3], "the plugin was imported from outside the wheel's venv"
    assert output[-2:] == ["ConTNetPaDiM", "True"]


@pytest.mark.slow
@pytest.mark.parametrize("model_name", ["ConTNetPaDiM", "anomalib_contnet.ConTNetPaDiM"])
def test_stock_cli_resolves_the_model_from_the_wheel(wheel_environment: Path, tmp_path: Path, model_name: str) -> None:
    """Anomalib's own CLI entry point (what the ``anomalib`` command runs) parses --model and --data MVTec."""
    arguments = ["train", "--model", model_name, "--model.pre_trained", "false", "--data", "MVTec", "--print_config"]
    script = f"import sys; from anomalib.cli.cli import main; sys.argv = ['anomalib', *{arguments!r}]; main()"
    output = run([str(wheel_environment), "-c", script], cwd=tmp_path)
    assert "class_path: anomalib_contnet.ConTNetPaDiM" in output
    assert "class_path: anomalib_contnet.MVTec" in output


def test_autoload_can_be_disabled(tmp_path: Path) -> None:
    script = "import sys, anomalib.models; print('anomalib_contnet' in sys.modules)"
    environment = os.environ | OFFLINE | {"ANOMALIB_CONTNET_NO_AUTOLOAD": "1"}
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=environment, capture_output=True, text=True, check=True
    )
    assert result.stdout.strip().splitlines()[-1] == "False"


@pytest.mark.slow
def test_anomalib_benchmark_accepts_class_path_contnetpadim(tiny_mvtec, tmp_path: Path) -> None:
    root, category = tiny_mvtec
    config = tmp_path / "benchmark.yaml"
    config.write_text(
        "accelerator:\n  - cpu\n"
        "benchmark:\n  seed: 0\n"
        "  model:\n    class_path: ConTNetPaDiM\n"
        "    init_args:\n      backbone: contnet_ti\n      pre_trained: false\n"
        "  data:\n    class_path: MVTec\n"
        f"    init_args:\n      root: {root}\n      num_workers: 0\n"
        "      train_batch_size: 4\n      eval_batch_size: 4\n"
        f"      category:\n        grid:\n          - {category}\n"
    )
    run([str(Path(sys.executable).with_name("anomalib")), "benchmark", "--config", str(config)], cwd=tmp_path)
    (results_file,) = (tmp_path / "runs" / "benchmark").rglob("results.csv")
    results = pd.read_csv(results_file)
    assert len(results) == 1
    assert 0.0 <= results.loc[0, "image_AUROC"] <= 1.0
    assert "ConTNetPaDiM" in str(results.loc[0, "model.class_path"])
