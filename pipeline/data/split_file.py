"""The split's files (docs/pipeline.md): its typed schema, save and load.
Written by `split`, read by `extract` and the next `split`.

Two files, so that nothing in git grows with the number of images:
- the table, `artifacts/split.parquet`: one row per image (path, label, content
  hash, size, split), tracked by DVC; it is also the memory that keeps old images
  in their split as new ones arrive;
- the summary, `artifacts/split.json`, in git: the settings, images per split and
  label, the table's hash, and the first skipped files and warnings with the count
  of the rest. Its diff in a pull request shows what a data change did.
"""

import hashlib
import json
import logging
from collections import Counter
from pathlib import Path
from typing import TypedDict

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.data.images import DataError
from pipeline.project.files import write_atomically, write_json

log = logging.getLogger(__name__)

LISTED = 20  # skipped files and warnings the summary and the data report list; the log has all


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
    validation_setting: str | float  # split.validation: auto or a fraction
    validation_fraction: float
    seed: int
    images: list[SplitRow]
    skipped: list[SkippedFile]
    warnings: list[str]


TABLE_SCHEMA = pa.schema(
    [
        ("path", pa.string()),
        ("label", pa.string()),
        ("sha256", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("split", pa.string()),
    ]
)


DIGEST_ROWS = 10_000  # rows serialised at a time for the digest


def split_digest(split: Split) -> str:
    """What the summary, the feature table and the checkpoint record of the split: the
    hash of its rows as one JSON list, fed to the hash a slice of rows at a time (the
    whole list as one string cost a million-image `split` 0.4 GB), to the same bytes."""
    digest, images = hashlib.sha256(b"["), split["images"]
    for start in range(0, len(images), DIGEST_ROWS):
        rows = json.dumps(images[start : start + DIGEST_ROWS], sort_keys=True)[1:-1]  # without [ ]
        digest.update(((", " if start else "") + rows).encode())
    digest.update(b"]")
    return digest.hexdigest()


def counts(split: Split) -> dict[str, dict[str, int]]:
    """Images per split and label."""
    per_split: dict[str, dict[str, int]] = {}
    for (name, label), n in sorted(Counter((r["split"], r["label"]) for r in split["images"]).items()):
        per_split.setdefault(name, {})[label] = n
    return per_split


def first(items: list, name: str) -> dict:
    """A list cut to its first LISTED items, with the count of all of them."""
    return {name: items[:LISTED], f"{name}_count": len(items)}


def summary(split: Split) -> dict:
    return {
        "labels": split["labels"],
        "validation_setting": split["validation_setting"],
        "validation_fraction": split["validation_fraction"],
        "seed": split["seed"],
        "images": counts(split),
        "table_sha256": split_digest(split),
        **first(split["skipped"], "skipped"),
        **first(split["warnings"], "warnings"),
    }


def save_split(summary_path: str | Path, table_path: str | Path, split: Split) -> None:
    """The table first: a summary always names a table that is whole."""
    table = pa.Table.from_pylist(split["images"], schema=TABLE_SCHEMA)
    table = table.replace_schema_metadata(
        {"skipped": json.dumps(split["skipped"]), "warnings": json.dumps(split["warnings"])}
    )
    write_atomically(table_path, lambda temporary: pq.write_table(table, temporary))
    write_json(summary_path, summary(split))


def load_split(summary_path: str | Path, table_path: str | Path) -> Split:
    """The split; a DataError naming the file when it is missing, damaged, or the
    table is not the one the summary describes."""
    try:
        about = json.loads(Path(summary_path).read_text(encoding="utf-8"))
        table = pq.read_table(table_path)
        if not table.schema.remove_metadata().equals(TABLE_SCHEMA):
            raise ValueError("unexpected columns")
        extra = table.schema.metadata or {}
        split = Split(
            labels=about["labels"],
            validation_setting=about["validation_setting"],
            validation_fraction=about["validation_fraction"],
            seed=about["seed"],
            images=table.to_pylist(),
            skipped=json.loads(extra.get(b"skipped", b"[]")),
            warnings=json.loads(extra.get(b"warnings", b"[]")),
        )
    except FileNotFoundError as error:
        raise DataError(
            f"{error.filename or table_path} not found: run the split stage (dvc repro)"
        ) from None
    except (ValueError, TypeError, KeyError, OSError, pa.ArrowException) as error:
        reason = type(error).__name__
        raise DataError(
            f"{summary_path} or {table_path} is damaged ({reason}): delete both and run dvc repro"
        ) from None
    if split_digest(split) != about["table_sha256"]:
        raise DataError(
            f"{table_path} is not the table {summary_path} describes: "
            "dvc checkout (or dvc pull) it, or delete both and run dvc repro"
        )
    return split


def recorded_digest(summary_path: str | Path) -> str:
    """The split's digest as its summary records it, without reading the table:
    what a stage compares with the feature table's before trusting it."""
    try:
        return str(json.loads(Path(summary_path).read_text(encoding="utf-8"))["table_sha256"])
    except FileNotFoundError:
        raise DataError(f"{summary_path} not found: run the split stage (dvc repro)") from None
    except (ValueError, TypeError, KeyError, OSError) as error:
        raise DataError(
            f"{summary_path} is damaged ({type(error).__name__}): delete it and run dvc repro"
        ) from None


def previous_split(summary_path: str | Path, table_path: str | Path) -> Split | None:
    """The last split, if there is one and it can be read. Without it the split is
    made from scratch, which is safe: in content-hash order, no training image moves
    into validation (pipeline/data/splitting.py). A missing table is a clone before
    `dvc pull`; an unreadable one, a damaged file or an older version's."""
    if not (Path(summary_path).is_file() and Path(table_path).is_file()):
        return None
    try:
        return load_split(summary_path, table_path)
    except DataError:  # its message would say to delete the files: this run replaces them
        log.warning(
            "the last split (%s, %s) cannot be read: splitting from scratch", summary_path, table_path
        )
        return None
