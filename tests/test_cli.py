"""Command lines: the stock ``anomalib`` one drives ConTNetPaDiM (train, test, multi-process DDP).

``anomalib-contnet`` is quick and quiet: no anomalib for ``--help`` and ``weights``, and the known third-party
warnings filtered by their exact text.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from stock_cli import reported_metric, run_anomalib

from anomalib_contnet.models.contnet_padim.gaussian import StreamingGaussian
from anomalib_contnet.warning_filters import KNOWN_WARNINGS, LIGHTNING_TIPS, RANK_ZERO_LOGGERS, install_warning_filters

ANOMALIB_CONTNET = str(Path(sys.executable).with_name("anomalib-contnet"))
HEAVY_PACKAGES = {"anomalib", "lightning", "timm", "torchvision", "openvino"}


def train_arguments(root: Path, category: str, results: Path, *extra: str) -> list[str]:
    return [
        "train",
        "--model",
        "ConTNetPaDiM",
        "--model.pre_trained",
        "false",
        "--model.backbone",
        "contnet_ti",
        "--data",
        "MVTec",
        "--data.root",
        str(root),
        "--data.category",
        category,
        "--data.train_batch_size",
        "4",
        "--data.eval_batch_size",
        "4",
        "--data.num_workers",
        "0",
        "--default_root_dir",
        str(results),
        *extra,
    ]


def gaussian_summary(state: dict[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """Count, mean and covariance (less epsilon*I, float64) of a Gaussians state dict (keys under ``prefix``).

    The covariance is compared rather than the saved principal directions, whose signs are arbitrary.
    """
    basis, variances = state[f"{prefix}basis"].double(), state[f"{prefix}variances"].double()
    return {
        "count": state[f"{prefix}count"],
        "mean": state[f"{prefix}mean"],
        "covariance": basis @ (variances.unsqueeze(-1) * basis.mT),
    } | {name: state[prefix + name] for name in StreamingGaussian.SHARED_BUFFERS if prefix + name in state}


def saved_gaussian(results: Path) -> dict[str, torch.Tensor]:
    """:func:`gaussian_summary` of the Gaussians in the one checkpoint under ``results``."""
    (checkpoint,) = results.rglob("*.ckpt")
    return gaussian_summary(torch.load(checkpoint, weights_only=True)["state_dict"], prefix="model.gaussian.")


@pytest.mark.slow
def test_stock_cli_trains_and_tests_with_the_anomalib_1x_data_name(tiny_mvtec, tmp_path) -> None:
    root, category = tiny_mvtec
    output = run_anomalib(*train_arguments(root, category, tmp_path / "results"), cwd=tmp_path)
    assert reported_metric(output, "image_AUROC") > 0.9
    assert reported_metric(output, "pixel_AUROC") > 0.85


@pytest.mark.slow
@pytest.mark.parametrize(
    ("head", "patches_per_image"),
    [
        ((), 1),
        (("--model.neighbourhood", "1", "--model.shift_tolerance", "1"), 9),
        # 16 channels: the context's 9 x 16 dimensions keep the dense covariances compared below small
        (("--model.shared_covariance", "true", "--model.patch_context", "1", "--model.n_features", "16"), 1),
    ],
    ids=["paper head", "neighbourhood and shift tolerance", "shared covariance and patch context"],
)
def test_ddp_on_two_processes_gives_the_same_gaussian_as_one(
    tiny_mvtec, tmp_path, head: tuple[str, ...], patches_per_image: int
) -> None:
    """An odd number of training images also checks that DistributedSampler's padding is not counted twice."""
    source_root, category = tiny_mvtec
    root = tmp_path / "data"
    shutil.copytree(source_root, root)
    train_images = sorted((root / category / "train" / "good").iterdir())
    if len(train_images) % 2 == 0:
        train_images[-1].unlink()

    run_anomalib(*train_arguments(root, category, tmp_path / "one", *head), cwd=tmp_path)
    run_anomalib(
        *train_arguments(
            root,
            category,
            tmp_path / "two",
            *head,
            "--trainer.devices",
            "2",
            "--trainer.strategy",
            "ddp",
            "--trainer.accelerator",
            "cpu",
        ),
        cwd=tmp_path,
    )
    single, distributed = saved_gaussian(tmp_path / "one"), saved_gaussian(tmp_path / "two")
    training_images = len(list((root / category / "train" / "good").iterdir()))
    assert int(distributed["count"]) == int(single["count"]) == training_images * patches_per_image
    for key, value in single.items():
        torch.testing.assert_close(distributed[key], value, rtol=1e-4, atol=1e-5)


def run_anomalib_contnet(*arguments: str) -> tuple[str, str, set[str]]:
    """Run the installed console script with ``-X importtime``; return stdout, the other stderr, imported modules."""
    environment = os.environ | {"PYTHONPROFILEIMPORTTIME": "1", "ANOMALIB_CONTNET_OFFLINE": "1", "COLUMNS": "200"}
    result = subprocess.run(
        [ANOMALIB_CONTNET, *arguments], env=environment, capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-5000:]
    lines = result.stderr.splitlines()
    imported = {line.rsplit("|", 1)[1].strip() for line in lines if line.startswith("import time:")}
    other = "\n".join(line for line in lines if not line.startswith("import time:"))
    return result.stdout, other, imported


def top_level(modules: set[str]) -> set[str]:
    return {name.split(".")[0] for name in modules}


def test_help_imports_neither_anomalib_nor_torch() -> None:
    stdout, stderr, imported = run_anomalib_contnet("--help")
    for group in ("weights", "data", "benchmark", "demo"):
        assert re.search(rf"^\s+{group}\s+\S", stdout, re.MULTILINE), f"{group} missing from the help:\n{stdout}"
    assert not top_level(imported) & (HEAVY_PACKAGES | {"torch"})
    assert "anomalib_contnet.models" not in imported
    assert stderr == ""


def test_weights_list_imports_neither_anomalib_nor_torch() -> None:
    """Variants, cache paths and each file's shortcut (read from the zip's pickle, not unpickled) need no torch."""
    stdout, stderr, imported = run_anomalib_contnet("weights", "list")
    assert re.search(r"^contnet_b\s+missing\s+\S*contnet_b\.pth", stdout, re.MULTILINE), stdout
    assert not top_level(imported) & (HEAVY_PACKAGES | {"torch"})
    assert "anomalib_contnet.models" not in imported
    assert stderr == ""


@pytest.mark.slow
def test_commands_that_need_the_model_register_it_and_print_no_known_warning() -> None:
    """``data`` imports the package (so anomalib and the plugin); the filters are in place before anomalib loads."""
    _, stderr, imported = run_anomalib_contnet("data", "prepare", "textures", "--help")
    assert {"anomalib.models", "anomalib_contnet.models"} <= imported
    assert "Warning" not in stderr, stderr


def test_known_warnings_are_the_ones_anomalib_prints_when_it_loads() -> None:
    """The import-time entries match, to the letter, what importing anomalib.models prints (in a fresh process)."""
    script = (
        "import warnings\n"
        "with warnings.catch_warnings(record=True) as seen:\n"
        "    warnings.simplefilter('always')\n"
        "    import anomalib.models\n"
        "for warning in seen:\n"
        "    print(warning.category.__name__, str(warning.message).replace(chr(10), ' '), sep='|')\n"
    )
    environment = os.environ | {"ANOMALIB_CONTNET_NO_AUTOLOAD": "1"}
    result = subprocess.run(
        [sys.executable, "-c", script], env=environment, capture_output=True, text=True, timeout=300, check=True
    )
    seen = {tuple(line.split("|", 1)) for line in result.stdout.splitlines()}
    future = {message for category, message in seen if category == "FutureWarning"}
    known = {text for text, category in KNOWN_WARNINGS.items() if category is FutureWarning}
    assert future, "anomalib no longer prints FutureWarnings on import: check the list in warning_filters"
    assert future <= known


@pytest.fixture
def restore_filters() -> Iterator[None]:
    """Undo what install_warning_filters does to this process (warning filters, logger filters)."""
    loggers = [logging.getLogger(name) for name in RANK_ZERO_LOGGERS]
    saved = [list(logger.filters) for logger in loggers]
    with warnings.catch_warnings():
        yield
    for logger, filters in zip(loggers, saved, strict=True):
        logger.filters[:] = filters


@pytest.mark.usefixtures("restore_filters")
def test_filters_match_the_exact_text_and_nothing_broader() -> None:
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        install_warning_filters()
        for known, category in KNOWN_WARNINGS.items():
            text = known.replace("<n>", "266")
            warnings.warn(text, category, stacklevel=1)
            warnings.warn(text + " Something new.", category, stacklevel=1)
            warnings.warn("Note: " + text, category, stacklevel=1)
    assert len(seen) == 2 * len(KNOWN_WARNINGS)
    assert all(
        str(warning.message).startswith("Note: ") or "Something new." in str(warning.message) for warning in seen
    )


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.mark.usefixtures("restore_filters")
def test_lightning_tips_and_set_up_reports_are_silenced_and_other_lightning_messages_are_not() -> None:
    """A real Trainer logs the listed lines word for word (so the entries still match), and not once filtered."""
    from lightning.pytorch import Trainer  # noqa: PLC0415  (heavy; only this test needs it)
    from lightning_utilities.core import rank_zero  # noqa: PLC0415

    listed, logger = LIGHTNING_TIPS, rank_zero.log  # the logger Lightning's rank_zero_info writes to in this process
    assert logger.name in RANK_ZERO_LOGGERS
    records = _Records()
    logger.addHandler(records)
    try:
        Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, accelerator="cpu")
        seen = set(records.messages) & listed
        assert len(seen) >= 3, f"Lightning's set-up lines changed; it logged: {records.messages}"
        records.messages.clear()
        install_warning_filters()
        Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, accelerator="cpu")
        rank_zero.rank_zero_info("GPU available: True, used: True")  # not listed: a different line goes through
    finally:
        logger.removeHandler(records)
    assert records.messages == ["GPU available: True, used: True"]
