"""The app's model files from a trained head: the Core ML classifier and its ONNX
twin, backbone and head together, taking a plain RGB image (docs/xcode-and-onnx.md).
The `convert` stage and the Python API's `write` both write them here.

The backbone's conversions are cached per extractor (pipeline/model/export.py): a
run that brings only a new head converts the head and joins it to them.
"""

import json
import logging
import sys
import uuid
from pathlib import Path

import onnx
from omegaconf import DictConfig
from torch import nn

from pipeline.features.backbone import save_onnx
from pipeline.features.cache import extractor_fingerprint
from pipeline.model.checkpoint import Checkpoint
from pipeline.model.export import (
    BackboneConversions,
    core_ml_classifier,
    ct,
    head_to_core_ml,
    onnx_classifier,
)
from pipeline.project.files import write_folder_atomically

log = logging.getLogger(__name__)

NO_LICENSE = "No license provided"  # what Create ML writes when the license is left empty
# coremltools' metadata that differs by the day and by machine, not by the model
CONVERTER_STAMPS = ("com.github.apple.coremltools.conversion_date", "com.github.apple.coremltools.source")


def check_extractor(cfg: DictConfig, checkpoint: Checkpoint) -> None:
    """The head only makes sense on the features it was trained on."""
    trained_on = checkpoint.extractor
    if extractor_fingerprint(cfg.extractor, checkpoint.crop_and_scale) != trained_on["fingerprint"]:
        raise ValueError(
            f"the head in {cfg.paths.checkpoint} was trained on {trained_on['name']} features "
            f"({trained_on['fingerprint']}), not on extractor {cfg.extractor.name}'s: train it again"
        )


def made_square(crop_and_scale: str) -> str:
    """How the input image comes from a photo, in the input's description."""
    return f"the photo made square as Vision's imageCropAndScaleOption .{crop_and_scale} does"


def user_metadata(cfg: DictConfig, checkpoint: Checkpoint) -> dict[str, str]:
    """What the model says about itself, in both formats."""
    return {
        "extractor": cfg.extractor.name,
        "architecture": cfg.extractor.architecture,
        "labels": json.dumps(checkpoint.labels, ensure_ascii=False),  # labels may hold commas
        "data_fingerprint": checkpoint.data_fingerprint,
        # the imageCropAndScaleOption an app must set on its VNCoreMLRequest
        "crop_and_scale": checkpoint.crop_and_scale,
        # the probabilities are calibrated (the temperature is inside the model); an app
        # answers "unknown" when the top one is below the threshold (docs/trust.md)
        "temperature": f"{checkpoint.calibration['temperature']:.6g}",
        "rejection_threshold": f"{checkpoint.rejection_threshold:.6g}",
    }


def to_core_ml(
    cfg: DictConfig, head: nn.Module, checkpoint: Checkpoint, backbones: BackboneConversions
) -> ct.models.MLModel:
    classifier = head_to_core_ml(head, checkpoint.in_features, checkpoint.labels, cfg.model.precision)
    model = core_ml_classifier(backbones.core_ml(cfg.model.precision), classifier)
    model.author = cfg.model.author  # no name from the machine: the same model, the same bytes
    model.license = cfg.model.license or NO_LICENSE
    model.short_description = cfg.model.short_description
    model.version = str(cfg.model.version)
    size = cfg.extractor.input_size
    model.input_description["image"] = f"RGB image, {size}x{size}: {made_square(checkpoint.crop_and_scale)}"
    model.output_description["classLabel"] = "Most likely label"
    model.output_description["classLabelProbs"] = "Probability of each label"
    model.user_defined_metadata.update(user_metadata(cfg, checkpoint))
    return model


def to_onnx(
    cfg: DictConfig, head: nn.Module, checkpoint: Checkpoint, backbones: BackboneConversions
) -> onnx.ModelProto:
    """Same contract as the Core ML model: `image` is (1, 3, S, S) float RGB 0..255."""
    graph = onnx_classifier(backbones.onnx(), head, checkpoint.in_features)
    size = cfg.extractor.input_size
    about = user_metadata(cfg, checkpoint)
    about["input"] = (
        f"image: float32 (1, 3, {size}, {size}) RGB 0..255, {made_square(checkpoint.crop_and_scale)}"
    )
    for key, value in about.items():
        graph.metadata_props.add(key=key, value=value)
    return graph


def size_on_disk(path: Path) -> int:
    return (
        sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        if path.is_dir()
        else path.stat().st_size
    )


def save_package(model: ct.models.MLModel, folder: Path) -> None:
    """The Core ML package, the same bytes for the same model, so that a fresh clone's
    `dvc repro` reproduces dvc.lock: coremltools names the package's items by random
    UUIDs in its Manifest.json (here: a UUID of each item's path), writes its
    protobuf maps in no fixed order, and stamps each part with the day and the torch
    build it was converted with (a CUDA and a CPU wheel differ)."""
    spec = model.get_spec()
    for part in [spec, *spec.pipelineClassifier.pipeline.models]:
        for key in CONVERTER_STAMPS:
            part.description.metadata.userDefined.pop(key, None)
    model = ct.models.MLModel(spec, weights_dir=model.weights_dir, skip_model_load=True)
    model.save(str(folder))
    manifest_file = folder / "Manifest.json"
    manifest = json.loads(manifest_file.read_text(encoding="utf-8"))
    items = manifest["itemInfoEntries"]
    spec_file = folder / "Data" / items[manifest["rootModelIdentifier"]]["path"]
    saved = ct.proto.Model_pb2.Model()
    saved.ParseFromString(spec_file.read_bytes())
    spec_file.write_bytes(saved.SerializeToString(deterministic=True))
    named = {old: str(uuid.uuid5(uuid.NAMESPACE_URL, entry["path"])) for old, entry in items.items()}
    manifest["itemInfoEntries"] = {named[old]: entry for old, entry in items.items()}
    manifest["rootModelIdentifier"] = named[manifest["rootModelIdentifier"]]
    manifest_file.write_text(json.dumps(manifest, indent=4, sort_keys=True) + "\n", encoding="utf-8")


def write_model_files(
    cfg: DictConfig, head: nn.Module, checkpoint: Checkpoint, mlpackage: Path, onnx_path: Path
) -> tuple[onnx.ModelProto, dict]:
    """Write both files; returns the ONNX graph and the report of their sizes."""
    check_extractor(cfg, checkpoint)
    backbones = BackboneConversions(cfg.paths.feature_cache, cfg.extractor, checkpoint.extractor)
    mlpackage.parent.mkdir(parents=True, exist_ok=True)
    model = to_core_ml(cfg, head, checkpoint, backbones)
    write_folder_atomically(mlpackage, lambda temporary: save_package(model, temporary))
    if sys.platform != "darwin":  # coremltools runs a model only through macOS's Core ML framework
        log.info("Core ML runs only on macOS: predict, serving and the tests run the ONNX twin here")
    graph = to_onnx(cfg, head, checkpoint, backbones)
    save_onnx(graph, onnx_path)
    sizes = {
        "precision": cfg.model.precision,
        "mlpackage_bytes": size_on_disk(mlpackage),
        "onnx_bytes": size_on_disk(onnx_path),
    }
    return graph, sizes
