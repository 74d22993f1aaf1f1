"""Which images train, which validate, which test (docs/pipeline.md).

Images are identified by content hash, so renaming or moving a file changes
nothing and duplicates of one image always land together. The last split's table
is the memory that keeps old images where they were when new ones arrive.
"""

import hashlib

from pipeline.data.checks import data_warnings
from pipeline.data.images import DataError, LabelledImage, Skipped
from pipeline.data.split_file import Split, SplitRow, counts, first


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

    A training image in `previous` (sha256 -> split) stays in training, so adding
    images never moves one into validation, even when Create ML's rule lowers the
    fraction as the set grows; a smaller quota returns validation images to
    training. New images fill each label's quota in hash order, which makes a split
    from scratch reproducible too.
    """
    chosen = set()
    for label in sorted({image.label for image in train}):
        shas = sorted(
            {i.sha256 for i in train if i.label == label}, key=lambda s: hash_unit_interval(s, seed)
        )
        quota = round(fraction * len(shas))
        kept = [sha for sha in shas if previous.get(sha) == "validation"][:quota]
        new = [sha for sha in shas if sha not in previous]
        chosen.update(kept + new[: quota - len(kept)])
    return chosen


def previous_assignments(last: Split | None, setting: str | float, seed: int) -> dict[str, str]:
    """The last split's sha256 -> split, if it was made with the same settings (a new
    `split.validation` or `split.seed` asks for a new split)."""
    if last is None or last["validation_setting"] != setting or last["seed"] != seed:
        return {}
    return {row["sha256"]: row["split"] for row in last["images"] if row["split"] != "test"}


def previously_verified(last: Split | None) -> set[str]:
    """Content hashes the last split decoded in full: they need not be decoded again."""
    return set() if last is None else {row["sha256"] for row in last["images"]}


def rows(images: list[LabelledImage], split_of) -> list[SplitRow]:
    return [SplitRow(**vars(image), split=split_of(image)) for image in images]


def check_trainable(train: list[LabelledImage], source: str) -> None:
    labels = {image.label for image in train}
    if len(labels) < 2:
        raise DataError(f"need at least 2 labels with usable images in {source}, found {len(labels)}")


def make_split(
    train: list[LabelledImage],
    test: list[LabelledImage],
    skipped: list[Skipped],
    validation_setting: str | float,
    seed: int,
    previous: dict[str, str] | None = None,
    validation: list[LabelledImage] | None = None,
) -> Split:
    """The split table: `validation` images when given, else a fraction of `train`
    chosen by `validation_setting` (Create ML's rule for `auto`), keeping where they
    were the images of `previous` (the last split's `previous_assignments`). Test
    images of a label with no training image are skipped."""
    labels = sorted({image.label for image in train})
    skipped = list(skipped) + [
        Skipped(image.path, f"label '{image.label}' has no training images")
        for image in [*(validation or []), *test]
        if image.label not in labels
    ]
    test = [image for image in test if image.label in labels]
    if validation is not None:
        fraction, chosen = 0.0, set()
        validation = [image for image in validation if image.label in labels]
    else:
        fraction = validation_fraction(validation_setting, len(train))
        chosen = choose_validation(train, fraction, seed, previous or {})
        validation = []
    return Split(
        labels=labels,
        validation_setting=validation_setting,
        validation_fraction=fraction,
        seed=seed,
        images=rows(train, lambda i: "validation" if i.sha256 in chosen else "train")
        + rows(validation, lambda i: "validation")
        + rows(test, lambda i: "test"),
        skipped=[vars(s) for s in skipped],
        warnings=data_warnings(train, test),
    )


def data_report(split: Split) -> dict:
    """reports/data_report.json: images per split and label, and the first skipped
    files and warnings with the count of each (the log lists them all)."""
    return {
        "images": counts(split),
        **first(split["skipped"], "skipped"),
        **first(split["warnings"], "warnings"),
    }
