"""The side-by-side benchmark: raw-score ROC, data subsets, and the command end to end on a tiny dataset."""

from __future__ import annotations

import csv
import itertools
import json
from pathlib import Path

import pytest
import timm
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from anomalib_contnet.backbones.weight_files import CACHE_ENV, WEIGHTS_ENV
from anomalib_contnet.cli import main
from anomalib_contnet.data import make_tiny_mvtec
from anomalib_contnet.evaluation.configs import (
    MODEL_CONFIGS,
    OFFLINE_EFFICIENTNET_LABEL,
    RANDOM_INIT_LABEL,
    resolve_job_weights,
)
from anomalib_contnet.evaluation.paper import (
    MVTEC_AD_OBJECTS,
    MVTEC_AD_TEXTURES,
    PAPER_AUROC_PERCENT,
    expand_categories,
)
from anomalib_contnet.evaluation.runner import COLUMNS
from anomalib_contnet.evaluation.subsets import select_images
from anomalib_contnet.evaluation.worker import auroc


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
    area = auroc(torch.tensor(scores), torch.tensor(labels))
    assert area == pytest.approx(pairwise_auroc(list(scores), list(labels)), abs=1e-12)


def test_roc_refuses_a_single_class_and_non_finite_scores() -> None:
    with pytest.raises(ValueError, match="normal and anomalous"):
        auroc(torch.tensor([1.0, 2.0]), torch.tensor([True, True]))
    with pytest.raises(ValueError, match="NaN"):
        auroc(torch.tensor([1.0, float("nan")]), torch.tensor([True, False]))


def test_subset_is_seeded_balanced_and_keeps_masks(tmp_path: Path) -> None:
    root = make_tiny_mvtec(tmp_path / "full", n_train=10, n_test_good=6, n_test_defect=6, image_size=32)
    first = select_images(root / "brick", tmp_path / "a", max_train=4, max_test=6, seed=3)
    select_images(root / "brick", tmp_path / "b", max_train=4, max_test=6, seed=3)
    select_images(root / "brick", tmp_path / "c", max_train=4, max_test=6, seed=4)
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
        assert list(reader.fieldnames or ()) == list(COLUMNS)
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
    assert job["peak_rss_mb"] == pytest.approx(float(rows["Padim/resnet18"]["peak_rss_mb"]))

    markdown = (out / "benchmark.md").read_text(encoding="utf-8")
    table = [line for line in markdown.splitlines() if line.startswith("| brick |")]
    assert len(table) == 2
    assert all(line.count("|") == len(COLUMNS) + 1 for line in table)
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


def test_paper_table_holds_the_15_categories_and_reproduces_the_printed_averages() -> None:
    # A transcription check: the paper prints averages of its own per-category values (Tables 2 and 3).
    assert expand_categories(["mvtec_ad"]) == [*MVTEC_AD_OBJECTS, *MVTEC_AD_TEXTURES]
    assert set(PAPER_AUROC_PERCENT) == {*MVTEC_AD_OBJECTS, *MVTEC_AD_TEXTURES}
    printed = {"objects": (97.2, 96.9), "textures": (99.4, 96.1), "all": (97.9, 96.6)}
    members = {"objects": MVTEC_AD_OBJECTS, "textures": MVTEC_AD_TEXTURES, "all": tuple(PAPER_AUROC_PERCENT)}
    for group, (image, pixel) in printed.items():
        values = [PAPER_AUROC_PERCENT[category] for category in members[group]]
        # 0.07: the paper prints the textures' image mean 99.46 as 99.4 (truncated); the others round.
        assert sum(value[0] for value in values) / len(values) == pytest.approx(image, abs=0.07)
        assert sum(value[1] for value in values) / len(values) == pytest.approx(pixel, abs=0.05)


def mvtec_named_dataset(root: Path, train_counts: dict[str, int]) -> Path:
    """Generated categories in MVTec AD layout under MVTec AD's names (tiny texture crops with drawn stains)."""
    for category, n_train in train_counts.items():
        generated = make_tiny_mvtec(root.parent / "generated" / category, n_train=n_train, image_size=32)
        root.mkdir(exist_ok=True)
        (generated / "brick").rename(root / category)
    return root


def job_lines(output: str, state: str) -> list[str]:
    """Job ids of the progress lines ``== [i/n] <id>: <state>``."""
    return [line.split()[2].rstrip(":") for line in output.splitlines() if line.startswith("== [") and state in line]


@pytest.mark.slow
def test_full_protocol_table_beside_the_paper_and_resume(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = mvtec_named_dataset(tmp_path / "datasets", {"carpet": 6, "bottle": 4})
    out = tmp_path / "out"
    arguments = ["benchmark", "--data-root", str(root), "--categories", "carpet,bottle"]
    arguments += ["--configs", "contnet_padim_contnet_ti", "--out", str(out)]

    # 1. Every image of both categories; the paper's own numbers next to the measured ones, and the averages.
    assert main([*arguments, "--max-train", "0", "--max-test", "0"]) == 0
    first = capsys.readouterr().out
    assert job_lines(first, "running") == ["carpet__contnet_padim_contnet_ti", "bottle__contnet_padim_contnet_ti"]
    with (out / "benchmark.csv").open(encoding="utf-8") as handle:
        rows = {row["category"]: row for row in csv.DictReader(handle)}
    assert set(rows) == {"carpet", "bottle", "mean (textures)", "mean (objects)", "mean (all)"}
    assert (rows["carpet"]["n_train"], rows["carpet"]["n_test"]) == ("6", "8")  # make_tiny_mvtec: 4 + 4 test
    assert (rows["bottle"]["n_train"], rows["bottle"]["n_test"]) == ("4", "8")
    for category in ("carpet", "bottle"):
        row = rows[category]
        assert row["status"] == "ok"
        assert row["weights"] == RANDOM_INIT_LABEL
        paper_image, paper_pixel = PAPER_AUROC_PERCENT[category]
        assert float(row["paper_image_auroc"]) == pytest.approx(paper_image / 100)
        assert float(row["paper_pixel_auroc"]) == pytest.approx(paper_pixel / 100)
        assert 0.0 <= float(row["image_auroc"]) <= 1.0
        assert 0.0 <= float(row["pixel_auroc"]) <= 1.0
    for metric in ("image_auroc", "pixel_auroc", "paper_image_auroc", "paper_pixel_auroc"):
        both = (float(rows["carpet"][metric]) + float(rows["bottle"][metric])) / 2
        assert float(rows["mean (all)"][metric]) == pytest.approx(both)
        assert float(rows["mean (textures)"][metric]) == pytest.approx(float(rows["carpet"][metric]))
    markdown = (out / "benchmark.md").read_text(encoding="utf-8")
    carpet_line = next(line for line in markdown.splitlines() if line.startswith("| carpet |"))
    cells = [cell.strip() for cell in carpet_line.strip("|").split("|")]
    assert cells[1:3] == ["6", "8"]
    assert f"{PAPER_AUROC_PERCENT['carpet'][0] / 100:.3f}" == cells[8]
    assert f"{PAPER_AUROC_PERCENT['carpet'][1] / 100:.3f}" == cells[10]
    assert any(line.startswith("| mean (objects) |") for line in markdown.splitlines())
    carpet_result = out / "jobs" / "carpet__contnet_padim_contnet_ti" / "result.json"
    carpet_written = carpet_result.stat().st_mtime_ns

    # 2. The same command again after bottle's job was interrupted (no result): only bottle runs,
    #    carpet's kept result is reused untouched.
    (out / "jobs" / "bottle__contnet_padim_contnet_ti" / "result.json").unlink()
    assert main([*arguments, "--max-train", "0", "--max-test", "0"]) == 0
    second = capsys.readouterr().out
    assert job_lines(second, "running") == ["bottle__contnet_padim_contnet_ti"]
    assert job_lines(second, "finished earlier, skipped") == ["carpet__contnet_padim_contnet_ti"]
    assert carpet_result.stat().st_mtime_ns == carpet_written
    with (out / "benchmark.csv").open(encoding="utf-8") as handle:
        kept = {row["category"]: row["image_auroc"] for row in csv.DictReader(handle)}
    assert kept["carpet"] == rows["carpet"]["image_auroc"]

    # 3. A changed argument reruns only the jobs it changes: --max-train 4 picks 4 of carpet's
    #    6 training images but is all of bottle's 4 (the same files), so bottle's job is unchanged.
    assert main([*arguments, "--max-train", "4", "--max-test", "0"]) == 0
    third = capsys.readouterr().out
    assert job_lines(third, "running") == ["carpet__contnet_padim_contnet_ti"]
    assert job_lines(third, "finished earlier, skipped") == ["bottle__contnet_padim_contnet_ti"]
    assert carpet_result.stat().st_mtime_ns != carpet_written


# ------------------------------------------------------------------ anomalib's Padim and Patchcore on ConTNet-B

CONTNET_B_CONFIGS = ("padim_contnet_b", "patchcore_contnet_b", "mhpatchcore_contnet_b")
CONTNET_B_MODELS = ("Padim", "Patchcore", "MHPatchcore")
BACKBONE_PREFIX = "model.feature_extractor.feature_extractor."
"""Where anomalib's TimmFeatureExtractor keeps the timm network in a checkpoint of Padim / (MH)Patchcore."""


@pytest.fixture(scope="module")
def contnet_b_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    """A ConTNet-B checkpoint of seeded random values under a name of its own: what the weights label must name."""
    torch.manual_seed(11)
    state = timm.create_model("contnet_b").state_dict()
    path = tmp_path_factory.mktemp("contnet_b_weights") / "random_contnet_b.pth"
    torch.save(state, path)
    return path, state


def test_anomalib_models_on_contnet_get_the_found_checkpoint_through_their_job_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Padim and Patchcore take no weights argument: pre_trained=True, and the file the label names in the variable.
    cache = tmp_path / "cache"
    cache.mkdir()
    monkeypatch.setenv(CACHE_ENV, str(cache))
    monkeypatch.delenv(WEIGHTS_ENV, raising=False)
    for name in CONTNET_B_CONFIGS:
        untrained = resolve_job_weights(MODEL_CONFIGS[name], None, allow_download=False)
        assert (untrained.label, untrained.init_args, untrained.environment) == (
            RANDOM_INIT_LABEL,
            {"pre_trained": False},
            {},
        )
    cached = cache / "contnet_b.pth"
    cached.write_bytes(b"")  # only found here; its content is read and checked by the job that loads it
    for name in CONTNET_B_CONFIGS:
        weights = resolve_job_weights(MODEL_CONFIGS[name], None, allow_download=False)
        assert weights.init_args == {"pre_trained": True}
        assert weights.environment == {WEIGHTS_ENV: str(cached)}
        assert "contnet_b.pth" in weights.label
    # ConTNetPaDiM, which has a weights argument, gets the same file through it.
    paper = resolve_job_weights(MODEL_CONFIGS["contnet_padim_contnet_b"], None, allow_download=False)
    assert (paper.init_args, paper.environment, paper.label) == (
        {"pre_trained": True, "weights": str(cached)},
        {},
        weights.label,
    )


@pytest.fixture(scope="module")
def contnet_b_benchmarks(
    tmp_path_factory: pytest.TempPathFactory, contnet_b_file: tuple[Path, dict[str, torch.Tensor]]
) -> dict[str, Path]:
    """The ConTNet-B configurations on one tiny category at 64 px: without weights, then with the file."""
    work = tmp_path_factory.mktemp("contnet_b_benchmark")
    root = make_tiny_mvtec(work / "datasets", n_train=8, n_test_good=4, n_test_defect=4, image_size=64)
    arguments = ["benchmark", "--data-root", str(root), "--categories", "brick"]
    arguments += ["--configs", ",".join(CONTNET_B_CONFIGS), "--max-train", "6", "--max-test", "6"]
    # 64 px gives Patchcore a 4x4 grid: 96 patches from 6 images, so a ratio that keeps some of them.
    arguments += ["--image-size", "64", "--coreset-ratio", "0.1"]
    outs = {"random": work / "random", "file": work / "file"}
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(CACHE_ENV, str(work / "empty-cache"))
        patch.delenv(WEIGHTS_ENV, raising=False)
        assert main([*arguments, "--out", str(outs["random"])]) == 0
        patch.setenv(WEIGHTS_ENV, str(contnet_b_file[0]))
        assert main([*arguments, "--keep-checkpoints", "--out", str(outs["file"])]) == 0
    return outs


def contnet_b_rows(out: Path) -> dict[str, dict[str, str]]:
    """The job rows of a benchmark run, by model class name."""
    with (out / "benchmark.csv").open(encoding="utf-8") as handle:
        return {row["model"]: row for row in csv.DictReader(handle) if not row["category"].startswith("mean")}


@pytest.mark.slow
def test_padim_and_patchcore_on_contnet_b_run_untrained_without_a_checkpoint(
    contnet_b_benchmarks: dict[str, Path],
) -> None:
    rows = contnet_b_rows(contnet_b_benchmarks["random"])
    assert set(rows) == set(CONTNET_B_MODELS)
    for row in rows.values():
        assert (row["status"], row["backbone"], row["weights"]) == ("ok", "contnet_b", RANDOM_INIT_LABEL)
        assert (row["n_train"], row["n_test"]) == ("6", "6")
        for metric in ("image_auroc", "pixel_auroc", "aupro"):
            assert 0.0 <= float(row[metric]) <= 1.0
    assert "layers=layer1+layer2+layer3 n_features=100" in rows["Padim"]["settings"]
    assert "layers=layer2+layer3 coreset_sampling_ratio=0.1" in rows["Patchcore"]["settings"]


@pytest.mark.slow
def test_padim_and_patchcore_on_contnet_b_load_the_checkpoint_the_label_names(
    contnet_b_benchmarks: dict[str, Path], contnet_b_file: tuple[Path, dict[str, torch.Tensor]]
) -> None:
    path, state = contnet_b_file
    rows = contnet_b_rows(contnet_b_benchmarks["file"])
    for config, model in zip(CONTNET_B_CONFIGS, CONTNET_B_MODELS, strict=True):
        row = rows[model]
        assert row["status"] == "ok"
        assert path.name in row["weights"]
        checkpoint = contnet_b_benchmarks["file"] / "jobs" / f"brick__{config}" / "model.ckpt"
        saved = torch.load(checkpoint, map_location="cpu", weights_only=False)["state_dict"]
        backbone = {
            key.removeprefix(BACKBONE_PREFIX): value for key, value in saved.items() if key.startswith(BACKBONE_PREFIX)
        }
        assert len(backbone) > 100, sorted(saved)[:10]  # every stage the model reads, not a stray tensor
        assert all(torch.equal(value, state[key]) for key, value in backbone.items()), config


@pytest.mark.slow
def test_few_shot_mode_summarises_seeds_and_records_failed_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))  # the converted EfficientNet weights go to a private cache
    root = make_tiny_mvtec(tmp_path / "datasets", n_train=6, n_test_good=4, n_test_defect=4, image_size=64)
    out = tmp_path / "out"
    arguments = ["benchmark", "--data-root", str(root), "--categories", "brick", "--max-test", "8"]
    arguments += ["--configs", "contnet_padim_efficientnet_lite0,mhpatchcore_efficientnet_lite0", "--image-size", "64"]
    status = main([*arguments, "--few-shot", "1,4", "--seeds", "0,1", "--out", str(out)])
    with (out / "benchmark.csv").open(encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 8  # 2 configurations x 2 counts x 2 seeds, no mean rows
    assert status == (1 if any(row["status"] != "ok" for row in rows) else 0)
    for row in rows:
        assert row["weights"] == OFFLINE_EFFICIENTNET_LABEL
        assert row["n_test"] == "8"
        assert row["peak_rss_mb"] == ""  # in-process jobs: no per-job memory
    four = [row for row in rows if row["n_train"] == "4"]
    assert {row["model"] for row in four} == {"ConTNetPaDiM", "MHPatchcore"}
    assert all(row["status"] == "ok" for row in four)
    # Two seeds draw different training images from the same test set.
    drawn = {
        seed: sorted(path.name for path in (out / "data" / f"n4_s{seed}" / "brick" / "train" / "good").iterdir())
        for seed in (0, 1)
    }
    assert drawn[0] != drawn[1]
    test_sets = [
        sorted(p.relative_to(out / "data" / name).as_posix() for p in (out / "data" / name).rglob("test/*/*.png"))
        for name in ("n4_s0", "n4_s1", "n1_s0")
    ]
    assert test_sets[0] == test_sets[1] == test_sets[2]
    table = (out / "few_shot.md").read_text(encoding="utf-8")
    for model in ("ConTNetPaDiM", "MHPatchcore"):
        line = next(
            line for line in table.splitlines() if line.startswith(f"| brick | {model} efficientnet_lite0 | 4 |")
        )
        aurocs = [float(row["image_auroc"]) for row in four if row["model"] == model]
        mean = sum(aurocs) / 2
        assert f"{mean:.3f} ± {abs(aurocs[0] - aurocs[1]) / 2:.3f}" in line  # s.e. of two values: half their gap
    for row in (row for row in rows if row["status"] != "ok"):
        line = next(line for line in table.splitlines() if f"{row['model']} efficientnet_lite0 | 1 |" in line)
        assert line.rstrip(" |").split("|")[-1].strip().startswith(("1:", "2:"))  # failures counted, not averaged
