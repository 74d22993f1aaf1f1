"""The registered MLflow model: the ONNX twin behind `mlflow models serve`, answering
an image with its label and probabilities (docs/preview-and-serving.md,
docs/xcode-and-onnx.md). `convert` logs it; the model's code travels with it."""

import base64
import io
from importlib.metadata import version
from pathlib import Path

import mlflow
import pandas as pd
from mlflow.models import ModelSignature
from mlflow.types.schema import ColSpec, DataType, Map, Schema

from pipeline.model.onnx_model import OnnxClassifier, why_unreadable

PACKAGE = Path(__file__).resolve().parent.parent  # pipeline/, logged as the model's code
# What a fresh environment needs to load and run the model (`--env-manager virtualenv`),
# pinned to what made it; named, as inferring them would load the model in a subprocess.
REQUIREMENTS = (
    "mlflow",
    "onnxruntime",
    "numpy",
    "pandas",
    "pillow",
    "pillow-heif",
    "opencv-python-headless",
)
SIGNATURE = ModelSignature(
    inputs=Schema([ColSpec(DataType.binary, "image")]),
    outputs=Schema(
        [
            ColSpec(DataType.string, "label"),
            ColSpec(DataType.double, "confidence"),
            ColSpec(Map(DataType.double), "probabilities"),
            ColSpec(DataType.string, "error", required=False),
        ]
    ),
)


COLUMNS = [column.name for column in SIGNATURE.outputs.inputs]


def image_bytes(value: bytes | bytearray | str) -> bytes:
    # The scoring server base64-decodes a binary column's JSON strings before predict;
    # a DataFrame handed to the loaded model in Python may still hold base64 text.
    return base64.b64decode(value) if isinstance(value, str) else bytes(value)


class ImageModel(mlflow.pyfunc.PythonModel):
    """One row per image in, one row per image out: label ("unknown" under the model's
    rejection threshold), the top probability, and every label's probability; or, for
    an image that does not decode, why, in `error` (the other rows keep their answers)."""

    def load_context(self, context):
        self.classifier = OnnxClassifier(context.artifacts["onnx"])

    def answer(self, value) -> dict:
        try:
            probabilities = self.classifier.probabilities(io.BytesIO(image_bytes(value)))
        except Exception as error:  # one bad image must not fail the request of the others
            return {"label": None, "confidence": None, "probabilities": None, "error": why_unreadable(error)}
        return {
            "label": self.classifier.answer(probabilities),
            "confidence": float(probabilities.max()),
            "probabilities": dict(zip(self.classifier.labels, map(float, probabilities), strict=True)),
            "error": None,
        }

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        # object columns: a missing confidence stays None, which JSON writes as null (not NaN)
        return pd.DataFrame(map(self.answer, model_input["image"]), columns=COLUMNS, dtype=object)


def log_image_model(onnx_path: str | Path, labels: list[str], registered_model_name: str):
    """Log and register the ONNX model as an image-serving pyfunc in the active run."""
    return mlflow.pyfunc.log_model(
        name="model",
        # this file, run where the model loads (MLflow's models from code): nothing pickled
        python_model=str(Path(__file__).resolve()),
        artifacts={"onnx": str(onnx_path)},
        registered_model_name=registered_model_name,
        # stated, not inferred from an example input, which MLflow would run the model on
        signature=SIGNATURE,
        pip_requirements=[f"{name}=={version(name)}" for name in REQUIREMENTS],
        # the model imports pipeline.model.onnx_model: loadable where the project is not installed
        code_paths=[str(PACKAGE)],
        metadata={"labels": list(labels)},
    )


mlflow.models.set_model(ImageModel())  # what MLflow loads from this file
