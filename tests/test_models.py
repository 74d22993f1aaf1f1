"""The exported models of the demo pipeline, checked without a Mac (SPEC 5)."""

import copy
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
from conftest import run
from coremltools.converters.mil.frontend.milproto.load import load as load_mil
from PIL import Image
from sklearn.linear_model import LogisticRegression
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_weights

from pipeline.config import compose_config
from pipeline.convert import full_model, size_on_disk, to_core_ml
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


def fold_batch_norms(model: nn.Module) -> nn.Module:
    """Each BatchNorm folded into the conv just before it, as Core ML's converter does;
    the BatchNorms are left as identities (timm's keep their activation)."""
    modules = list(model.modules())
    with torch.no_grad():
        for conv, bn in zip(modules, modules[1:], strict=False):
            if isinstance(conv, nn.Conv2d):
                assert isinstance(bn, nn.BatchNorm2d), type(bn)
                conv.weight, conv.bias = fuse_conv_bn_weights(
                    conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias
                )
                bn.running_mean.zero_()
                bn.running_var.fill_(1 - bn.eps)
                bn.weight.fill_(1)
                bn.bias.zero_()
    return model


def weighted_layers(program) -> list:
    return [op for op in program.functions["main"].operations if op.op_type in ("conv", "linear")]


def dense(var) -> np.ndarray:
    """A const's value, or what a constexpr op decompresses to (coremltools' own decoding)."""
    return var.val if var.op.op_type == "const" else var.op.materialized_val_inference()


def with_core_ml_weights(model: nn.Module, program) -> nn.Module:
    """`model`, BatchNorms folded, with every conv and linear layer's weight and bias as
    the Core ML program stores them, layer by layer in program order."""
    model = fold_batch_norms(copy.deepcopy(model))  # a copy: the head is shared
    layers = [m for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    ops = weighted_layers(program)
    assert len(ops) == len(layers)
    with torch.no_grad():
        for op, layer in zip(ops, layers, strict=True):
            weight = torch.from_numpy(dense(op.weight).astype(np.float32))
            assert weight.shape == layer.weight.shape, op.name
            # the same layer: one 8-bit step is well under 1 % of its largest weight
            assert (weight - layer.weight).abs().max() <= 0.01 * layer.weight.abs().max(), op.name
            layer.weight.copy_(weight)
            layer.bias.copy_(torch.from_numpy(dense(op.bias).astype(np.float32)))
    return model


def test_int8_weights_keep_accuracy(demo_project, tmp_path):
    """The int8 Core ML model's weights, decoded and run in PyTorch (no Core ML runtime
    here): within 1 point of float32 on the demo test set, i.e. no test image lost."""
    head, checkpoint = load_checkpoint(demo_project / "models/head.ckpt")
    cfg = compose_config("model.precision=int8")
    package = tmp_path / "int8.mlpackage"
    to_core_ml(cfg, head, checkpoint).save(str(package))
    saved = ct.models.MLModel(str(package), skip_model_load=True)
    spec = saved.get_spec()
    assert list(spec.mlProgram.functions["main"].block_specializations) == ["CoreML6"]  # iOS 16 opset
    program = load_mil(spec, spec.specificationVersion, saved.weights_dir)
    for op in weighted_layers(program):  # coremltools' rule: weights over 2048 elements are 8-bit
        stored = op.weight.op
        assert (stored.op_type == "constexpr_affine_dequantize") == (np.prod(op.weight.shape) > 2048)
        assert stored.op_type == "const" or stored.quantized_data.val.dtype == np.int8

    rows = demo_test_predictions(demo_project)
    pixels = np.stack([center_crop_square(load_rgb(demo_project / r["path"], 224), 224) for r in rows])
    batch = torch.from_numpy(pixels).permute(0, 3, 1, 2).float()
    truth = np.array([LABELS.index(r["actual"]) for r in rows])

    def accuracy(model) -> float:
        with torch.inference_mode():
            return float((model(batch).argmax(dim=1).numpy() == truth).mean())

    float32 = accuracy(full_model(cfg.extractor, head, normalize_inside=True))
    int8 = accuracy(with_core_ml_weights(full_model(cfg.extractor, head, normalize_inside=True), program))
    print(
        f"demo test accuracy: float32 {float32:.4f}, int8 Core ML weights {int8:.4f}; "
        f"int8 .mlpackage {size_on_disk(package) / 2**20:.2f} MB"
    )
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
