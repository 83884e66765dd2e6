"""The plugin as users install it: a built wheel in a clean environment, and anomalib's own tools finding it."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import sysconfig
from pathlib import Path

import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[1]
OFFLINE = {"HF_HUB_OFFLINE": "1", "ANOMALIB_CONTNET_OFFLINE": "1", "COLUMNS": "200"}


def run(command: list[str], cwd: Path, timeout: int = 600, extra_env: dict[str, str] | None = None) -> str:
    """Run ``command``; return its standard output (warnings go to stderr), failing the test with both on error."""
    environment = os.environ | OFFLINE | (extra_env or {})
    result = subprocess.run(
        command, cwd=cwd, env=environment, capture_output=True, text=True, timeout=timeout, check=False
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


HOOK = "anomalib_contnet_autoload"

# Run inside the wheel's venv. It does at run time what a Python 3.15+ ``site`` does with a ``.start`` file
# (PEP 829: resolve each ``pkg.mod:callable`` line with pkgutil.resolve_name and call it without arguments), then
# counts the autoload watchers before anomalib loads and the registration wrappers on anomalib.models' loader after.
COUNT_REGISTRATIONS = f"""
import pkgutil, sys
from pathlib import Path
import {HOOK} as hook
start_file = Path(sys.argv[1])
entry_points = [line.strip() for line in start_file.read_text(encoding="utf-8").splitlines() if line.strip()]
print("entry points:", entry_points)
def watchers():
    return sum(isinstance(finder, hook._WatchAnomalibModels) for finder in sys.meta_path)
print("watchers after interpreter start:", watchers())
for entry_point in entry_points:
    pkgutil.resolve_name(entry_point)()
print("watchers after the .start entry points:", watchers())
import anomalib.models as models
loader, wrappers = models.__spec__.loader, 0
while isinstance(loader, hook._RegisterAfterLoad):
    loader, wrappers = loader.inner, wrappers + 1
print("registrations:", wrappers)
print("watchers left:", watchers())
print("registered:", models.ConTNetPaDiM is sys.modules["anomalib_contnet"].ConTNetPaDiM)
"""


def site_packages(python: Path) -> Path:
    return Path(run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=REPO).strip())


@pytest.mark.slow
def test_wheel_installs_a_pep_829_start_file_beside_the_pth(wheel_environment: Path) -> None:
    """Same name as the .pth (so Python 3.15+ skips the .pth import line), one entry point naming a real callable."""
    site = site_packages(wheel_environment)
    start_file, pth_file = site / f"{HOOK}.start", site / f"{HOOK}.pth"
    assert pth_file.is_file()
    assert start_file.read_text(encoding="utf-8").splitlines() == [f"{HOOK}:install"]
    script = f"import pkgutil; print(callable(pkgutil.resolve_name('{HOOK}:install')))"
    assert run([str(wheel_environment), "-S", "-c", script], cwd=site).strip() == "True"


@pytest.mark.slow
def test_pth_and_start_file_together_register_the_plugin_exactly_once(wheel_environment: Path, tmp_path: Path) -> None:
    """Python <= 3.14 runs the .pth at start; calling the .start entry point as well must not add a second hook."""
    start_file = site_packages(wheel_environment) / f"{HOOK}.start"
    output = run([str(wheel_environment), "-c", COUNT_REGISTRATIONS, str(start_file)], cwd=tmp_path).splitlines()
    assert output[-5:] == [
        "watchers after interpreter start: 1",
        "watchers after the .start entry points: 1",
        "registrations: 1",
        "watchers left: 0",
        "registered: True",
    ]


@pytest.mark.slow
def test_start_file_alone_registers_the_plugin_once(wheel_environment: Path, tmp_path: Path) -> None:
    """What Python 3.18+ does (.pth import lines ignored): ``-S`` skips every .pth, only the .start entry point runs."""
    site = site_packages(wheel_environment)
    test_environment = (site / "test_environment.pth").read_text().strip()
    command = [str(wheel_environment), "-S", "-c", COUNT_REGISTRATIONS, str(site / f"{HOOK}.start")]
    output = run(command, cwd=tmp_path, extra_env={"PYTHONPATH": os.pathsep.join([str(site), test_environment])})
    assert output.splitlines()[-5:] == [
        "watchers after interpreter start: 0",
        "watchers after the .start entry points: 1",
        "registrations: 1",
        "watchers left: 0",
        "registered: True",
    ]


@pytest.mark.slow
def test_wheel_console_script_answers_help_without_anomalib(wheel_environment: Path, tmp_path: Path) -> None:
    """The wheel ships the console script's entry module (outside the package) and its quick path."""
    result = subprocess.run(
        [str(wheel_environment.with_name("anomalib-contnet")), "--help"],
        cwd=tmp_path, env=os.environ | {"PYTHONPROFILEIMPORTTIME": "1"},
        capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    assert "{weights,data,benchmark,demo}" in result.stdout
    assert re.search(r"\| +anomalib_contnet_entry$", result.stderr, re.MULTILINE)
    assert not re.search(r"\| +(anomalib|torch)$", result.stderr, re.MULTILINE)
    entry_file = run([str(wheel_environment), "-c", "import anomalib_contnet_entry as e; print(e.__file__)"], tmp_path)
    assert entry_file.startswith(str(wheel_environment.parents[1])), "the entry module did not come from the wheel"


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
