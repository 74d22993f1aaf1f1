"""The Python API's flow (docs/api.md) on the bundled demo data: train from a
folder per label, evaluate on the test folder, try two images, write the Core ML
model and its ONNX twin. Run from the project root: `python examples/script.py`."""

from pipeline import DataSource, ImageClassifier, ModelParameters

training = DataSource.labeled_directories("data/demo/train")
testing = DataSource.labeled_directories("data/demo/test")

model = ImageClassifier.train(training, validation="auto", parameters=ModelParameters(max_iterations=100))
print(model)
print("training accuracy:  ", f"{model.training_metrics.accuracy:.3f}")
print("validation accuracy:", f"{model.validation_metrics.accuracy:.3f}")

metrics = model.evaluation(on=testing)
print("test accuracy:      ", f"{metrics.accuracy:.3f}", f"(error {metrics.classification_error:.3f})")
print(metrics.per_label.round(3))
print(metrics.confusion)

print(model.predictions([path for path, _ in testing.files[:2]], top_k=2))

written = model.write(
    "examples/output/FromPython.mlpackage", metadata={"short_description": "Demo, from Python"}
)
print("wrote", written, "and", written.with_suffix(".onnx"))
