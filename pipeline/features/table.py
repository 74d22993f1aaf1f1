"""The feature table, `artifacts/features.npz`: its typed schema, save and load
(README "The stages"). One row per image of the split and per augmented copy of a
training image, in the split's order; `extract` writes it, `train` and `evaluate`
read it."""

import json
from pathlib import Path
from typing import TypedDict

import numpy as np

from pipeline.data.images import DataError
from pipeline.project.files import write_atomically


class TableMeta(TypedDict):
    extractor: dict  # the feature cache's description (name, fingerprint, crop_and_scale, ...) and dim
    labels: list[str]
    split_sha256: str  # pipeline.data.split_file.split_digest of the split it was built from
    copies: list[str]  # the augmented copies' keys, in order
    skipped: list[dict]  # images that failed to decode: path, reason


class FeatureTable(TypedDict):
    features: np.ndarray  # (rows, dim) float32
    label_index: np.ndarray  # (rows,) int, into meta["labels"]
    split: np.ndarray  # (rows,) train, validation or test
    path: np.ndarray  # (rows,) the image file
    sha256: np.ndarray  # (rows,) its content hash
    copy: np.ndarray  # (rows,) the augmented copy's key; "" for the image itself
    meta: TableMeta


ARRAYS = [name for name in FeatureTable.__annotations__ if name != "meta"]


def originals(table: FeatureTable) -> FeatureTable:
    """`table` without the augmented copies: what accuracy is measured on."""
    keep = table["copy"] == ""
    return FeatureTable(**{name: table[name][keep] for name in ARRAYS}, meta=table["meta"])


def save_table(path: str | Path, table: FeatureTable) -> None:
    arrays = {name: table[name] for name in ARRAYS}
    meta = np.array(json.dumps(table["meta"], ensure_ascii=False))

    def write(temporary: Path) -> None:
        with temporary.open("wb") as file:  # a file, not a name: np.savez would append .npz to it
            np.savez(file, meta=meta, **arrays)

    write_atomically(path, write)


def load_table(path: str | Path) -> FeatureTable:
    """The table at `path`; a DataError naming the file when it is damaged or not one."""
    try:
        with np.load(path) as data:
            table = FeatureTable(**{name: data[name] for name in ARRAYS}, meta=json.loads(str(data["meta"])))
    except FileNotFoundError:
        raise DataError(f"{path} not found: run the extract stage first (dvc repro)") from None
    except Exception as error:  # numpy and zipfile raise many types for a damaged file
        raise DataError(f"{path} is damaged ({type(error).__name__}): delete it and run dvc repro") from None
    rows = len(table["features"])
    if any(len(table[name]) != rows for name in ARRAYS) or not np.isfinite(table["features"]).all():
        raise DataError(
            f"{path} is damaged (uneven columns or non-finite features): delete it and run dvc repro"
        )
    return table
