"""Content-addressed feature cache: one file per (image content, extractor).

Entries are written to a temporary name and renamed into place, so a killed run
leaves no partial entry behind, and the next run picks up where it stopped.
"""

import json
import os
import tempfile
from pathlib import Path

import numpy as np


class FeatureCache:
    def __init__(self, root: str | Path, key: str, description: dict):
        self.dir = Path(root) / key
        self.dir.mkdir(parents=True, exist_ok=True)
        about = self.dir / "extractor.json"  # the cache describes itself
        if not about.exists():
            about.write_text(json.dumps(description, indent=2) + "\n", encoding="utf-8")

    def _path(self, sha256: str) -> Path:
        return self.dir / sha256[:2] / f"{sha256}.npy"

    def __contains__(self, sha256: str) -> bool:
        return self._path(sha256).exists()

    def get(self, sha256: str) -> np.ndarray:
        return np.load(self._path(sha256))

    def put(self, sha256: str, vector: np.ndarray) -> None:
        path = self._path(sha256)
        path.parent.mkdir(exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".tmp", delete=False) as tmp:
            np.save(tmp, vector.astype(np.float32))
        os.replace(tmp.name, path)
