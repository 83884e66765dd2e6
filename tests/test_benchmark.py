"""The side-by-side benchmark: raw-score ROC, data subsets, and the command end to end on a tiny dataset."""

from __future__ import annotations

import csv
import itertools
import json
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from anomalib_contnet.benchmark import CSV_COLUMNS
from anomalib_contnet.benchmark.configs import OFFLINE_EFFICIENTNET_LABEL, RANDOM_INIT_LABEL
from anomalib_contnet.benchmark.metrics import roc_curve
from anomalib_contnet.benchmark.subsets import materialise_subset
from anomalib_contnet.cli import main
from anomalib_contnet.data import make_tiny_mvtec


def pairwise_auroc(scores: list[float], labels: list[bool]) -> float:
    """Probability that an anomalous sample outscores a normal one, ties counting one half (the AUROC's definition)."""
    positives = [score for score, label in zip(scores, labels, strict=True) if label]
    negatives = [score for score, label in zip(scores, labels, strict=True) if not label]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(positives, negatives))
    return wins / (len(positives) * len(negatives))


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(min_value=0, max_value=30).map(lambda step: 10.0 + step * 50.0), st.booleans()),
        min_size=2,
        max_size=40,
    ).filter(lambda pairs: 0 < sum(label for _, label in pairs) < len(pairs))
)
def test_roc_area_equals_the_pairwise_definition_on_large_tied_raw_scores(pairs: list[tuple[float, bool]]) -> None:
    # Scores of 10..1510 with many ties: the range where a sigmoid (torchmetrics' treatment of raw scores) saturates.
    scores, labels = zip(*pairs, strict=True)
    curve = roc_curve(torch.tensor(scores), torch.tensor(labels))
    assert curve.auc == pytest.approx(pairwise_auroc(list(scores), list(labels)), abs=1e-12)
    assert curve.fpr[0] == curve.tpr[0] == 0.0
    assert curve.fpr[-1] == curve.tpr[-1] == 1.0


def test_roc_refuses_a_single_class_and_non_finite_scores() -> None:
    with pytest.raises(ValueError, match="both classes"):
        roc_curve(torch.tensor([1.0, 2.0]), torch.tensor([True, True]))
    with pytest.raises(ValueError, match="NaN"):
        roc_curve(torch.tensor([1.0, float("nan")]), torch.tensor([True, False]))


def test_subset_is_seeded_balanced_and_keeps_masks(tmp_path: Path) -> None:
    root = make_tiny_mvtec(tmp_path / "full", n_train=10, n_test_good=6, n_test_defect=6, image_size=32)
    first = materialise_subset(root / "brick", tmp_path / "a", max_train=4, max_test=6, seed=3)
    materialise_subset(root / "brick", tmp_path / "b", max_train=4, max_test=6, seed=3)
    materialise_subset(root / "brick", tmp_path / "c", max_train=4, max_test=6, seed=4)
    assert (first.n_train, first.n_test_normal, first.n_test_anomalous) == (4, 3, 3)
    assert first.pixel_labels

    def files(subset_root: Path) -> list[str]:
        return sorted(p.relative_to(subset_root).as_posix() for p in subset_root.rglob("*.png"))

    assert files(tmp_path / "a") == files(tmp_path / "b")
    assert files(tmp_path / "a") != files(tmp_path / "c")
    for image in (tmp_path / "a" / "brick" / "test" / "stain").iterdir():
        mask = tmp_path / "a" / "brick" / "ground_truth" / "stain" / f"{image.stem}_mask.png"
        assert mask.read_bytes() == (root / "brick" / "ground_truth" / "stain" / mask.name).read_bytes()


def test_unknown_configuration_and_unpreparable_category_are_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    assert main(["benchmark", "--data-root", str(tmp_path), "--configs", "padim_vgg", "--out", str(out)]) == 2
    assert "padim_resnet18" in capsys.readouterr().err  # the message lists the valid names
    assert main(["benchmark", "--data-root", str(tmp_path), "--categories", "bottle", "--out", str(out)]) == 2
    assert "is not a category this tool can prepare offline" in capsys.readouterr().err
    assert not out.exists()


@pytest.fixture(scope="module")
def tiny_benchmark(tmp_path_factory: pytest.TempPathFactory) -> tuple[int, Path]:
    """Two cheap configurations (random-init Padim, offline-pretrained ConTNetPaDiM) on a tiny texture category."""
    work = tmp_path_factory.mktemp("benchmark")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("ANOMALIB_CONTNET_CACHE", str(work / "cache"))  # the converted weights go to a private cache
        root = make_tiny_mvtec(work / "datasets", n_train=10, n_test_good=5, n_test_defect=5, image_size=64)
        status = main(
            [
                "benchmark",
                "--data-root",
                str(root),
                "--categories",
                "brick",
                "--configs",
                "padim_resnet18,contnet_padim_efficientnet_lite0",
                "--max-train",
                "8",
                "--max-test",
                "8",
                "--image-size",
                "64",
                "--out",
                str(work / "out"),
            ]
        )
    return status, work / "out"


@pytest.mark.slow
def test_benchmark_writes_csv_and_markdown_with_measured_rows(tiny_benchmark: tuple[int, Path]) -> None:
    status, out = tiny_benchmark
    assert status == 0
    with (out / "benchmark.csv").open(encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        assert tuple(reader.fieldnames or ()) == CSV_COLUMNS
        rows = {row["model"] + "/" + row["backbone"]: row for row in reader}
    assert set(rows) == {"Padim/resnet18", "ConTNetPaDiM/efficientnet_lite0"}
    assert rows["Padim/resnet18"]["weights"] == RANDOM_INIT_LABEL
    assert rows["ConTNetPaDiM/efficientnet_lite0"]["weights"] == OFFLINE_EFFICIENTNET_LABEL
    for row in rows.values():
        assert row["status"] == "ok"
        assert (row["category"], row["n_train"], row["n_test"]) == ("brick", "8", "8")
        for metric in ("image_auroc", "pixel_auroc", "aupro"):
            assert 0.0 <= float(row[metric]) <= 1.0
        assert float(row["fit_s"]) > 0
        assert float(row["predict_images_per_s"]) > 0
        assert 100 < float(row["peak_rss_mb"]) < 24 * 1024  # a process with torch loaded, within this machine
        assert float(row["checkpoint_mb"]) > 0.1
    # The stains of the tiny set are obvious; real ImageNet features must rank every one above the normal images.
    assert float(rows["ConTNetPaDiM/efficientnet_lite0"]["image_auroc"]) == 1.0
    # Each job's own result file holds the same numbers as its row.
    job = json.loads((out / "jobs" / "brick__padim_resnet18" / "result.json").read_text(encoding="utf-8"))
    assert job["image_auroc"] == pytest.approx(float(rows["Padim/resnet18"]["image_auroc"]))
    assert job["peak_rss_bytes"] / 2**20 == pytest.approx(float(rows["Padim/resnet18"]["peak_rss_mb"]))

    markdown = (out / "benchmark.md").read_text(encoding="utf-8")
    table = [line for line in markdown.splitlines() if line.startswith("| brick |")]
    assert len(table) == 2
    assert all(line.count("|") == 14 for line in table)
    assert "raw scores" in markdown
    assert "8 training images, 4 normal + 4 anomalous test images" in markdown


@pytest.mark.slow
def test_a_job_that_times_out_becomes_a_failed_row_and_a_nonzero_exit(tmp_path: Path) -> None:
    root = make_tiny_mvtec(tmp_path / "datasets", n_train=4, n_test_good=2, n_test_defect=2, image_size=32)
    arguments = ["benchmark", "--data-root", str(root), "--categories", "brick", "--configs", "padim_resnet18"]
    status = main([*arguments, "--max-test", "4", "--job-timeout", "0.5", "--out", str(tmp_path / "out")])
    assert status == 1
    with (tmp_path / "out" / "benchmark.csv").open(encoding="utf-8") as handle:
        (row,) = list(csv.DictReader(handle))
    assert row["status"].startswith("failed: timed out after")
    assert row["image_auroc"] == ""
