"""Stage `split`: which images train, which validate, which test (README "The stages").

Images are identified by content hash, so renaming a file changes nothing and
duplicates of one image always land together. The split is committed to git
(reviewable, and the memory that keeps old images where they were when new
ones arrive).
"""

import hashlib
import json
import logging
from collections import Counter
from pathlib import Path

from omegaconf import DictConfig

from pipeline.config import stage_entry
from pipeline.data_checks import data_warnings
from pipeline.files import write_json
from pipeline.images import DataError, LabelledImage, Skipped, scan_labelled_folder

log = logging.getLogger(__name__)


def auto_validation_fraction(n_images: int) -> float:
    """Create ML's rule for the automatic validation set."""
    if n_images < 50:
        return 0.0
    return 0.10 if n_images < 200 else 0.05


def validation_fraction(setting: str | float, n_images: int) -> float:
    if setting == "auto":
        return auto_validation_fraction(n_images)
    fraction = float(setting)
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"split.validation must be 'auto' or a fraction in [0, 1), got {setting}")
    return fraction


def hash_unit_interval(sha256: str, seed: int) -> float:
    digest = hashlib.sha256(f"{seed}:{sha256}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def choose_validation(
    train: list[LabelledImage], fraction: float, seed: int, previous: dict[str, str]
) -> set[str]:
    """Content hashes of the validation images: per label, round(fraction * n) of them.

    Images already assigned in `previous` (sha256 -> split) keep their split, so
    adding images never moves old ones; new images fill each label's quota in
    hash order, which makes a split from scratch reproducible too.
    """
    chosen = set()
    for label in sorted({image.label for image in train}):
        shas = sorted(
            {i.sha256 for i in train if i.label == label}, key=lambda s: hash_unit_interval(s, seed)
        )
        kept = [sha for sha in shas if previous.get(sha) == "validation"]
        new = [sha for sha in shas if sha not in previous]
        missing = max(0, round(fraction * len(shas)) - len(kept))
        chosen.update(kept + new[:missing])
    return chosen


def previous_assignments(path: Path, fraction: float, seed: int) -> dict[str, str]:
    """The last split's sha256 -> split, if it was made with the same settings."""
    if not path.is_file():
        return {}
    last = json.loads(path.read_text(encoding="utf-8"))
    if last.get("validation_fraction") != fraction or last.get("seed") != seed:
        return {}
    return {row["sha256"]: row["split"] for row in last["images"] if row["split"] != "test"}


def previously_verified(path: Path) -> set[str]:
    """Content hashes the last split decoded in full: they need not be decoded again."""
    if not path.is_file():
        return set()
    return {row["sha256"] for row in json.loads(path.read_text(encoding="utf-8"))["images"]}


def assign_splits(train: list[LabelledImage], test: list[LabelledImage], validation: set[str]) -> list[dict]:
    rows = [{**vars(i), "split": "validation" if i.sha256 in validation else "train"} for i in train]
    return rows + [{**vars(image), "split": "test"} for image in test]


def check_trainable(train_dir: Path, train: list[LabelledImage]) -> None:
    labels = {image.label for image in train}
    folders = sorted(p.name for p in train_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    empty = [name for name in folders if name not in labels]
    if empty:
        raise DataError(f"label folder has no usable image: {train_dir / empty[0]}")
    if len(labels) < 2:
        raise DataError(f"need at least 2 label folders with images in {train_dir}, found {len(labels)}")


def make_split(cfg: DictConfig) -> dict:
    """The split table and the data report for the folders in `cfg.data`."""
    train_dir = Path(cfg.data.train_dir)
    if not train_dir.is_dir():
        raise DataError(f"training folder not found: {train_dir}")
    verified = previously_verified(Path(cfg.paths.split))
    train, skipped = scan_labelled_folder(train_dir, cfg.data.max_image_pixels, verified)
    check_trainable(train_dir, train)
    test: list[LabelledImage] = []
    if cfg.data.test_dir and Path(cfg.data.test_dir).is_dir():
        test, skipped_test = scan_labelled_folder(
            Path(cfg.data.test_dir), cfg.data.max_image_pixels, verified
        )
        skipped += skipped_test
        labels = {image.label for image in train}
        for image in [i for i in test if i.label not in labels]:
            skipped.append(Skipped(image.path, f"test label '{image.label}' has no training folder"))
        test = [image for image in test if image.label in labels]
    fraction = validation_fraction(cfg.split.validation, len(train))
    previous = previous_assignments(Path(cfg.paths.split), fraction, cfg.split.seed)
    validation = choose_validation(train, fraction, cfg.split.seed, previous)
    return {
        "labels": sorted({image.label for image in train}),
        "validation_fraction": fraction,
        "seed": cfg.split.seed,
        "images": assign_splits(train, test, validation),
        "skipped": [vars(s) for s in skipped],
        "warnings": data_warnings(train, test),
    }


def data_report(split: dict) -> dict:
    counts = Counter((row["split"], row["label"]) for row in split["images"])
    per_split: dict[str, dict[str, int]] = {}
    for (name, label), n in sorted(counts.items()):
        per_split.setdefault(name, {})[label] = n
    return {"images": per_split, "skipped": split["skipped"], "warnings": split["warnings"]}


def run(cfg: DictConfig) -> None:
    split = make_split(cfg)
    for item in split["skipped"]:
        log.warning("skipped %s: %s", item["path"], item["reason"])
    for warning in split["warnings"]:
        log.warning("%s", warning)
    report = data_report(split)
    for name, labels in report["images"].items():
        log.info("%s: %s", name, ", ".join(f"{label} {n}" for label, n in labels.items()))
    write_json(cfg.paths.split, split)
    write_json(cfg.paths.data_report, report)


main = stage_entry(run)

if __name__ == "__main__":
    main()
