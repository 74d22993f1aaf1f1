"""The feature cache's promises (docs/pipeline.md): each image is extracted once per
extractor and augmentation, ever, and a killed run leaves nothing half-written."""

import hashlib
import logging
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from contextlib import closing
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, make_dataset, project_env, with_exported_backbone

from pipeline import extract, split
from pipeline.data.images import load_rgb, to_square
from pipeline.features.augment import AUGMENTATIONS, augmented, planned_copies
from pipeline.features.cache import FeatureCache
from pipeline.features.runtime import onnx_runner, torch_runner
from pipeline.features.table import load_table
from pipeline.project.config import compose_config, output_overrides

DEMO_IMAGES = sorted((REPO / "data/demo/train").rglob("*.jpg"))[::40]


def decoded(paths) -> np.ndarray:
    return np.stack([to_square(load_rgb(path, 224), 224, "centerCrop") for path in paths])


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def cache_entries(cfg) -> dict[str, int]:
    """Cache entry -> when it was written (ns): what exists, and what was rewritten."""
    with FeatureCache(cfg.paths.feature_cache, cfg.extractor, cfg.extract.crop_and_scale) as cache:
        database = cache.dir / "features.sqlite"
    with closing(sqlite3.connect(database)) as db:
        return dict(db.execute("SELECT key, written_ns FROM vectors"))


def overrides_for(tmp_path: Path, *extra: str) -> list[str]:
    return [
        *output_overrides(tmp_path / "out"),
        f"data.train_dir={tmp_path / 'data/train'}",
        f"data.test_dir={tmp_path / 'data/test'}",
        "extract.batch_size=8",
        "augment.flip=0",  # originals only, unless a test asks for copies
        *extra,
    ]


def split_and_extract(cfg) -> dict:
    split.run(cfg)
    extract.run(cfg)
    return load_table(cfg.paths.features)


def test_default_features_pool_every_stage_and_onnxruntime_matches_torch(exported_backbone):
    """The default (v2) features are v1's last 1280 plus each stage's mean and spread,
    and the ONNX graph that `extract` runs computes exactly them."""
    v2, v1 = compose_config().extractor, compose_config("extractor=v1").extractor
    pixels = decoded(DEMO_IMAGES)
    fast, reference = onnx_runner(v2, exported_backbone)(pixels), torch_runner(v2)(pixels)
    assert fast.shape == reference.shape == (len(DEMO_IMAGES), 2 * 784 + 1280)
    # relative too: the middle stages' features run to about 10, the last layer's to 3
    assert np.allclose(fast, reference, rtol=1e-4, atol=1e-4)
    assert np.allclose(reference[:, -1280:], torch_runner(v1)(pixels), atol=1e-5)
    spreads = reference[:, 16 : 2 * 16]  # the first stage's: 16 channels, mean then spread
    assert (spreads > 0).all()  # a spread, not another mean: no 2 images are flat


def test_only_new_images_are_extracted_and_renames_extract_nothing(tmp_path, exported_backbone):
    make_dataset(tmp_path / "data/train", per_label=8)
    cfg = with_exported_backbone(compose_config(*overrides_for(tmp_path)), exported_backbone)
    split_and_extract(cfg)
    first = cache_entries(cfg)
    assert len(first) == 24

    added = make_dataset(tmp_path / "data/train", per_label=1, start=8)
    split_and_extract(cfg)
    second = cache_entries(cfg)
    assert set(second) - set(first) == {sha256(path) for path in added}
    assert {key: second[key] for key in first} == first  # nothing extracted again

    renamed = tmp_path / "data/train/red/renamed.png"
    (tmp_path / "data/train/red/red_0.png").rename(renamed)
    moved = tmp_path / "data/train/green/deeper/green_0.png"
    moved.parent.mkdir()
    (tmp_path / "data/train/green/green_0.png").rename(moved)
    table = split_and_extract(cfg)
    assert cache_entries(cfg) == second
    assert {str(renamed), str(moved)} <= set(table["path"])
    assert len(table["path"]) == 27


def test_killed_extraction_resumes_and_never_reads_a_partial_entry(tmp_path, exported_backbone, caplog):
    images = make_dataset(tmp_path / "data/train", per_label=100)
    overrides = overrides_for(tmp_path)
    cfg = with_exported_backbone(compose_config(*overrides), exported_backbone)
    split.run(cfg)
    stage = subprocess.Popen(
        [sys.executable, "-m", "pipeline.extract", *overrides],
        cwd=REPO,
        env=project_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    while len(cache_entries(cfg)) < 40:
        assert stage.poll() is None, "extraction finished before it could be killed"
        time.sleep(0.01)
    stage.kill()
    stage.wait()
    before_resume = cache_entries(cfg)  # SQLite rolls back a batch the kill cut short
    assert 40 <= len(before_resume) < len(images)

    with caplog.at_level(logging.INFO, logger="pipeline"):
        extract.run(cfg)
    assert f"extracted {len(images) - len(before_resume)} new feature vectors" in caplog.text
    after = cache_entries(cfg)
    assert {key: after[key] for key in before_resume} == before_resume
    table = load_table(cfg.paths.features)
    order = [table["path"].tolist().index(str(path)) for path in images]
    expected = onnx_runner(cfg.extractor, exported_backbone)(decoded(images))
    assert np.abs(table["features"][order] - expected).max() < 1e-5


def test_augmented_copies_are_cached_per_augmentation_for_training_images_only(tmp_path, exported_backbone):
    make_dataset(tmp_path / "data/train", per_label=10)
    make_dataset(tmp_path / "data/test", per_label=2, start=100)
    options = overrides_for(tmp_path, "split.validation=0.2")
    cfg = with_exported_backbone(
        compose_config(*options, "augment.flip=2", "augment.noise=1"), exported_backbone
    )
    table = split_and_extract(cfg)
    copies = table["copy"] != ""
    n_train = int((table["split"][~copies] == "train").sum())
    assert Counter(table["split"][~copies].tolist()) == {
        "train": n_train,
        "validation": 30 - n_train,
        "test": 6,
    }
    assert set(table["split"][copies]) == {"train"}
    assert Counter(key.split("-")[0] for key in table["copy"][copies]) == {
        "flip0": n_train,
        "flip1": n_train,
        "noise0": n_train,
    }
    image = table["path"][copies][0]
    versions = table["features"][table["path"] == image]  # the original and its three copies
    gaps = [np.abs(versions[i] - versions[j]).max() for i in range(4) for j in range(i)]
    assert len(versions) == 4 and min(gaps) > 0.01

    entries = cache_entries(cfg)
    cfg = compose_config(*options, "augment.flip=2", "augment.noise=2")
    extract.run(cfg)
    new = set(cache_entries(cfg)) - set(entries)
    assert len(new) == n_train and all("-noise1-" in key for key in new)

    entries = cache_entries(cfg)
    cfg = compose_config(*options, "augment.flip=2", "augment.noise=2", "augment.seed=1")
    extract.run(cfg)
    after = cache_entries(cfg)
    assert len(set(after) - set(entries)) == 4 * n_train  # every copy drawn again, no original
    assert {key: after[key] for key in entries} == entries


@pytest.mark.parametrize("name", AUGMENTATIONS)
def test_each_augmentation_changes_the_image_the_same_way_every_time(name):
    (copy,) = planned_copies(compose_config("augment.flip=0", f"augment.{name}=1").augment)
    pixels = decoded(DEMO_IMAGES[:1])[0]
    once, again = augmented(pixels, "ab" * 32, copy), augmented(pixels, "ab" * 32, copy)
    assert once.shape == pixels.shape and once.dtype == np.uint8
    assert np.array_equal(once, again)
    assert np.abs(once.astype(int) - pixels).mean() > 1.0
