"""The split's file, `artifacts/split.json`: its typed schema, save and load
(README "The stages"). Written by `split`, read by `extract` and the Python API."""

import hashlib
import json
from pathlib import Path
from typing import TypedDict

from pipeline.data.images import DataError
from pipeline.project.files import write_json


class SplitRow(TypedDict):
    path: str
    label: str
    sha256: str  # the content hash: an image's identity, whatever its name
    width: int
    height: int
    split: str  # train, validation or test


class SkippedFile(TypedDict):
    path: str
    reason: str


class Split(TypedDict):
    labels: list[str]
    validation_fraction: float
    seed: int
    images: list[SplitRow]
    skipped: list[SkippedFile]
    warnings: list[str]


def save_split(path: str | Path, split: Split) -> None:
    write_json(path, split)


def load_split(path: str | Path) -> Split:
    """The split at `path`; a DataError naming the file when it is not one."""
    try:
        split = json.loads(Path(path).read_text(encoding="utf-8"))
        missing = set(Split.__annotations__) - set(split)
        row_fields = set(SplitRow.__annotations__)
        if missing or any(not row_fields <= set(row) for row in split["images"]):
            raise ValueError(f"missing fields {sorted(missing) or sorted(row_fields)}")
    except FileNotFoundError:
        raise DataError(f"{path} not found: run the split stage first (dvc repro)") from None
    except (ValueError, TypeError, KeyError) as error:
        raise DataError(f"{path} is not a split file ({error}): delete it and run dvc repro") from None
    return split


def split_digest(split: Split) -> str:
    """What the feature table and the checkpoint record of the split they came from."""
    return hashlib.sha256(json.dumps(split["images"], sort_keys=True).encode()).hexdigest()


def previous_split(path: str | Path) -> Split | None:
    """The last split at `path`, if there is one."""
    return load_split(path) if Path(path).is_file() else None
