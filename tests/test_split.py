import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from conftest import REPO, make_dataset, project_env, write_image

from pipeline import split as split_stage
from pipeline.data.images import DataError
from pipeline.data.split_file import load_split
from pipeline.data.splitting import auto_validation_fraction


def make_split(cfg, remember_last: bool = False) -> dict:
    """The split stage's output; from scratch unless `remember_last`."""
    if not remember_last:
        Path(cfg.paths.split_table).unlink(missing_ok=True)
    split_stage.run(cfg)
    return load_split(cfg.paths.split, cfg.paths.split_table)


def splits_by_path(split: dict) -> dict[str, str]:
    return {row["path"]: row["split"] for row in split["images"]}


def validation_per_label(split: dict) -> dict[str, int]:
    return dict(Counter(row["label"] for row in split["images"] if row["split"] == "validation"))


def test_auto_fraction_follows_create_ml():
    assert [auto_validation_fraction(n) for n in (10, 49, 50, 199, 200, 5000)] == [0, 0, 0.1, 0.1, 0.05, 0.05]


def test_validation_is_stratified(cfg_factory, tmp_path):
    make_dataset(tmp_path / "train", per_label=40)
    cfg = cfg_factory(f"data.train_dir={tmp_path / 'train'}", "data.test_dir=null")
    split = make_split(cfg)
    assert split["validation_fraction"] == 0.1  # 120 images
    assert validation_per_label(split) == {"red": 4, "green": 4, "blue": 4}


def test_new_images_never_move_existing_ones(cfg_factory, tmp_path):
    make_dataset(tmp_path / "train", per_label=40)
    cfg = cfg_factory(f"data.train_dir={tmp_path / 'train'}", "data.test_dir=null", "split.validation=0.2")
    before = make_split(cfg)
    make_dataset(tmp_path / "train", per_label=20, start=40)
    after = splits_by_path(make_split(cfg, remember_last=True))
    assert all(after[path] == split for path, split in splits_by_path(before).items())
    assert list(after.values()).count("validation") == round(0.2 * 60) * 3


def test_growing_past_create_mls_threshold_never_moves_a_training_image_into_validation(
    cfg_factory, tmp_path
):
    make_dataset(tmp_path / "train", per_label=45)  # 135 images: auto gives 10 %
    cfg = cfg_factory(f"data.train_dir={tmp_path / 'train'}", "data.test_dir=null")
    before = make_split(cfg)
    make_dataset(tmp_path / "train", per_label=25, start=45)  # 210 images: auto gives 5 %
    after = make_split(cfg, remember_last=True)
    assert (before["validation_fraction"], after["validation_fraction"]) == (0.1, 0.05)
    now = splits_by_path(after)
    assert all(now[path] == "train" for path, split in splits_by_path(before).items() if split == "train")
    assert validation_per_label(after) == {"red": 4, "green": 4, "blue": 4}


def test_split_is_reproducible_and_ignores_names(cfg_factory, tmp_path):
    paths = make_dataset(tmp_path / "train", per_label=30)
    cfg = cfg_factory(f"data.train_dir={tmp_path / 'train'}", "data.test_dir=null", "split.validation=0.3")
    first = make_split(cfg)
    assert make_split(cfg) == first
    by_sha = {row["sha256"]: row["split"] for row in first["images"]}
    paths[0].rename(paths[0].with_name("renamed.png"))
    assert {row["sha256"]: row["split"] for row in make_split(cfg)["images"]} == by_sha


def test_unusable_files_are_listed_not_dropped(cfg_factory, tmp_path):
    make_dataset(tmp_path / "train", per_label=5)
    (tmp_path / "train" / "red" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (tmp_path / "train" / "red" / "notes.jpg").write_text("not an image")
    (tmp_path / "train" / "red" / "empty.png").write_bytes(b"")
    (tmp_path / "train" / "stray.png").write_bytes((tmp_path / "train" / "red" / "red_0.png").read_bytes())
    cfg = cfg_factory(f"data.train_dir={tmp_path / 'train'}", "data.test_dir=null")
    reasons = {item["path"].rsplit("/", 1)[1]: item["reason"] for item in make_split(cfg)["skipped"]}
    assert reasons[".DS_Store"] == "hidden file"
    assert reasons["notes.jpg"].startswith("not a readable image")
    assert reasons["empty.png"] == "empty file"
    assert reasons["stray.png"] == "not inside a label folder"


FATAL_LAYOUTS = [
    ({}, "training folder not found"),
    ({"red": 3}, "need at least 2 label folders"),
    ({"red": 3, "green": 0}, "label folder has no usable image"),
]


def make_layout(train, layout: dict) -> None:
    for label, n in layout.items():
        (train / label).mkdir(parents=True)
        for i in range(n):
            write_image(train / label / f"{i}.png", (100, 100, 100), seed=i)


@pytest.mark.parametrize(("layout", "message"), FATAL_LAYOUTS)
def test_untrainable_data_is_a_clear_error(cfg_factory, tmp_path, layout, message):
    train = tmp_path / "train"
    make_layout(train, layout)
    cfg = cfg_factory(f"data.train_dir={train}", "data.test_dir=null")
    with pytest.raises(DataError, match=message) as error:
        make_split(cfg)
    assert str(train) in str(error.value)


@pytest.mark.parametrize(("layout", "message"), FATAL_LAYOUTS)
def test_fatal_error_exits_with_one_line_and_no_traceback(tmp_path, layout, message):
    train = tmp_path / "train"
    make_layout(train, layout)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline.split",
            f"data.train_dir={train}",
            f"paths.split={tmp_path / 's.json'}",
        ],
        cwd=REPO,
        env=project_env(),
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    lines = (result.stdout + result.stderr).strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in lines[0]
    assert message in lines[0] and str(train) in lines[0]
