"""The exported models of the demo pipeline, checked without a Mac (SPEC 5)."""

import csv
import json
import shutil
import subprocess
import sys
from datetime import datetime

import coremltools as ct
import numpy as np
import onnxruntime as ort
import pytest
import torch
from conftest import compose_cfg, run
from coremltools.converters.mil.frontend.milproto.load import load as load_mil
from PIL import Image
from sklearn.linear_model import LogisticRegression

from pipeline.convert import full_model
from pipeline.extract import load_table
from pipeline.images import center_crop_square, load_rgb
from pipeline.train import load_checkpoint

pytestmark = pytest.mark.slow
LABELS = ["flag", "fruit", "mammal", "vehicle"]


def test_core_ml_spec_is_an_image_classifier(demo_project):
    model = ct.models.MLModel(str(demo_project / "models/ImageClassifier.mlpackage"), skip_model_load=True)
    spec = model.get_spec()
    (image,) = spec.description.input
    assert image.name == "image" and image.type.WhichOneof("Type") == "imageType"
    assert (image.type.imageType.width, image.type.imageType.height) == (224, 224)
    assert image.type.imageType.colorSpace == ct.proto.FeatureTypes_pb2.ImageFeatureType.RGB
    outputs = {o.name: o.type.WhichOneof("Type") for o in spec.description.output}
    assert outputs == {"classLabel": "stringType", "classLabelProbs": "dictionaryType"}
    assert spec.description.predictedFeatureName == "classLabel"
    assert spec.description.predictedProbabilitiesName == "classLabelProbs"
    assert list(spec.mlProgram.functions["main"].block_specializations) == ["CoreML5"]  # iOS 15 opset
    metadata = spec.description.metadata
    assert json.loads(metadata.userDefined["labels"]) == LABELS
    assert metadata.userDefined["extractor"] == "v1"
    user = dict(metadata.userDefined)
    assert datetime.fromisoformat(user["trained_at"]).tzinfo is not None
    assert len(user["data_fingerprint"]) == 64
    assert metadata.shortDescription and metadata.versionString == "1.0"
    # The normalisation is the image input's scale and bias: the program's first ops.
    program = load_mil(spec, spec.specificationVersion, model.weights_dir)
    scale, bias = [op for op in program.functions["main"].operations if op.op_type in ("mul", "add")][:2]
    assert (scale.op_type, bias.op_type) == ("mul", "add")
    assert float(scale.inputs["y"].val) == pytest.approx(1 / (255 * 0.5), rel=1e-3)
    assert np.allclose(np.ravel(bias.inputs["y"].val), -1.0, atol=1e-3)  # -mean / std


def demo_test_predictions(project) -> list[dict]:
    with (project / "reports/predictions.csv").open() as file:
        return [row for row in csv.DictReader(file) if row["split"] == "test"]


def test_onnx_twin_predicts_what_the_pipeline_measured(demo_project):
    session = ort.InferenceSession(str(demo_project / "models/ImageClassifier.onnx"))
    labels = json.loads(session.get_modelmeta().custom_metadata_map["labels"])
    rows = demo_test_predictions(demo_project)
    assert len(rows) == 60
    for row in rows:
        pixels = center_crop_square(load_rgb(demo_project / row["path"], 224), 224)
        probabilities = session.run(None, {"image": pixels.transpose(2, 0, 1)[None].astype(np.float32)})[0][0]
        assert labels[probabilities.argmax()] == row["predicted"], row["path"]
        assert abs(probabilities.max() - float(row["confidence"])) < 1e-3, row["path"]


def int8_like_core_ml(model: torch.nn.Module) -> torch.nn.Module:
    """coremltools' linear_symmetric int8: per output channel, weights of 2048+ elements."""
    with torch.no_grad():
        for weight in model.parameters():
            if weight.dim() >= 2 and weight.numel() >= 2048:
                scale = (
                    weight.abs().amax(dim=tuple(range(1, weight.dim())), keepdim=True).clamp_min(1e-12) / 127
                )
                weight.copy_((weight / scale).round().clamp(-128, 127) * scale)
    return model


@pytest.mark.xfail(
    strict=True,
    reason="per-channel int8 weights lose one of the 60 demo test images (91.7 % vs 93.3 %): "
    "more than the 1-point bar; per-block quantization or palettization still to try",
)
def test_int8_weights_keep_accuracy(demo_project):
    head, _ = load_checkpoint(demo_project / "models/head.ckpt")
    extractor = compose_cfg().extractor
    rows = demo_test_predictions(demo_project)
    pixels = np.stack([center_crop_square(load_rgb(demo_project / r["path"], 224), 224) for r in rows])
    batch = torch.from_numpy(pixels).permute(0, 3, 1, 2).float()
    truth = np.array([LABELS.index(r["actual"]) for r in rows])

    def accuracy(model) -> float:
        with torch.inference_mode():
            return float((model(batch).argmax(dim=1).numpy() == truth).mean())

    float32 = accuracy(full_model(extractor, head, normalize_inside=True))
    int8 = accuracy(int8_like_core_ml(full_model(extractor, head, normalize_inside=True)))
    print(f"demo test accuracy: float32 {float32:.4f}, int8 weights (simulated) {int8:.4f}")
    assert int8 >= float32 - 0.01


def test_lightning_head_matches_sklearn_logistic_regression(demo_project):
    table = load_table(demo_project / "artifacts/features.npz")
    train, test = table["split"] == "train", table["split"] == "test"
    sklearn = LogisticRegression(max_iter=5000).fit(table["features"][train], table["label_index"][train])
    reference = sklearn.score(table["features"][test], table["label_index"][test])
    ours = json.loads((demo_project / "reports/metrics.json").read_text())["test"]["accuracy"]
    print(f"demo test accuracy: lightning head {ours:.4f}, sklearn logistic regression {reference:.4f}")
    assert ours >= reference - 0.02


def test_predict_agrees_with_evaluate(demo_project):
    row = demo_test_predictions(demo_project)[0]
    result = run(
        [sys.executable, "-m", "pipeline.predict", row["path"], "--json", "--top-k", "1"],
        demo_project,
    )
    (answer,) = json.loads(result.stdout)
    (best,) = answer["predictions"]
    assert best["label"] == row["predicted"]
    assert best["confidence"] == pytest.approx(float(row["confidence"]), abs=1e-4)


CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def test_html_report_renders_in_chromium(demo_project, tmp_path):
    chromium = shutil.which("chromium") or pytest.skip("chromium is not installed (.ci/run installs it)")
    page = (demo_project / "reports/report.html").as_uri()
    flags = [*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}", "--enable-logging=stderr", "--v=0"]
    dom = subprocess.run([chromium, *flags, "--dump-dom", page], capture_output=True, text=True, timeout=180)
    assert "Uncaught" not in dom.stderr, dom.stderr[-2000:]
    metrics = json.loads((demo_project / "reports/metrics.json").read_text())
    assert "Per label, test" in dom.stdout
    for label in LABELS:
        assert f"<td>{label}</td>" in dom.stdout
    assert f"{metrics['test']['accuracy']:.1%}" in dom.stdout
    screenshot = tmp_path / "report.png"
    subprocess.run(
        [chromium, *flags, f"--screenshot={screenshot}", "--window-size=1200,1600", page],
        capture_output=True,
        timeout=180,
        check=True,
    )
    pixels = np.asarray(Image.open(screenshot).convert("L"))
    assert pixels.shape == (1600, 1200) and pixels.std() > 20  # a page, not a blank window


def test_dvc_plots_show_curves_and_confusion_matrix(demo_project):
    plots = json.loads(run(["dvc", "plots", "show", "--json"], demo_project).stdout)["data"]
    assert {"Accuracy", "Loss", "Confusion matrix"} <= set(plots)
    assert any(name.endswith("confusion_matrix.png") for name in plots)
