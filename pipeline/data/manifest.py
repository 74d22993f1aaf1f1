"""A manifest: a data folder listed in one file (docs/your-images.md),
its typed schema, save, load and incremental build.

With a million images, a folder as a DVC dependency costs DVC a stat of every file
on every `dvc status`, and `split` hashes every byte of every image on every run.
A manifest lists each usable image once (path, label, content hash, size, mtime,
width, height) with the skipped files; `data.train_dir` or `data.test_dir` naming
it makes it the data source and DVC's dependency, one file. Updating it hashes and
checks only files that are new or whose size or mtime changed.
"""

import json
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.data.images import (
    DataError,
    LabelledImage,
    Skipped,
    check_labelled,
    files_in_label_folders,
    scan_labelled_folder,
)
from pipeline.data.storage import file_status
from pipeline.project.files import write_atomically

SUFFIX = ".parquet"
SCHEMA = pa.schema(
    [
        ("path", pa.string()),
        ("label", pa.string()),
        ("sha256", pa.string()),
        ("size", pa.int64()),
        ("mtime_ns", pa.int64()),
        ("width", pa.int32()),
        ("height", pa.int32()),
    ]
)


@dataclass
class Manifest:
    folder: str  # the data folder it lists
    rows: list[dict]  # SCHEMA's columns, one row per usable image
    skipped: list[Skipped]

    def images(self) -> list[LabelledImage]:
        return [LabelledImage(r["path"], r["label"], r["sha256"], r["width"], r["height"]) for r in self.rows]


def is_manifest(source: str | Path) -> bool:
    return str(source).endswith(SUFFIX)


def save_manifest(path: str | Path, manifest: Manifest) -> None:
    table = pa.Table.from_pylist(manifest.rows, schema=SCHEMA).replace_schema_metadata(
        {"folder": manifest.folder, "skipped": json.dumps([vars(s) for s in manifest.skipped])}
    )
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, lambda temporary: pq.write_table(table, temporary))


def load_manifest(path: str | Path) -> Manifest:
    """The manifest at `path`; a DataError naming the file when it is missing or not one."""
    try:
        table = pq.read_table(path)
        if not table.schema.remove_metadata().equals(SCHEMA):
            raise ValueError("unexpected columns")
        about = table.schema.metadata
        skipped = [Skipped(**item) for item in json.loads(about[b"skipped"])]
        return Manifest(about[b"folder"].decode(), table.to_pylist(), skipped)
    except FileNotFoundError:
        raise DataError(f"manifest not found: {path} (python -m pipeline.manifest FOLDER {path})") from None
    except (ValueError, TypeError, KeyError, OSError, pa.ArrowException) as error:
        raise DataError(
            f"{path} is not a manifest ({type(error).__name__}): build it again (python -m pipeline.manifest)"
        ) from None


def build_manifest(
    folder: str | Path, max_pixels: int, previous: Manifest | None = None
) -> tuple[Manifest, int]:
    """The manifest of `folder` and how many files were read to make it: the files
    `previous` lists with the same size and mtime are taken from it unread. `folder`
    may be an s3:// folder (docs/scaling-out.md): an object's
    size and date come with the listing, so only new or changed objects are read."""
    files, skipped = files_in_label_folders(folder)
    known = {row["path"]: row for row in previous.rows} if previous else {}
    rows, to_check = [], []
    for path, label in files:
        status = file_status(path)  # (size, mtime_ns)
        row = known.get(str(path))
        if row and row["label"] == label and (row["size"], row["mtime_ns"]) == status:
            rows.append(row)
        else:
            to_check.append((path, label, status))
    images, unusable = check_labelled([(path, label) for path, label, _ in to_check], max_pixels)
    by_path = {image.path: image for image in images}
    for path, _, (size, mtime_ns) in to_check:
        image = by_path.get(str(path))
        if image:
            rows.append(vars(image) | {"size": size, "mtime_ns": mtime_ns})
    rows.sort(key=lambda row: row["path"])
    skipped = sorted(skipped + unusable, key=lambda item: item.path)
    return Manifest(str(folder), rows, skipped), len(to_check)


def images_in(
    source: str | Path, max_pixels: int, verified: set[str]
) -> tuple[list[LabelledImage], list[Skipped]]:
    """A data source's usable images and skipped files: a manifest's as listed, a
    folder's as found (`verified`: content hashes whose full decode an earlier split
    already checked)."""
    if is_manifest(source):
        manifest = load_manifest(source)
        return manifest.images(), manifest.skipped
    return scan_labelled_folder(source, max_pixels, verified)
