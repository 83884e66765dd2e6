"""The demo end to end on a tiny dataset: report, figures, exported model; refusals leave old results intact."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from anomalib_contnet.cli import main
from anomalib_contnet.demo.cli import TINY_SIZES
from anomalib_contnet.evaluation.configs import OFFLINE_EFFICIENTNET_LABEL


@pytest.fixture
def no_contnet_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A machine without the ConTNet-B weights (a private, empty cache), as every offline install starts."""
    monkeypatch.setenv("ANOMALIB_CONTNET_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("ANOMALIB_CONTNET_WEIGHTS", raising=False)


@pytest.fixture
def tiny_data(tmp_path: Path) -> Path:
    from anomalib_contnet.data import make_tiny_mvtec  # noqa: PLC0415

    return make_tiny_mvtec(tmp_path / "datasets", n_train=10, n_test_good=4, n_test_defect=4, image_size=64)


def png(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        assert image.format == "PNG"
        return np.asarray(image.convert("RGB"))


@pytest.mark.slow
@pytest.mark.usefixtures("no_contnet_weights")
def test_tiny_demo_writes_report_figures_and_an_openvino_model(
    tiny_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # a relative --out, as scripts/demo.sh passes it
    out = tmp_path / "results" / "demo"
    # 112 px (a 7x7 feature grid) keeps the test quick; the default is the paper's 224.
    assert main(["demo", "--tiny", "--image-size", "112", "--out", "results/demo", "--data-root", str(tiny_data)]) == 0

    report = (out / "report.md").read_text(encoding="utf-8")
    assert OFFLINE_EFFICIENTNET_LABEL in report
    assert "not the paper's backbone" in report
    for way_to_get_weights in ("weights download contnet_b", "weights import contnet_b", "ANOMALIB_CONTNET_WEIGHTS"):
        assert way_to_get_weights in report
    assert "![Predictions](predictions.png)" in report

    grid = png(out / "predictions.png")
    assert grid.shape[1] >= 800  # four columns
    assert grid.shape[0] >= 200 * TINY_SIZES["samples"]  # one row per sample
    assert grid.std() > 10  # drawn, not blank

    metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    for name in ("image_auroc", "pixel_auroc", "aupro"):
        assert 0.0 <= metrics["raw"][name] <= 1.0
    assert metrics["raw"]["image_auroc"] == 1.0  # obvious stains under real ImageNet features
    assert len(metrics["samples"]) == TINY_SIZES["samples"]
    assert any(sample["image"].startswith("test/good/") for sample in metrics["samples"])
    assert any(not sample["image"].startswith("test/good/") for sample in metrics["samples"])
    for sample in metrics["samples"]:
        assert f"`{sample['image']}`" in report
    assert (out / "openvino" / "weights" / "openvino" / "model.xml").is_file()
    assert (out / "openvino" / "weights" / "openvino" / "model.bin").stat().st_size > 0
    assert (out / "model.ckpt").stat().st_size > 0
    assert not list(out.parent.glob(".demo.*"))  # no staging or retired folders left behind
    assert Path.cwd() == tmp_path
    assert not (tmp_path / "openvino_cache").exists()  # OpenVINO's compiled-model cache did not land where we ran


@pytest.mark.usefixtures("no_contnet_weights")
def test_a_failing_run_leaves_the_previous_report_intact(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "results" / "demo"
    out.mkdir(parents=True)
    (out / "report.md").write_text("previous report\n", encoding="utf-8")
    broken = tmp_path / "datasets" / "brick"
    (broken / "train" / "good").mkdir(parents=True)  # a category without any image
    assert main(["demo", "--tiny", "--out", str(out), "--data-root", str(broken.parent)]) == 2
    assert "no images in train/good" in capsys.readouterr().err
    assert (out / "report.md").read_text(encoding="utf-8") == "previous report\n"
    assert sorted(path.name for path in out.parent.iterdir()) == ["demo"]


@pytest.mark.usefixtures("no_contnet_weights")
def test_contnet_b_without_weights_is_refused_with_the_ways_to_get_them(
    tiny_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "demo"
    arguments = ["demo", "--tiny", "--backbone", "contnet_b", "--out", str(out), "--data-root", str(tiny_data)]
    assert main(arguments) == 2
    error = capsys.readouterr().err
    assert "weights import contnet_b" in error
    assert "ANOMALIB_CONTNET_WEIGHTS" in error
    assert not out.exists()
