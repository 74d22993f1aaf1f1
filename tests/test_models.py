"""The exported models, checked without a Mac (docs/xcode-and-onnx.md): hand-made
heads on the real backbone, and the demo pipeline's."""

import copy
import csv
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import coremltools as ct
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from conftest import CHROMIUM_FLAGS, REPO, run
from coremltools.converters.mil.frontend.milproto.load import load as load_mil
from PIL import Image
from sklearn.linear_model import LogisticRegression
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_weights

from pipeline import convert
from pipeline.data.images import load_rgb, to_square
from pipeline.features.backbone import image_features
from pipeline.features.cache import describe
from pipeline.features.table import load_table
from pipeline.model.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from pipeline.model.export import CACHE_FOLDER, BackboneConversions, Probabilities
from pipeline.model.head import ClassifierHead
from pipeline.model.model_files import size_on_disk, to_core_ml
from pipeline.project import tracking
from pipeline.project.config import compose_config, output_overrides

pytestmark = pytest.mark.slow
LABELS = ["flag", "fruit", "mammal", "vehicle"]
DEMO_IMAGES = sorted((REPO / "data/demo/test").rglob("*.jpg"))[::12]


def save_as_trained(cfg, checkpoint: Checkpoint) -> None:
    """`checkpoint` in its place with the finished MLflow run that made it, as `train` leaves them."""
    with tracking.new_run(cfg, "f" * 64):
        save_checkpoint(cfg.paths.checkpoint, checkpoint)
        tracking.tag_checkpoint(cfg.paths.checkpoint)


def hand_made_checkpoint(
    cfg, labels: list[str], crop_and_scale: str, hidden_sizes: list[int], seed: int, dim: int = 1280
) -> Checkpoint:
    """A random head for `dim` features (v1's), standardisation included."""
    torch.manual_seed(seed)
    head = ClassifierHead(dim, len(labels), hidden_sizes).eval()
    head.standardise_on(torch.rand(64, dim) * 2)  # not the identity: the models must include it
    with torch.no_grad():
        head.layers[-1].weight *= 20  # confident, as trained heads are, not near-uniform
    return Checkpoint(
        labels=labels,
        in_features=dim,
        head={"type": "mlp" if hidden_sizes else "logistic", "hidden_sizes": hidden_sizes, "dropout": 0.0},
        extractor=describe(cfg.extractor, crop_and_scale),
        input_size=cfg.extractor.input_size,
        data_fingerprint="f" * 64,
        regularization=1e-3,
        calibration={"temperature": 1.0, "rejection_threshold": 0.0, "keep": 1.0, "fitted_on": "nothing"},
        state_dict=head.state_dict(),
    )


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """`convert` of a hand-made logistic head into an empty feature cache: its config."""
    root = tmp_path_factory.mktemp("convert")
    cfg = compose_config(  # v1: the compatible print keeps converting as it did
        *output_overrides(root / "out"), f"mlflow.tracking_uri=sqlite:///{root / 'mlflow.db'}", "extractor=v1"
    )
    with pytest.MonkeyPatch.context() as env:
        env.delenv("MLFLOW_TRACKING_URI", raising=False)
        checkpoint = hand_made_checkpoint(cfg, ["rouge écarlate", "green, leafy", "blue"], "scaleFit", [], 0)
        save_as_trained(cfg, checkpoint)
        convert.run(cfg)
    return cfg


def core_ml_model(cfg):
    return ct.models.MLModel(f"{cfg.paths.models_dir}/{cfg.model.name}.mlpackage", skip_model_load=True)


def check_image_classifier(model, labels: list[str], crop_and_scale: str, extractor: str) -> None:
    """What makes the model a drop-in for Create ML's in Apple's Vision sample, and what
    Core ML's pipeline validator checks (each part's inputs are what the parts before
    it output, exactly)."""
    spec = model.get_spec()
    assert spec.WhichOneof("Type") == "pipelineClassifier"  # as Create ML's image classifiers
    assert spec.specificationVersion >= 7  # Core ML 6 (iOS 16): a pipeline of ML programs
    (image,) = spec.description.input
    assert image.name == "image" and image.type.WhichOneof("Type") == "imageType"
    assert (image.type.imageType.width, image.type.imageType.height) == (224, 224)
    assert image.type.imageType.colorSpace == ct.proto.FeatureTypes_pb2.ImageFeatureType.RGB
    assert crop_and_scale in image.shortDescription
    outputs = {o.name: o.type.WhichOneof("Type") for o in spec.description.output}
    assert outputs == {"classLabel": "stringType", "classLabelProbs": "dictionaryType"}
    assert spec.description.predictedFeatureName == "classLabel"
    assert spec.description.predictedProbabilitiesName == "classLabelProbs"
    user = dict(spec.description.metadata.userDefined)
    assert json.loads(user["labels"]) == labels
    assert user["crop_and_scale"] == crop_and_scale
    assert (user["extractor"], user["architecture"]) == (extractor, "tf_efficientnet_lite0")
    assert len(user["data_fingerprint"]) == 64
    assert spec.description.metadata.shortDescription and spec.description.metadata.versionString == "1.0"

    backbone, head = spec.pipelineClassifier.pipeline.models
    types = {f.name: f.type for f in spec.description.input}
    for part in (backbone, head):
        assert part.WhichOneof("Type") == "mlProgram"
        assert list(part.mlProgram.functions["main"].block_specializations) == ["CoreML6"]  # iOS 16 opset
        assert all(f.type == types[f.name] for f in part.description.input), part.description
        types.update({f.name: f.type for f in part.description.output})
    assert all(f.type == types[f.name] for f in spec.description.output)
    (features,) = backbone.description.output
    assert list(features.type.multiArrayType.shape) == [1, {"v1": 1280, "v2": 2848}[extractor]]

    # The normalisation is the image input's scale and bias: the backbone's first ops.
    program = load_mil(backbone, backbone.specificationVersion, model.weights_dir)
    scale, bias = [op for op in program.functions["main"].operations if op.op_type in ("mul", "add")][:2]
    assert (scale.op_type, bias.op_type) == ("mul", "add")
    assert float(scale.inputs["y"].val) == pytest.approx(1 / (255 * 0.5), rel=1e-3)
    assert np.allclose(np.ravel(bias.inputs["y"].val), -1.0, atol=1e-3)  # -mean / std
    program = load_mil(head, head.specificationVersion, model.weights_dir)
    (classify,) = [op for op in program.functions["main"].operations if op.op_type == "classify"]
    assert list(classify.classes.val) == labels  # in the order of the probabilities


def test_core_ml_model_is_an_image_classifier(converted):
    check_image_classifier(
        core_ml_model(converted), ["rouge écarlate", "green, leafy", "blue"], "scaleFit", "v1"
    )


def cached_files(cfg) -> dict[str, tuple[int, int]]:
    """The backbone's cached conversions: file -> (mtime in ns, size)."""
    files = sorted(
        p for p in Path(cfg.paths.feature_cache).rglob("*") if p.is_file() and CACHE_FOLDER in p.parts
    )
    return {str(p): (p.stat().st_mtime_ns, p.stat().st_size) for p in files}


def twin_and_torch(cfg, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities of (B, S, S, 3) uint8 pixels from the ONNX twin and from torch's
    backbone and head (models/head.ckpt), one image per call as the twin takes them."""
    session = ort.InferenceSession(f"{cfg.paths.models_dir}/{cfg.model.name}.onnx")
    images = pixels.transpose(0, 3, 1, 2).astype(np.float32)
    twin = np.concatenate([session.run(None, {"image": image[None]})[0] for image in images])
    head, _ = load_checkpoint(cfg.paths.checkpoint)
    with torch.inference_mode():
        reference = nn.Sequential(image_features(cfg.extractor), Probabilities(head))(
            torch.from_numpy(images)
        )
    return twin, reference.numpy()


def test_a_new_head_reuses_the_cached_backbone_and_the_twin_matches_torch(converted, monkeypatch, caplog):
    cfg = converted
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cached = cached_files(cfg)
    assert len(cached) > 3  # the ONNX graph and a Core ML package's files
    labels = ["cat", "dog"]
    save_as_trained(cfg, hand_made_checkpoint(cfg, labels, "scaleFit", [32], seed=1))

    started = time.perf_counter()
    with caplog.at_level("INFO", logger="pipeline.model.export"):
        convert.run(cfg)
    print(f"convert with a new head, in process: {time.perf_counter() - started:.1f} s")
    assert not caplog.records  # "converting ..." / "exporting ..." only when not cached
    assert cached_files(cfg) == cached  # not rewritten, nor touched by opening them
    check_image_classifier(core_ml_model(cfg), labels, "scaleFit", "v1")

    metadata = ort.InferenceSession(f"{cfg.paths.models_dir}/{cfg.model.name}.onnx").get_modelmeta()
    about = metadata.custom_metadata_map
    assert json.loads(about["labels"]) == labels and about["crop_and_scale"] == "scaleFit"
    assert "scaleFit" in about["input"] and about["extractor"] == "v1"
    photos = [to_square(load_rgb(path, 224), 224, "scaleFit") for path in DEMO_IMAGES]
    noise = np.random.default_rng(0).integers(0, 256, (2, 224, 224, 3), dtype=np.uint8)
    twin, reference = twin_and_torch(cfg, np.stack([*photos, *noise]))
    assert twin.shape == (len(photos) + 2, 2)
    assert np.abs(twin - reference).max() < 1e-4
    assert reference.max() > 0.9  # probabilities far from uniform: the comparison means something


def test_v2_exports_its_every_stage_features_in_both_formats(tmp_path, monkeypatch):
    """The Core ML backbone of v2 (the default) outputs its 2848 features, and the ONNX
    twin gives the probabilities torch gives on the demo's test images."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = compose_config(
        *output_overrides(tmp_path / "out"),
        f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
        "extractor=v2",
    )
    save_as_trained(cfg, hand_made_checkpoint(cfg, LABELS, "scaleFill", [], seed=2, dim=2848))
    convert.run(cfg)
    backbone, _ = core_ml_model(cfg).get_spec().pipelineClassifier.pipeline.models
    (features,) = backbone.description.output
    assert list(features.type.multiArrayType.shape) == [1, 2848]
    photos = np.stack([to_square(load_rgb(path, 224), 224, "scaleFill") for path in DEMO_IMAGES])
    twin, reference = twin_and_torch(cfg, photos)
    assert np.abs(twin - reference).max() < 1e-4
    assert reference.max() > 0.9  # probabilities far from uniform: the comparison means something


PROBE = """
import json, sys, time
started = time.perf_counter()
from pipeline.convert import main
main()
print(json.dumps({"seconds": time.perf_counter() - started, "modules": sorted(sys.modules)}))
"""


def test_convert_with_a_cached_backbone_imports_only_what_it_needs_and_leaves_no_temporary_file(
    converted, tmp_path, monkeypatch
):
    """Lightning, timm, torch's dynamo and the converters coremltools offers for other
    libraries cost seconds to import; a `convert` that finds its backbone needs none.
    Nothing is left in the temporary folder (coremltools left a package per run)."""
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    overrides = [f"paths.{key}={value}" for key, value in converted.paths.items()]
    overrides += [
        f"mlflow.tracking_uri={converted.mlflow.tracking_uri}",
        f"extractor={converted.extractor.name}",
        f"hydra.run.dir={Path(converted.paths.models_dir).parent}",
    ]
    result = run([sys.executable, "-c", PROBE, *overrides], REPO)
    report = json.loads(result.stdout.splitlines()[-1])
    print(f"python -m pipeline.convert with its backbone cached: {report['seconds']:.1f} s after start-up")
    heavy = {"pytorch_lightning", "lightning", "timm", "torch._dynamo", "sklearn", "torchvision"}
    assert not heavy & set(report["modules"])
    left = {path.name for path in tmp_path.iterdir()} - {".ses"}  # onnxruntime's one id file, reused
    assert not left


def test_exported_backbones_pad_by_constants(exported_backbone, converted):
    """timm's TF-style "same" padding, computed from the input's shape, is fixed at
    export: no shape arithmetic in the graphs, which onnxruntime then reduces to
    convolutions (pipeline.features.backbone.fix_same_padding)."""
    twin = f"{converted.paths.models_dir}/{converted.model.name}.onnx"
    for path in (exported_backbone, twin):
        operators = {node.op_type for node in onnx.load(path).graph.node}
        assert "Conv" in operators and not {"Shape", "Ceil"} & operators, path


def demo_test_predictions(project) -> list[dict]:
    with (project / "reports/predictions.csv").open() as file:
        return [row for row in csv.DictReader(file) if row["split"] == "test"]


def test_demo_core_ml_model_is_an_image_classifier(demo_project):
    model = ct.models.MLModel(str(demo_project / "models/ImageClassifier.mlpackage"), skip_model_load=True)
    _, checkpoint = load_checkpoint(demo_project / "models/head.ckpt")
    check_image_classifier(model, LABELS, checkpoint.crop_and_scale, "v2")  # the default


def test_onnx_twin_predicts_what_the_pipeline_measured(demo_project):
    session = ort.InferenceSession(str(demo_project / "models/ImageClassifier.onnx"))
    about = session.get_modelmeta().custom_metadata_map
    labels = json.loads(about["labels"])
    rows = demo_test_predictions(demo_project)
    assert len(rows) == 60
    for row in rows:
        pixels = to_square(load_rgb(demo_project / row["path"], 224), 224, about["crop_and_scale"])
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
    """A copy of `model`, BatchNorms folded, with every conv and linear layer's weight and
    bias as the Core ML program stores them, layer by layer in program order."""
    model = fold_batch_norms(copy.deepcopy(model))
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
    """The int8 Core ML backbone's weights, decoded and run in PyTorch (no Core ML runtime
    here) before the head: at most one demo test image lost against float32 (v1 lost
    none; v2's early-stage spreads are finer than 8 bits keep, and lose one of 60)."""
    head, checkpoint = load_checkpoint(demo_project / "models/head.ckpt")
    cfg = compose_config("model.precision=int8", f"paths.feature_cache={tmp_path / 'cache'}")
    package = tmp_path / "int8.mlpackage"
    backbones = BackboneConversions(cfg.paths.feature_cache, cfg.extractor, checkpoint.extractor)
    to_core_ml(cfg, head, checkpoint, backbones).save(str(package))
    saved = ct.models.MLModel(str(package), skip_model_load=True)
    backbone, _ = saved.get_spec().pipelineClassifier.pipeline.models
    program = load_mil(backbone, backbone.specificationVersion, saved.weights_dir)
    for op in weighted_layers(program):  # coremltools' rule: weights over 2048 elements are 8-bit
        stored = op.weight.op
        assert (stored.op_type == "constexpr_affine_dequantize") == (np.prod(op.weight.shape) > 2048)
        assert stored.op_type == "const" or stored.quantized_data.val.dtype == np.int8

    rows = demo_test_predictions(demo_project)
    pixels = np.stack(
        [to_square(load_rgb(demo_project / r["path"], 224), 224, checkpoint.crop_and_scale) for r in rows]
    )
    batch = torch.from_numpy(pixels).permute(0, 3, 1, 2).float()
    truth = np.array([LABELS.index(r["actual"]) for r in rows])

    def accuracy(backbone: nn.Module) -> float:
        with torch.inference_mode():
            return float((head(backbone(batch)).argmax(dim=1).numpy() == truth).mean())

    float32 = accuracy(image_features(cfg.extractor))
    int8 = accuracy(with_core_ml_weights(image_features(cfg.extractor), program))
    print(
        f"demo test accuracy: float32 {float32:.4f}, int8 Core ML weights {int8:.4f}; "
        f"int8 .mlpackage {size_on_disk(package) / 2**20:.2f} MB"
    )
    assert int8 >= float32 - 1.01 / len(rows)


def test_lightning_head_matches_sklearn_logistic_regression(demo_project):
    table = load_table(demo_project / "artifacts/features")
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


def test_predict_names_each_file_it_cannot_read_and_exits_2(demo_project, tmp_path):
    row = demo_test_predictions(demo_project)[0]
    missing, notes = tmp_path / "gone.jpg", tmp_path / "notes.jpg"
    notes.write_text("no picture here")
    predict = [sys.executable, "-m", "pipeline.predict", row["path"], str(missing), str(notes)]
    result = run(predict, demo_project, check=False)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"error: {missing}: no such file",
        f"error: {notes}: not an image (no format that Pillow or pillow-heif reads)",
    ]
    assert result.stdout.startswith(f"{row['path']}: ")  # the readable image keeps its answer


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
    # a count per pair of labels, not a row per image: the plot's data stays small at any size
    cells = plots["Confusion matrix"][0]["content"]["data"]["values"]
    assert len(cells) == 4 * 4 and sum(int(cell["count"]) for cell in cells) == 60
