"""The feature table, `artifacts/features/` (README "The stages"): its typed schema,
save and load. One row per image of the split and per augmented copy of a training
image, in the split's order; `extract` writes it, `train` and `evaluate` read it.

On disk it is a store that appends, so that neither the DVC cache nor a `dvc push`
grows by more than the new images:
- `shards/<content hash>.parquet`: feature vectors by entry key (the image's
  content hash, and the copy's). A save writes only the vectors no shard holds yet,
  as new shards; a shard's name is the hash of its content, so a shard is never
  rewritten, and one a killed save left half-written is never read (the index is
  written last, atomically, and names only whole shards).
- `index.parquet`: the table's rows (path, label, split, content hash, copy) with
  the shard and row that hold each vector, and the table's description.
Shards no row refers to any more are deleted after the index is written.
"""

import hashlib
import json
from pathlib import Path
from typing import TypedDict

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.data.images import DataError
from pipeline.project.files import write_atomically

SHARD_ROWS = 65_536  # vectors per shard: 320 MB of 1280-wide float32 at most
BATCH_ROWS = 8_192  # vectors read at a time
INDEX = "index.parquet"
SHARDS = "shards"


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
ROW_COLUMNS = [name for name in ARRAYS if name != "features"]


def originals(table: FeatureTable) -> FeatureTable:
    """`table` without the augmented copies: what accuracy is measured on."""
    keep = table["copy"] == ""
    return FeatureTable(**{name: table[name][keep] for name in ARRAYS}, meta=table["meta"])


def entry_keys(table: FeatureTable) -> np.ndarray:
    """What identifies a vector: the image's content hash, and the copy's key."""
    return np.array(
        [
            sha if not copy else f"{sha}-{copy}"
            for sha, copy in zip(table["sha256"], table["copy"], strict=True)
        ]
    )


def shard_keys(store: Path, dim: int) -> dict[str, tuple[str, int]]:
    """Entry key -> (shard name, row) of every `dim`-wide vector the store holds
    (a shard of another width or layout is left unused, and so deleted)."""
    where = {}
    for shard in sorted((store / SHARDS).glob("*.parquet")):
        if pq.read_schema(shard).field("vector").type != pa.binary(dim * 4):
            continue
        for row, key in enumerate(pq.read_table(shard, columns=["key"])["key"].to_pylist()):
            where.setdefault(key, (shard.name, row))
    return where


def write_shard(store: Path, keys: list[str], vectors: np.ndarray) -> str:
    digest = hashlib.sha256("\n".join(keys).encode() + vectors.tobytes()).hexdigest()[:32]
    name = f"{digest}.parquet"
    # Each vector as one fixed-size binary value, not a list of floats: Parquet stores
    # a list with a level per float, and decoding those held three times the vectors.
    width = vectors.shape[1] * 4
    column = pa.FixedSizeBinaryArray.from_buffers(
        pa.binary(width), len(keys), [None, pa.py_buffer(vectors.tobytes())]
    )
    table = pa.table({"key": keys, "vector": column})
    (store / SHARDS).mkdir(parents=True, exist_ok=True)
    write_atomically(
        store / SHARDS / name, lambda temporary: pq.write_table(table, temporary, row_group_size=BATCH_ROWS)
    )
    return name


def save_table(path: str | Path, table: FeatureTable) -> None:
    store = Path(path)
    keys = entry_keys(table)
    where = shard_keys(store, table["features"].shape[1]) if (store / SHARDS).is_dir() else {}
    new = [i for i, key in enumerate(keys) if key not in where]
    for start in range(0, len(new), SHARD_ROWS):
        rows = new[start : start + SHARD_ROWS]
        name = write_shard(store, keys[rows].tolist(), table["features"][rows])
        where.update({keys[i]: (name, offset) for offset, i in enumerate(rows)})
    located = [where[key] for key in keys]
    index = pa.table(
        {
            **{name: table[name].tolist() for name in ROW_COLUMNS},
            "shard": [shard for shard, _ in located],
            "row": [row for _, row in located],
        }
    ).replace_schema_metadata({"meta": json.dumps(table["meta"], ensure_ascii=False)})
    write_atomically(store / INDEX, lambda temporary: pq.write_table(index, temporary))
    used = {shard for shard, _ in located}
    for shard in (store / SHARDS).glob("*.parquet"):
        if shard.name not in used:
            shard.unlink()  # images gone from the split, or an extractor's old features


def gather(store: Path, shards: np.ndarray, rows: np.ndarray, dim: int) -> np.ndarray:
    """The vectors at (shard, row), in order: each shard streamed in batches, each
    vector copied once, straight from Arrow's buffers into the result (reading a
    whole shard at once held about three times its size besides)."""
    features = np.empty((len(rows), dim), np.float32)
    for shard in np.unique(shards):
        wanted = np.flatnonzero(shards == shard)
        start = 0
        for batch in pq.ParquetFile(store / SHARDS / shard).iter_batches(BATCH_ROWS, columns=["vector"]):
            column = batch.column(0)
            vectors = np.frombuffer(
                column.buffers()[1], np.float32, len(column) * dim, column.offset * dim * 4
            )
            vectors = vectors.reshape(-1, dim)  # a view on Arrow's buffer
            here = wanted[(rows[wanted] >= start) & (rows[wanted] < start + len(vectors))]
            features[here] = vectors[rows[here] - start]
            start += len(vectors)
    return features


def load_table(path: str | Path) -> FeatureTable:
    """The table at `path`; a DataError naming the store when it is damaged or not one."""
    store = Path(path)
    try:
        index = pq.read_table(store / INDEX)
        meta = json.loads(index.schema.metadata[b"meta"])
        # strings as numpy's own string type: sorting and comparing object arrays fail or crawl
        columns = {name: np.asarray(index[name].to_pylist()) for name in [*ROW_COLUMNS, "shard", "row"]}
        features = gather(store, columns["shard"], columns["row"], int(meta["extractor"]["dim"]))
    except FileNotFoundError as error:
        missing = Path(error.filename or store / INDEX)
        raise DataError(f"{missing} not found: run the extract stage (dvc repro), or dvc pull it") from None
    except Exception as error:  # pyarrow, json and numpy raise many types for a damaged file
        raise DataError(f"{store} is damaged ({type(error).__name__}): delete it and run dvc repro") from None
    if not np.isfinite(features).all():
        raise DataError(f"{store} is damaged (non-finite features): delete it and run dvc repro")
    columns["label_index"] = columns["label_index"].astype(np.int64)  # an empty table's is float
    return FeatureTable(features=features, **{name: columns[name] for name in ROW_COLUMNS}, meta=meta)
