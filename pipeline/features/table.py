"""The feature table, `artifacts/features/` (docs/pipeline.md): its typed schema,
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

Loading the table reads the index only: its vectors stay in the store
(`StoredVectors`), read by rows or streamed in batches, so that `train` and
`evaluate` hold a batch of them at a time however many images there are.
"""

import hashlib
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import NotRequired, TypedDict

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from numpy.dtypes import StringDType

from pipeline.data.images import DataError
from pipeline.project.files import write_atomically

# A shard holds as many vectors as fit in 320 MB: 65,536 of v1's 1,280 floats, 29,454 of
# v2's 2,848 (a fixed row count made v2's shards 746 MB, each held twice while written).
SHARD_BYTES = 65_536 * 1280 * 4
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
    features: "np.ndarray | StoredVectors"  # (rows, dim) float32: in memory when built, else in the store
    label_index: np.ndarray  # (rows,) int, into meta["labels"]
    split: np.ndarray  # (rows,) train, validation or test
    path: NotRequired[np.ndarray]  # (rows,) the image file; left unread by `train` (load_table's columns)
    sha256: np.ndarray  # (rows,) its content hash
    copy: np.ndarray  # (rows,) the augmented copy's key; "" for the image itself
    meta: TableMeta


ARRAYS = [name for name in FeatureTable.__annotations__ if name != "meta"]
ROW_COLUMNS = [name for name in ARRAYS if name != "features"]


def originals(table: FeatureTable) -> FeatureTable:
    """`table` without the augmented copies: what accuracy is measured on."""
    keep = table["copy"] == ""
    features = table["features"]
    kept = features.subset(keep) if isinstance(features, StoredVectors) else features[keep]
    return FeatureTable(
        features=kept,
        **{name: table[name][keep] for name in ROW_COLUMNS if name in table},
        meta=table["meta"],
    )


def in_image_order(table: FeatureTable, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`rows` ordered by content hash and copy, so that the same images give the same
    model whatever their file names, and a group number per row, shared by an image
    and its augmented copies and rising with the hash (numbers, not a copy of the
    hashes: 8 bytes a row, not 64 characters)."""
    hashes = table["sha256"][rows]
    order = np.lexsort((table["copy"][rows], hashes))
    hashes = hashes[order]
    groups = np.cumsum(np.concatenate(([False], hashes[1:] != hashes[:-1])), dtype=np.int64)
    return rows[order], groups


def feature_batches(
    features: "np.ndarray | StoredVectors", rows: np.ndarray, size: int
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(positions in `rows`, their vectors), at most `size` at a time, every row once:
    in `rows`' order from memory, in the store's order from the store."""
    if isinstance(features, StoredVectors):
        yield from features.batches(rows, size)
        return
    for start in range(0, len(rows), size):
        positions = np.arange(start, min(start + size, len(rows)))
        yield positions, features[rows[positions]]


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
    shard_rows = max(1, SHARD_BYTES // (4 * table["features"].shape[1]))  # float32
    for start in range(0, len(new), shard_rows):
        rows = new[start : start + shard_rows]
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


def gather(store: Path, names: np.ndarray, shards: np.ndarray, rows: np.ndarray, dim: int) -> np.ndarray:
    """The vectors at (shard, row), in order (`shards` index `names`, the shards' file
    names): of each shard only the row groups that hold one, straight from Arrow's
    buffers into the result, a row group at a time (reading a whole shard at once held
    about three times its size besides)."""
    features = np.empty((len(rows), dim), np.float32)
    for shard in np.unique(shards):
        wanted = np.flatnonzero(shards == shard)
        file = pq.ParquetFile(store / SHARDS / names[shard])
        ends = np.cumsum([file.metadata.row_group(i).num_rows for i in range(file.num_row_groups)])
        group_of = np.searchsorted(ends, rows[wanted], side="right")
        for group in np.unique(group_of):
            column = file.read_row_group(int(group), columns=["vector"]).column(0).combine_chunks()
            buffer = column.buffers()[1]
            vectors = np.frombuffer(buffer, np.float32, len(column) * dim, column.offset * dim * 4)
            here = wanted[group_of == group]
            start = ends[group] - len(column)
            chunk = vectors.reshape(-1, dim)[rows[here] - start]  # from a view on Arrow's buffer
            # checked a row group at a time: the whole batch's mask cost `train` a quarter
            # of a batch more at its peak (320 MB at a million images)
            if not np.isfinite(chunk).all():
                raise DataError(f"{store} is damaged (non-finite features): delete it and run dvc repro")
            features[here] = chunk
            del chunk
    return features


class StoredVectors:
    """A table's feature vectors left in the store, (rows, dim) like an array:
    `vectors[rows]` reads those rows, `batches` streams them."""

    def __init__(self, store: Path, names: np.ndarray, shards: np.ndarray, rows: np.ndarray, dim: int):
        # per row a shard number into `names` and a row in it: 8 bytes, not a file name
        self.store, self.names, self.shards, self.rows, self.dim = store, names, shards, rows, dim

    @property
    def shape(self) -> tuple[int, int]:
        return len(self.rows), self.dim

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index) -> np.ndarray:
        """The vectors of `index` (row numbers, a mask or a slice), read from the store."""
        positions = np.arange(len(self.rows))[index]
        return gather(self.store, self.names, self.shards[positions], self.rows[positions], self.dim)

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        return self[:] if dtype is None else self[:].astype(dtype)

    def subset(self, index) -> "StoredVectors":
        return StoredVectors(self.store, self.names, self.shards[index], self.rows[index], self.dim)

    def batches(self, rows: np.ndarray, size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(positions in `rows`, their vectors), at most `size` at a time: all at once
        in `rows`' order when they fit in one batch (the same arithmetic, to the bit,
        as a table held in memory), else in the store's order, so that each shard is
        read once per pass, not once per batch."""
        if len(rows) <= size:
            yield np.arange(len(rows)), self[rows]
            return
        order = np.lexsort((self.rows[rows], self.shards[rows]))
        for start in range(0, len(order), size):
            positions = order[start : start + size]
            yield positions, self[rows[positions]]


def column_array(column: pa.ChunkedArray) -> np.ndarray:
    """A column as numpy's own types: sorting and comparing object arrays fail or crawl.
    Strings as numpy's variable-width StringDType (a content hash takes 80 bytes, not
    the 256 of a fixed-width `<U64`; a short split name 16, not 40), converted a
    slice at a time: Arrow makes a Python object of every string on the way, and a
    million of them at once left `train` holding hundreds of MB it no longer used."""
    if not pa.types.is_string(column.type):
        return column.to_numpy(zero_copy_only=False)
    values = np.empty(len(column), StringDType())
    for start in range(0, len(column), BATCH_ROWS):
        values[start : start + BATCH_ROWS] = column.slice(start, BATCH_ROWS).to_numpy(zero_copy_only=False)
    return values


def check_shards(store: Path, names: np.ndarray, shards: np.ndarray, rows: np.ndarray, dim: int) -> None:
    """Every shard the index names is whole, of this width, and holds the rows named:
    its footer is read, not its vectors (a non-finite vector is found when read)."""
    last_row = np.full(len(names), -1)
    np.maximum.at(last_row, shards, rows)
    for name, last in zip(names, last_row, strict=True):
        file = pq.ParquetFile(store / SHARDS / name)
        if file.schema_arrow.field("vector").type != pa.binary(dim * 4):
            raise ValueError(f"{name} holds vectors of another width")
        if last >= file.metadata.num_rows:
            raise ValueError(f"{name} holds fewer rows than the index names")


def load_table(path: str | Path, columns: Sequence[str] = ROW_COLUMNS) -> FeatureTable:
    """The table at `path` with those of its row `columns` a stage uses, its vectors
    left in the store; a DataError naming the store when it is damaged or not one."""
    store = Path(path)
    try:
        index = pq.ParquetFile(store / INDEX)
        meta = json.loads(index.schema_arrow.metadata[b"meta"])
        # One column at a time, so that one column's Arrow copy exists at once (the
        # whole index at once cost a million-image `train` 1.4 GB).
        arrays = {name: column_array(index.read(columns=[name])[name]) for name in columns}
        encoded = index.read(columns=["shard"])["shard"].combine_chunks().dictionary_encode()
        names, shards = encoded.dictionary.to_numpy(zero_copy_only=False), encoded.indices.to_numpy()
        rows = index.read(columns=["row"])["row"].to_numpy().astype(np.int32)
        dim = int(meta["extractor"]["dim"])
        check_shards(store, names, shards, rows, dim)
    except FileNotFoundError as error:
        missing = Path(error.filename or store / INDEX)
        raise DataError(f"{missing} not found: run the extract stage (dvc repro), or dvc pull it") from None
    except Exception as error:  # pyarrow, json and numpy raise many types for a damaged file
        raise DataError(f"{store} is damaged ({type(error).__name__}): delete it and run dvc repro") from None
    if "label_index" in arrays:
        arrays["label_index"] = arrays["label_index"].astype(np.int64)  # an empty table's is float
    features = StoredVectors(store, names, shards.astype(np.int32), rows, dim)
    return FeatureTable(features=features, **arrays, meta=meta)
