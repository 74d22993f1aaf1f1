"""Stage `split`: which images train, which validate, which test (docs/pipeline.md).

Its summary is committed to git, reviewable; its per-image table is tracked by DVC
and is the memory that keeps old images where they were when new ones arrive
(pipeline/data/split_file.py, pipeline/data/splitting.py).
"""

import logging
from pathlib import Path

from omegaconf import DictConfig

from pipeline.data.images import DataError, LabelledImage
from pipeline.data.manifest import images_in, is_manifest
from pipeline.data.split_file import previous_split, save_split
from pipeline.data.splitting import (
    check_trainable,
    data_report,
    make_split,
    previous_assignments,
    previously_verified,
)
from pipeline.data.storage import data_path, is_folder, label_folder_names
from pipeline.project.config import stage_entry
from pipeline.project.files import write_json

log = logging.getLogger(__name__)


def check_label_folders(train_dir: str | Path, train: list[LabelledImage]) -> None:
    labels = {image.label for image in train}
    empty = [name for name in label_folder_names(train_dir) if name not in labels]
    if empty:
        raise DataError(f"label folder has no usable image: {train_dir}/{empty[0]}")
    if len(labels) < 2:
        raise DataError(f"need at least 2 label folders with images in {train_dir}, found {len(labels)}")


def run(cfg: DictConfig) -> None:
    train_dir = data_path(cfg.data.train_dir)  # a folder, an s3:// folder or a manifest
    if not (is_folder(train_dir) or is_manifest(train_dir)):
        raise DataError(f"training folder not found: {train_dir}")
    last = previous_split(cfg.paths.split, cfg.paths.split_table)
    verified = previously_verified(last)
    previous = previous_assignments(last, cfg.split.validation, cfg.split.seed)
    del last  # every image's row as a dict: let go before the new rows are made
    train, skipped = images_in(train_dir, cfg.data.max_image_pixels, verified)
    if is_manifest(train_dir):
        check_trainable(train, str(train_dir))
    else:
        check_label_folders(train_dir, train)
    test = []
    test_dir = data_path(cfg.data.test_dir) if cfg.data.test_dir else None
    if test_dir and (is_folder(test_dir) or is_manifest(test_dir)):
        test, skipped_test = images_in(test_dir, cfg.data.max_image_pixels, verified)
        skipped += skipped_test
    split = make_split(train, test, skipped, cfg.split.validation, cfg.split.seed, previous)
    for item in split["skipped"]:
        log.warning("skipped %s: %s", item["path"], item["reason"])
    for warning in split["warnings"]:
        log.warning("%s", warning)
    report = data_report(split)
    for name, labels in report["images"].items():
        log.info("%s: %s", name, ", ".join(f"{label} {n}" for label, n in labels.items()))
    save_split(cfg.paths.split, cfg.paths.split_table, split)
    write_json(cfg.paths.data_report, report)


main = stage_entry(run, "split")

if __name__ == "__main__":
    main()
