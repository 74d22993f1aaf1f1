"""The exported ONNX model run as an app runs the Core ML one: decode, make square
the way its metadata names, classify (docs/xcode-and-onnx.md). `predict`, the
MLflow model that serves images and the app's Preview all use it."""

import json
from pathlib import Path
from typing import BinaryIO

import numpy as np
import onnxruntime as ort
from PIL import UnidentifiedImageError

from pipeline.data.images import load_rgb, to_square

UNKNOWN = "unknown"  # the answer when no label reaches the model's rejection threshold
FEATURES = "features"  # the tensor between backbone and head in both exported models
PROBABILITIES = "classLabelProbs"


def why_unreadable(error: Exception) -> str:
    """Why an image gave no answer, in words for one line (`predict`, the served model)."""
    if isinstance(error, FileNotFoundError):
        return "no such file"
    if isinstance(error, UnidentifiedImageError):
        return "not an image (no format that Pillow or pillow-heif reads)"
    return f"not an image that decodes ({error})"  # truncated or damaged


class OnnxClassifier:
    """The exported model with the preprocessing its metadata states."""

    def __init__(self, model: str | Path, features: bool = False):
        """`features`: also give the backbone's features of an image (`features_and_probabilities`)."""
        graph = str(model)
        if features:  # an output of the graph, not just a tensor inside it, so that onnxruntime returns it
            import onnx  # here only: the served MLflow model's environment has no onnx (serving.py)

            proto = onnx.load(graph)
            output = onnx.helper.make_tensor_value_info(FEATURES, onnx.TensorProto.FLOAT, None)
            proto.graph.output.append(output)
            graph = proto.SerializeToString()
        self.session = ort.InferenceSession(graph, providers=ort.get_available_providers())
        metadata = self.session.get_modelmeta().custom_metadata_map
        self.labels = json.loads(metadata["labels"])
        self.crop_and_scale = metadata["crop_and_scale"]
        self.rejection_threshold = float(metadata.get("rejection_threshold", 0))
        self.data_fingerprint = metadata.get("data_fingerprint")  # the head's, in its checkpoint too
        self.size = self.session.get_inputs()[0].shape[-1]

    def run(self, image: str | Path | BinaryIO, outputs: list[str]) -> list[np.ndarray]:
        """The model's `outputs` for an image file, or its bytes as a file object, each of one image."""
        pixels = to_square(load_rgb(image, min_side=self.size), self.size, self.crop_and_scale)
        results = self.session.run(outputs, {"image": pixels.transpose(2, 0, 1)[None].astype(np.float32)})
        return [result[0] for result in results]

    def probabilities(self, image: str | Path | BinaryIO) -> np.ndarray:
        """(labels,) probabilities for an image file, or its bytes as a file object."""
        return self.run(image, [PROBABILITIES])[0]

    def features_and_probabilities(self, image: str | Path | BinaryIO) -> tuple[np.ndarray, np.ndarray]:
        """(D,) backbone features and (labels,) probabilities, from one pass (needs `features=True`)."""
        features, probabilities = self.run(image, [FEATURES, PROBABILITIES])
        return features, probabilities

    def answer(self, probabilities: np.ndarray) -> str:
        """The top label, or "unknown" when its calibrated probability is under the threshold."""
        top = int(np.argmax(probabilities))
        return self.labels[top] if probabilities[top] >= self.rejection_threshold else UNKNOWN

    def top(self, probabilities: np.ndarray, k: int) -> list[tuple[str, float]]:
        """The `k` most likely labels with their probabilities."""
        return [(self.labels[i], float(probabilities[i])) for i in np.argsort(-probabilities)[:k]]
