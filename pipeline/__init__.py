"""Create ML's image classifier as a reproducible pipeline (README.md, docs/index.md).

The Python API (docs/api.md) is importable from here; it loads on
first use, so that `python -m pipeline.<stage>` does not pay for it.
"""

import importlib

API = ("DataSource", "ImageClassifier", "ModelParameters", "ClassifierMetrics")


def __getattr__(name: str):
    if name in API:
        return getattr(importlib.import_module("pipeline.api"), name)
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")


__all__ = list(API)
