"""Stage `convert`: one Core ML model and its ONNX twin, backbone and head
together, taking a plain RGB image (SPEC 5)."""

import json
import logging
from pathlib import Path

import coremltools as ct
import coremltools.optimize.coreml as cto
import mlflow
import numpy as np
import onnx
import torch
from omegaconf import DictConfig
from torch import nn

from pipeline import tracking
from pipeline.backbone import Normalize, load_backbone
from pipeline.config import stage_entry
from pipeline.files import write_json
from pipeline.train import load_checkpoint

log = logging.getLogger(__name__)
logging.getLogger("coremltools").setLevel(logging.WARNING)  # one line per removed op otherwise

# model.precision -> how Core ML computes; "int8" also stores weights as 8-bit
# integers (per-channel linear quantization with a zero point), computing in float16.
COMPUTE_PRECISION = {
    "float32": ct.precision.FLOAT32,
    "float16": ct.precision.FLOAT16,
    "int8": ct.precision.FLOAT16,
}


class ImageToProbabilities(nn.Module):
    """(1, 3, S, S) RGB pixels 0..255 -> class probabilities, normalising inside."""

    def __init__(self, normalize: nn.Module | None, backbone: nn.Module, head: nn.Module):
        super().__init__()
        self.normalize = normalize or nn.Identity()
        self.backbone, self.head = backbone, head

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(self.normalize(image))).softmax(dim=1)


def full_model(extractor: DictConfig, head: nn.Module, normalize_inside: bool) -> ImageToProbabilities:
    normalize = Normalize(extractor.mean, extractor.std) if normalize_inside else None
    return ImageToProbabilities(normalize, load_backbone(extractor), head).eval()


def core_ml_image_input(extractor: DictConfig) -> ct.ImageType:
    """Core ML's image scale is one number: it needs one std for all channels."""
    if len(set(extractor.std)) != 1:
        raise ValueError(
            f"extractor {extractor.name}: Core ML needs equal std per channel, got {list(extractor.std)}"
        )
    std = extractor.std[0]
    size = extractor.input_size
    return ct.ImageType(
        name="image",
        shape=(1, 3, size, size),
        scale=1.0 / (255.0 * std),
        bias=[-m / std for m in extractor.mean],
        color_layout=ct.colorlayout.RGB,
    )


def to_core_ml(cfg: DictConfig, head: nn.Module, checkpoint: dict) -> ct.models.MLModel:
    extractor, labels = cfg.extractor, checkpoint["labels"]
    model = full_model(extractor, head, normalize_inside=False)  # the image input normalises
    example = torch.rand(1, 3, extractor.input_size, extractor.input_size) * 255
    # torch.export fixes the input size, which turns timm's TF-style dynamic
    # "same" padding into constants that Core ML accepts (jit.trace does not).
    exported = torch.export.export(model, (example,)).run_decompositions({})
    mlmodel = ct.convert(
        exported,
        inputs=[core_ml_image_input(extractor)],
        classifier_config=ct.ClassifierConfig(labels),
        convert_to="mlprogram",
        compute_precision=COMPUTE_PRECISION[cfg.model.precision],
        # 8-bit weights need iOS 16's constexpr dequantisation op
        minimum_deployment_target=ct.target.iOS16 if cfg.model.precision == "int8" else ct.target.iOS15,
    )
    if cfg.model.precision == "int8":
        # Asymmetric ("linear": a zero point per output channel): the 256 steps span the
        # channel's own min..max (0 included), not -max|w|..max|w|. After BatchNorm folding,
        # a third of the channels reach less than half as far on one side of 0; symmetric
        # steps lost a demo test image where these lose none (tests/test_models.py). Weights
        # of 2048 elements or fewer (the first few convs) stay float16: coremltools' default.
        quantize = cto.OpLinearQuantizerConfig(mode="linear", dtype="int8")
        # Channels all but zero after folding (|w| < 1e-5) get a float16 scale of 0 and
        # decode to exactly 0; numpy's divide-by-zero warnings about them are noise.
        with np.errstate(divide="ignore", invalid="ignore"):
            mlmodel = cto.linear_quantize_weights(mlmodel, cto.OptimizationConfig(global_config=quantize))
    spec = mlmodel.get_spec()
    probabilities = next(o.name for o in spec.description.output if o.name != "classLabel")
    ct.utils.rename_feature(spec, probabilities, "classLabelProbs")
    mlmodel = ct.models.MLModel(spec, weights_dir=mlmodel.weights_dir)
    mlmodel.author = cfg.model.author
    mlmodel.license = cfg.model.license
    mlmodel.short_description = cfg.model.short_description
    mlmodel.version = str(cfg.model.version)
    mlmodel.input_description["image"] = (
        f"RGB image, {extractor.input_size}x{extractor.input_size}, center-cropped"
    )
    mlmodel.output_description["classLabel"] = "Most likely label"
    mlmodel.output_description["classLabelProbs"] = "Probability of each label"
    mlmodel.user_defined_metadata.update(
        {
            "extractor": extractor.name,
            "architecture": extractor.architecture,
            "labels": json.dumps(labels, ensure_ascii=False),  # labels may hold commas
            "trained_at": checkpoint["trained_at"],
            "data_fingerprint": checkpoint["data_fingerprint"],
        }
    )
    return mlmodel


def to_onnx(cfg: DictConfig, head: nn.Module, checkpoint: dict, path: Path) -> None:
    """Same contract as the Core ML model: `image` is (1, 3, S, S) float RGB 0..255."""
    size = cfg.extractor.input_size
    model = full_model(cfg.extractor, head, normalize_inside=True)
    torch.onnx.export(
        model,
        (torch.rand(1, 3, size, size) * 255,),
        path,
        input_names=["image"],
        output_names=["classLabelProbs"],
        external_data=False,
        verbose=False,
    )
    proto = onnx.load(path)
    for key, value in {
        "labels": json.dumps(checkpoint["labels"], ensure_ascii=False),
        "extractor": cfg.extractor.name,
        "input": f"image: float32 (1, 3, {size}, {size}) RGB 0..255, center-cropped",
    }.items():
        proto.metadata_props.add(key=key, value=value)
    onnx.save(proto, path)


def size_on_disk(path: Path) -> int:
    return (
        sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        if path.is_dir()
        else path.stat().st_size
    )


def run(cfg: DictConfig) -> None:
    head, checkpoint = load_checkpoint(cfg.paths.checkpoint)
    models = Path(cfg.paths.models_dir)
    models.mkdir(parents=True, exist_ok=True)
    mlpackage, onnx_path = models / f"{cfg.model.name}.mlpackage", models / f"{cfg.model.name}.onnx"
    to_core_ml(cfg, head, checkpoint).save(str(mlpackage))
    to_onnx(cfg, head, checkpoint, onnx_path)
    sizes = {
        "precision": cfg.model.precision,
        "mlpackage_bytes": size_on_disk(mlpackage),
        "onnx_bytes": size_on_disk(onnx_path),
    }
    write_json(cfg.paths.model_report, sizes)
    with tracking.resumed_run(cfg, checkpoint["mlflow_run_id"]):
        mlflow.log_metrics(
            {"mlpackage_mb": sizes["mlpackage_bytes"] / 2**20, "onnx_mb": sizes["onnx_bytes"] / 2**20}
        )
        mlflow.log_artifact(str(mlpackage), "coreml")
        model = mlflow.onnx.log_model(
            onnx.load(onnx_path),
            name="model",
            registered_model_name=cfg.model.name,
            onnx_execution_providers=["CPUExecutionProvider"],
            input_example=np.zeros((1, 3, cfg.extractor.input_size, cfg.extractor.input_size), np.float32),
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
