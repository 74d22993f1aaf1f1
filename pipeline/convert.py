"""Stage `convert`: one Core ML model and its ONNX twin, backbone and head together,
taking a plain RGB image (README "The stages", "Using the model in Xcode").

The backbone's conversions are cached per extractor (pipeline/export.py): a run
that brings only a new head converts the head and joins it to them.
"""

import json
import logging
from pathlib import Path

import mlflow
import numpy as np
import onnx
from mlflow.models import ModelSignature
from mlflow.types.schema import Schema, TensorSpec
from omegaconf import DictConfig
from torch import nn

from pipeline import tracking
from pipeline.checkpoint import Checkpoint, load_checkpoint
from pipeline.config import stage_entry
from pipeline.export import BackboneConversions, core_ml_classifier, ct, head_to_core_ml, onnx_classifier
from pipeline.feature_cache import extractor_fingerprint
from pipeline.files import write_json

log = logging.getLogger(__name__)


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
        "trained_at": checkpoint.trained_at,
        "data_fingerprint": checkpoint.data_fingerprint,
        # the imageCropAndScaleOption an app must set on its VNCoreMLRequest
        "crop_and_scale": checkpoint.crop_and_scale,
    }


def to_core_ml(
    cfg: DictConfig, head: nn.Module, checkpoint: Checkpoint, backbones: BackboneConversions
) -> ct.models.MLModel:
    classifier = head_to_core_ml(head, checkpoint.in_features, checkpoint.labels, cfg.model.precision)
    model = core_ml_classifier(backbones.core_ml(cfg.model.precision), classifier)
    model.author = cfg.model.author
    model.license = cfg.model.license
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


def run(cfg: DictConfig) -> None:
    head, checkpoint = load_checkpoint(cfg.paths.checkpoint)
    check_extractor(cfg, checkpoint)
    backbones = BackboneConversions(cfg.paths.feature_cache, cfg.extractor, checkpoint.extractor)
    models = Path(cfg.paths.models_dir)
    models.mkdir(parents=True, exist_ok=True)
    mlpackage, onnx_path = models / f"{cfg.model.name}.mlpackage", models / f"{cfg.model.name}.onnx"
    to_core_ml(cfg, head, checkpoint, backbones).save(str(mlpackage))
    graph = to_onnx(cfg, head, checkpoint, backbones)
    onnx.save(graph, onnx_path)
    sizes = {
        "precision": cfg.model.precision,
        "mlpackage_bytes": size_on_disk(mlpackage),
        "onnx_bytes": size_on_disk(onnx_path),
    }
    write_json(cfg.paths.model_report, sizes)
    size = cfg.extractor.input_size
    with tracking.resumed_run(cfg, checkpoint.mlflow_run_id):
        mlflow.log_metrics(
            {"mlpackage_mb": sizes["mlpackage_bytes"] / 2**20, "onnx_mb": sizes["onnx_bytes"] / 2**20}
        )
        mlflow.log_artifact(str(mlpackage), "coreml")
        model = mlflow.onnx.log_model(
            graph,
            name="model",
            registered_model_name=cfg.model.name,
            onnx_execution_providers=["CPUExecutionProvider"],
            # named, not inferred: inferring imports the model in a subprocess, 3 of this stage's seconds
            pip_requirements=mlflow.onnx.get_default_pip_requirements(),
            # stated, not inferred from an example input, which MLflow would also run the model on: 0.5 s
            signature=ModelSignature(
                inputs=Schema([TensorSpec(np.dtype(np.float32), (1, 3, size, size), "image")]),
                outputs=Schema(
                    [TensorSpec(np.dtype(np.float32), (1, len(checkpoint.labels)), "classLabelProbs")]
                ),
            ),
        )
        mlflow.set_tag("model_version", str(model.registered_model_version))  # which version this run made
    log.info(
        "wrote %s (%s, %.1f MB) and %s (float32, %.1f MB)",
        mlpackage,
        cfg.model.precision,
        sizes["mlpackage_bytes"] / 2**20,
        onnx_path,
        sizes["onnx_bytes"] / 2**20,
    )


main = stage_entry(run)

if __name__ == "__main__":
    main()
