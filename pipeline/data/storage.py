"""Where images are read from: a local file, or an object under an s3:// folder
(docs/scaling-out.md).

Every door that lists, hashes or decodes an image goes through these few helpers,
so an s3:// data folder works wherever a local one does and local paths behave
exactly as before. The endpoint and credentials are botocore's own (AWS_ENDPOINT_URL
or AWS_ENDPOINT_URL_S3, AWS_ACCESS_KEY_ID, AWS_PROFILE, ~/.aws/config), the ones DVC
and MLflow read too, so one set of variables points all three at one store: AWS,
MinIO, Cloudflare R2 or any other S3-compatible one. pyarrow's own S3 file system
ignores AWS_ENDPOINT_URL, hence s3fs (which dvc-s3 brings anyway).
"""

import errno
import io
import os
from functools import cache
from pathlib import Path
from typing import BinaryIO

S3 = "s3://"


def is_s3(path: str | Path | BinaryIO) -> bool:
    return isinstance(path, str) and path.startswith(S3)


def data_path(setting: str | Path) -> str | Path:
    """A data setting as a path: an s3:// URI stays a string (a Path would fold its `//`)."""
    return str(setting).rstrip("/") if is_s3(str(setting)) else Path(setting)


@cache
def s3():
    """One S3 file system per process; imported only when a path is s3://."""
    import s3fs

    # no instance cache: a test or a notebook that changes the endpoint gets a new one
    return s3fs.S3FileSystem(skip_instance_cache=True)


def _not_found(path: str) -> FileNotFoundError:
    # errno and strerror set, as a local file's: callers report `error.strerror`
    return FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), path)


def read_bytes(path: str | Path) -> bytes:
    """The whole content of a local file or an s3:// object."""
    if not is_s3(path):
        return Path(path).read_bytes()
    try:
        return s3().cat_file(path)
    except FileNotFoundError:
        raise _not_found(path) from None


class NamedBytes(io.BytesIO):
    """An object's bytes that Pillow's errors name as they name a file, by its path:
    a skipped image's reason stays the same from run to run (it is in split.json)."""

    def __init__(self, content: bytes, path: str):
        super().__init__(content)
        self.path = path

    def __repr__(self) -> str:
        return repr(self.path)


def image_source(path: str | Path | BinaryIO, content: bytes | None = None) -> str | Path | BinaryIO:
    """What Pillow opens: a local path or a file object as it is; an s3:// object's
    bytes (`content`, when they were read already)."""
    if not is_s3(path):
        return path
    return NamedBytes(read_bytes(path) if content is None else content, path)


def is_folder(path: str | Path) -> bool:
    """A local folder, or an s3:// prefix with at least one object under it."""
    if not is_s3(path):
        return Path(path).is_dir()
    try:
        return s3().isdir(path)
    except (FileNotFoundError, PermissionError):
        return False


def s3_files(root: str) -> list[str]:
    """Every object under the s3:// folder `root`, as s3:// paths, sorted. The listing
    is read afresh each time and leaves each object's size and date cached for
    `file_status`, so a manifest update asks the store once, not once per image."""
    s3().invalidate_cache(root)
    found = s3().find(root, detail=True)
    return sorted(S3 + key for key, info in found.items() if info["type"] == "file" and not key.endswith("/"))


def file_status(path: str | Path) -> tuple[int, int]:
    """(size, modification time in ns): what tells a manifest that a file changed."""
    if not is_s3(path):
        status = os.stat(path)
        return status.st_size, status.st_mtime_ns
    info = s3().info(path)
    return int(info["size"]), int(info["LastModified"].timestamp() * 1e9)


def label_folder_names(root: str | Path) -> list[str]:
    """The label folders directly under `root`, hidden ones left out. On S3 a folder
    exists only while an object is under it, so there are no empty label folders."""
    if is_s3(root):
        entries = s3().ls(root, detail=True, refresh=True)
        names = [e["name"].rstrip("/").rsplit("/", 1)[-1] for e in entries if e["type"] == "directory"]
    else:
        names = [path.name for path in Path(root).iterdir() if path.is_dir()]
    return sorted(name for name in names if not name.startswith("."))
