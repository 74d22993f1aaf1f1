"""The exported ONNX model run as an app runs the Core ML one: decode, make square
the way its metadata names, classify (docs/xcode-and-onnx.md). `predict` and
the MLflow model that serves images both use it."""

import json
from pathlib import Path
from typing import BinaryIO

import numpy as np
import onnxruntime as ort
from PIL import UnidentifiedImageError

from pipeline.data.images import load_rgb, to_square

UNKNOWN = "unknown"  # the answer when no label reaches the model's rejection threshold


def why_unreadable(error: Exception) -> str:
    """Why an image gave no answer, in words for one line (`predict`, the served model)."""
    if isinstance(error, FileNotFoundError):
        return "no such file"
    if isinstance(error, UnidentifiedImageError):
        return "not an image (no format that Pillow or pillow-heif reads)"
    return f"not an image that decodes ({error})"  # truncated or damaged


class OnnxClassifier:
    """The exported model with the preprocessing its metadata states."""

    def __init__(self, model: str | Path):
        self.session = ort.InferenceSession(str(model), providers=ort.get_available_providers())
        metadata = self.session.get_modelmeta().custom_metadata_map
        self.labels = json.loads(metadata["labels"])
        self.crop_and_scale = metadata["crop_and_scale"]
        self.rejection_threshold = float(metadata.get("rejection_threshold", 0))
        self.size = self.session.get_inputs()[0].shape[-1]

    def probabilities(self, image: str | Path | BinaryIO) -> np.ndarray:
        """(labels,) probabilities for an image file, or its bytes as a file object."""
        pixels = to_square(load_rgb(image, min_side=self.size), self.size, self.crop_and_scale)
        return self.session.run(None, {"image": pixels.transpose(2, 0, 1)[None].astype(np.float32)})[0][0]

    def answer(self, probabilities: np.ndarray) -> str:
        """The top label, or "unknown" when its calibrated probability is under the threshold."""
        top = int(np.argmax(probabilities))
        return self.labels[top] if probabilities[top] >= self.rejection_threshold else UNKNOWN

    def top(self, probabilities: np.ndarray, k: int) -> list[tuple[str, float]]:
        """The `k` most likely labels with their probabilities."""
        return [(self.labels[i], float(probabilities[i])) for i in np.argsort(-probabilities)[:k]]
