"""Offline datasets in MVTec AD layout: determinism, safety of the target folder, and anomalib loading them."""

from __future__ import annotations

import argparse
import hashlib
import math
from pathlib import Path

import numpy as np
import pytest
from anomalib.data import MVTecAD
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from anomalib_contnet.data import MANIFEST_NAME, DatasetPrepareError, make_tiny_mvtec, prepare_elpv, prepare_textures
from anomalib_contnet.data.cli import register
from anomalib_contnet.data.textures import DEFECT_TYPES, _draw_defect, load_texture, render_defective, texture_bands

SMALL_TEXTURES = {
    "categories": ("brick",),
    "image_size": 64,
    "n_train": 4,
    "n_test_good": 2,
    "n_test_defect": 6,
}


def file_hashes(folder: Path) -> dict[str, str]:
    return {
        path.relative_to(folder).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def listed_names(folder: Path) -> set[str]:
    return {path.name for path in folder.iterdir()}


def elpv_data_dir() -> Path:
    import elpv_dataset  # noqa: PLC0415

    return Path(elpv_dataset.__file__).parent / "data"


def elpv_labels() -> list[tuple[str, float, str]]:
    """The label file read independently of the code under test."""
    rows = []
    for line in (elpv_data_dir() / "labels.csv").read_text().splitlines():
        path, probability, module_type = line.split()
        rows.append((Path(path).name, float(probability), module_type))
    return rows


def run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="anomalib-contnet")
    register(parser.add_subparsers(dest="group", required=True))
    args = parser.parse_args(argv)
    return args.handler(args)


def test_same_seed_gives_byte_identical_files(tmp_path: Path) -> None:
    for root in (tmp_path / "a", tmp_path / "b"):
        prepare_textures(root, seed=3, **SMALL_TEXTURES)
        prepare_elpv(root, seed=3, max_per_split=4)
    first, second = file_hashes(tmp_path / "a"), file_hashes(tmp_path / "b")
    assert first == second
    assert {"brick/" + MANIFEST_NAME, "elpv_mono/" + MANIFEST_NAME, "elpv_poly/" + MANIFEST_NAME} <= set(first)


def test_elpv_split_follows_labels_and_seed(tmp_path: Path) -> None:
    labels = elpv_labels()
    functional = {name for name, p, kind in labels if p == 0.0 and kind == "mono"}
    defective = {name for name, p, kind in labels if p == 1.0 and kind == "mono"}
    splits = {}
    for seed in (0, 1):
        (category,) = prepare_elpv(tmp_path / str(seed), seed=seed, categories=["elpv_mono"])
        train = listed_names(category / "train" / "good")
        test_good = listed_names(category / "test" / "good")
        assert len(train) == math.floor(0.8 * len(functional))
        assert train | test_good == functional
        assert not train & test_good
        assert listed_names(category / "test" / "defective") == defective
        assert {
            name.removesuffix("_mask.png") + ".png" for name in listed_names(category / "ground_truth" / "defective")
        } == defective
        source = elpv_data_dir() / "images" / sorted(train)[0]
        assert (category / "train" / "good" / source.name).read_bytes() == source.read_bytes()
        splits[seed] = train
    assert splits[0] != splits[1]


def test_different_seed_gives_different_texture_images(tmp_path: Path) -> None:
    prepare_textures(tmp_path / "a", seed=0, **SMALL_TEXTURES)
    prepare_textures(tmp_path / "b", seed=1, **SMALL_TEXTURES)
    first, second = file_hashes(tmp_path / "a" / "brick"), file_hashes(tmp_path / "b" / "brick")
    assert first.keys() == second.keys()
    assert all(first[name] != second[name] for name in first if name.startswith(("train/", "test/")))


def test_refuses_a_category_folder_it_did_not_write(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    foreign = tmp_path / "brick" / "train" / "good" / "mine.png"
    foreign.parent.mkdir(parents=True)
    foreign.write_bytes(b"user data")
    with pytest.raises(DatasetPrepareError, match="did not write"):
        prepare_textures(tmp_path, **SMALL_TEXTURES)
    status = run_cli(["data", "prepare", "textures", "--root", str(tmp_path), "--categories", "brick"])
    assert status == 2
    assert "refusing to overwrite" in capsys.readouterr().err
    assert foreign.read_bytes() == b"user data"
    assert listed_names(tmp_path) == {"brick"}  # no staging folder left behind


def test_refuses_own_folder_once_files_were_added_or_edited(tmp_path: Path) -> None:
    make_tiny_mvtec(tmp_path)
    added = tmp_path / "brick" / "test" / "good" / "extra.png"
    added.write_bytes(b"added later")
    with pytest.raises(DatasetPrepareError, match="did not write"):
        make_tiny_mvtec(tmp_path, seed=1)
    assert added.read_bytes() == b"added later"
    added.unlink()
    make_tiny_mvtec(tmp_path, seed=1)  # without the added file, the folder is ours again


def test_refuses_own_folder_once_a_written_file_was_replaced_by_the_users(tmp_path: Path) -> None:
    make_tiny_mvtec(tmp_path)
    replaced = sorted((tmp_path / "brick" / "train" / "good").iterdir())[0]
    replaced.write_bytes(b"the user's own photograph under the generated name")
    with pytest.raises(DatasetPrepareError, match="changed since"):
        make_tiny_mvtec(tmp_path, seed=1)
    assert replaced.read_bytes() == b"the user's own photograph under the generated name"


def test_a_rerun_replaces_its_own_output_whole(tmp_path: Path) -> None:
    (tmp_path / "brick").mkdir()  # an empty folder holds nothing to lose
    (folder,) = prepare_textures(tmp_path, seed=0, **SMALL_TEXTURES)
    first = file_hashes(folder)
    prepare_textures(tmp_path, seed=5, **SMALL_TEXTURES)
    assert '"seed": 5' in (folder / MANIFEST_NAME).read_text()
    assert file_hashes(folder)["train/good/000.png"] != first["train/good/000.png"]
    prepare_textures(tmp_path, seed=0, **SMALL_TEXTURES)
    assert file_hashes(folder) == first
    assert listed_names(tmp_path) == {"brick"}  # no staging or replaced folder left behind


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    side=st.sampled_from([32, 64, 256]),
    defect_type=st.sampled_from(DEFECT_TYPES),
    grey=st.integers(0, 255),
)
def test_drawn_defect_mask_is_exactly_the_altered_pixels(seed: int, side: int, defect_type: str, grey: int) -> None:
    rng = np.random.default_rng(seed)
    texture = np.random.default_rng(seed + 1).integers(0, 256, size=(side, side, 3), dtype=np.uint8)
    texture[: side // 4] = grey  # a flat region: extreme and mid greys must change too
    defective, mask = _draw_defect(texture, defect_type, rng)
    changed = np.abs(defective.astype(int) - texture.astype(int))
    assert mask.any()
    assert np.array_equal(changed.any(axis=2), mask)
    assert changed[mask].min() >= 70


def test_written_masks_match_the_drawn_defects(tmp_path: Path) -> None:
    (folder,) = prepare_textures(tmp_path, seed=2, **SMALL_TEXTURES)
    bands = texture_bands(load_texture("brick"))
    for index in range(SMALL_TEXTURES["n_test_defect"]):
        kind = DEFECT_TYPES[index % len(DEFECT_TYPES)]
        normal, defective, mask = render_defective(bands["test"], 2, "brick", index, kind, 160, 64)
        name = f"{index // len(DEFECT_TYPES):03d}"
        on_disk = np.asarray(Image.open(folder / "test" / kind / f"{name}.png"))
        mask_on_disk = np.asarray(Image.open(folder / "ground_truth" / kind / f"{name}_mask.png"))
        assert np.array_equal(on_disk, defective)
        assert np.array_equal(mask_on_disk > 0, (on_disk != normal).any(axis=2))
        assert set(np.unique(mask_on_disk)) == {0, 255}
        assert np.array_equal(mask_on_disk > 0, mask)


def test_make_tiny_mvtec_returns_the_dataset_root(tmp_path: Path) -> None:
    root = make_tiny_mvtec(tmp_path / "tiny")
    assert root == tmp_path / "tiny"
    assert len(list((root / "brick").rglob("*.png"))) == 8 + 4 + 4 + 4
    assert listed_names(root / "brick" / "test") == {"good", "stain"}


@pytest.mark.parametrize(
    "arguments",
    [{"categories": ["carpet"]}, {"defect_types": []}, {"n_test_defect": 0}, {"crop_size": 300}],
)
def test_bad_texture_options_are_refused_before_writing(tmp_path: Path, arguments: dict) -> None:
    with pytest.raises(DatasetPrepareError):
        prepare_textures(tmp_path, **{**SMALL_TEXTURES, **arguments})
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("arguments", [{"categories": ["elpv_thin_film"]}, {"max_per_split": 0}])
def test_bad_elpv_options_are_refused(tmp_path: Path, arguments: dict) -> None:
    with pytest.raises(DatasetPrepareError):
        prepare_elpv(tmp_path, **arguments)
    assert not any(tmp_path.iterdir())


def test_cli_prepares_elpv_subset(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["data", "prepare", "elpv", "--root", str(tmp_path), "--max-per-split", "2", "--categories", "elpv_poly"]
    assert run_cli(argv) == 0
    assert "elpv_poly: written (train/good=2, test/defective=2, test/good=2)" in capsys.readouterr().out
    (tmp_path / "elpv_poly" / "mine.txt").write_text("user notes")
    assert run_cli(argv) == 2
    assert "did not write" in capsys.readouterr().err


def test_mvtecad_datamodule_reads_textures_with_masks(tmp_path: Path) -> None:
    prepare_textures(tmp_path, seed=0, **SMALL_TEXTURES)
    datamodule = MVTecAD(root=tmp_path, category="brick", num_workers=0, train_batch_size=3, eval_batch_size=4)
    datamodule.setup()
    train = list(datamodule.train_dataloader())
    assert sum(len(batch.image) for batch in train) == SMALL_TEXTURES["n_train"]
    assert not any(batch.gt_label.any() for batch in train)
    seen = 0
    for batch in list(datamodule.test_dataloader()):
        assert batch.image.shape[1:] == (3, 64, 64)
        for path, label, mask in zip(batch.image_path, batch.gt_label, batch.gt_mask, strict=True):
            folder = Path(path).parent.name
            assert bool(label) == (folder != "good")
            if folder == "good":
                assert not mask.any()
            else:
                expected = np.asarray(
                    Image.open(tmp_path / "brick" / "ground_truth" / folder / f"{Path(path).stem}_mask.png")
                )
                assert mask.any()
                assert np.array_equal(mask.numpy().astype(bool), expected > 0)
            seen += 1
    assert seen == SMALL_TEXTURES["n_test_good"] + SMALL_TEXTURES["n_test_defect"]


def test_mvtecad_datamodule_reads_elpv_subset(tmp_path: Path) -> None:
    prepare_elpv(tmp_path, seed=0, max_per_split=3, categories=["elpv_mono"])
    datamodule = MVTecAD(root=tmp_path, category="elpv_mono", num_workers=0, eval_batch_size=8)
    datamodule.setup()
    (batch,) = list(datamodule.test_dataloader())
    labels = {
        Path(path).name: (bool(label), mask)
        for path, label, mask in zip(batch.image_path, batch.gt_label, batch.gt_mask, strict=True)
    }
    truth = {name: p == 1.0 for name, p, _ in elpv_labels()}
    assert len(labels) == 6
    for name, (label, mask) in labels.items():
        assert label == truth[name]
        assert bool(mask.all()) == label  # whole-image masks for defective cells, none for functional
    assert batch.image.shape[1:] == (3, 300, 300)
