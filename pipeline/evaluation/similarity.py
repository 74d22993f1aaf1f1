"""How alike two images' features are, as the data audit and the app's Preview
judge it: cosine similarity of the features less the training mean (the head's
standardisation shift). Every clip-art image shares a large common component that
makes raw cosine similarity near 1 for unrelated pairs (pipeline/evaluation/audit.py)."""

import numpy as np


def centred_unit(features: np.ndarray, shift: np.ndarray) -> np.ndarray:
    centred = features - shift
    return centred / np.maximum(np.linalg.norm(centred, axis=-1, keepdims=True), 1e-12)


def most_similar(query: np.ndarray, references: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray]:
    """The `count` rows of `references` most like `query` (both `centred_unit`), most
    alike first: (their row numbers, their cosine similarities)."""
    similarity = references @ query
    count = min(count, len(similarity))
    nearest = np.argpartition(-similarity, count - 1)[:count] if count else np.array([], int)
    nearest = nearest[np.argsort(-similarity[nearest], kind="stable")]
    return nearest, similarity[nearest]
