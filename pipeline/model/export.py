"""The exported models in two parts: the backbone, converted once per extractor and
kept beside its features, and the head, converted on every `convert` and joined to
it (docs/pipeline.md, docs/xcode-and-onnx.md).

Converting the backbone takes 15-20 s on a 2-core CPU (torch.export, Core ML's
passes, int8 quantisation), the head a fraction of a second, and a new head is what
most `convert` runs bring. The backbone's conversions are content-addressed like
its features: they live in the feature cache's folder for the extractor's
fingerprint (weights, input size, normalisation, crop and scale), so a new
extractor gets new ones and nothing else does.
"""

import logging
import os
import shutil
import sys
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cached_property
from pathlib import Path

import numpy as np
import onnx
import torch
from omegaconf import DictConfig
from torch import nn

from pipeline.features.backbone import fix_same_padding, image_features, onnx_graph, save_onnx
from pipeline.model.onnx_model import FEATURES as FEATURES_NAME


def import_coremltools():
    """coremltools, imported without scikit-learn and torchvision.

    It imports both only to offer converters for them, which this project does not
    use: 2.5 s of a `convert` that finds its backbone cached, whose budget is 10 s
    (`python -X importtime -m pipeline.convert`). They stay importable afterwards,
    and nothing changes where either is imported already.
    """
    hidden = [name for name in ("sklearn", "torchvision") if name not in sys.modules]
    sys.modules.update(dict.fromkeys(hidden))  # None there: `import` raises ImportError, which it expects
    try:
        import coremltools
    finally:
        for name in hidden:
            del sys.modules[name]
    return coremltools


ct = import_coremltools()
log = logging.getLogger(__name__)
logging.getLogger("coremltools").setLevel(logging.WARNING)  # one line per removed op otherwise

# The backbone conversions' folder inside the feature cache's folder for an extractor.
CACHE_FOLDER = "converted-backbone"
# Bump when the backbone's conversion below changes what it produces: cached
# conversions of an older format are then made again.
FORMAT = 1

# model.precision -> how Core ML computes; "int8" also stores the backbone's weights as
# 8-bit integers (per-channel linear quantization with a zero point), computing in float16.
COMPUTE_PRECISION = {
    "float32": ct.precision.FLOAT32,
    "float16": ct.precision.FLOAT16,
    "int8": ct.precision.FLOAT16,
}
# ML programs inside a pipeline need Core ML 6 (iOS 16, macOS 13), as 8-bit weights do.
DEPLOYMENT_TARGET = ct.target.iOS16


class Probabilities(nn.Module):
    """The head and its softmax: features (B, D) -> label probabilities (B, L)."""

    def __init__(self, head: nn.Module):
        super().__init__()
        self.head = head

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(features).softmax(dim=1)


def opset(graph: onnx.ModelProto) -> int:
    return next(entry.version for entry in graph.opset_import if entry.domain in ("", "ai.onnx"))


def core_ml_image_input(extractor: DictConfig) -> ct.ImageType:
    """The normalisation as the image input's scale and bias: an app passes a plain image.

    Core ML's scale is one number, so the extractor needs one std for all channels.
    """
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


# The tensor between backbone and head, in both formats. float32 on both sides of the
# Core ML pipeline: a pipeline's parts must agree on it exactly, and iOS 16 converters
# would otherwise pick float16 for float16 models only.
FEATURES = ct.TensorType(name=FEATURES_NAME, dtype=np.float32)


def backbone_to_core_ml(backbone: nn.Module, extractor: DictConfig, precision: str) -> ct.models.MLModel:
    """Image `image` -> `features` (1, D) as an ML program in `precision`; `backbone`
    takes normalised pixels, as the image input's scale and bias make them, and pads
    by constants (Core ML rejects padding computed from the input's shape)."""
    example = torch.rand(1, 3, extractor.input_size, extractor.input_size)
    exported = torch.export.export(backbone, (example,)).run_decompositions({})
    model = ct.convert(
        exported,
        inputs=[core_ml_image_input(extractor)],
        outputs=[FEATURES],
        convert_to="mlprogram",
        compute_precision=COMPUTE_PRECISION[precision],
        minimum_deployment_target=DEPLOYMENT_TARGET,
    )
    if precision != "int8":
        return model
    # Asymmetric ("linear": a zero point per output channel): the 256 steps span the
    # channel's own min..max (0 included), not -max|w|..max|w|. After BatchNorm folding,
    # a third of the channels reach less than half as far on one side of 0; symmetric
    # steps lost a demo test image where these lose none (tests/test_models.py). Weights
    # of 2048 elements or fewer (the first few convs) stay float16: coremltools' default.
    import coremltools.optimize.coreml as cto  # 1.5 s of imports, for this only

    quantize = cto.OpLinearQuantizerConfig(mode="linear", dtype="int8")
    # Channels all but zero after folding (|w| < 1e-5) get a float16 scale of 0 and
    # decode to exactly 0; numpy's divide-by-zero warnings about them are noise.
    with np.errstate(divide="ignore", invalid="ignore"):
        return cto.linear_quantize_weights(model, cto.OptimizationConfig(global_config=quantize))


class BackboneConversions:
    """One extractor's backbone as Core ML (one per precision) and as ONNX, made on first use.

    Both take the image as the final models do (RGB, 0..255, normalised inside)
    and return the pooled features (1, D).
    """

    def __init__(self, feature_cache: str | Path, extractor: DictConfig, about: dict):
        """`about` is the feature cache's description of `extractor` (a checkpoint's `extractor`)."""
        self.extractor = extractor
        self.dir = Path(feature_cache) / f"{about['name']}-{about['fingerprint']}" / CACHE_FOLDER

    @cached_property
    def _scratch(self) -> tempfile.TemporaryDirectory:
        return tempfile.TemporaryDirectory(prefix="backbone-")

    @cached_property
    def _image_features(self) -> nn.Module:
        """Loaded once, for whichever conversions are missing."""
        return fix_same_padding(image_features(self.extractor), self._example)

    @property
    def _example(self) -> torch.Tensor:
        size = self.extractor.input_size
        return torch.rand(1, 3, size, size) * 255

    def core_ml(self, precision: str) -> ct.models.MLModel:
        path = self.dir / f"coreml-{precision}-v{FORMAT}.mlpackage"
        if not path.exists():
            log.info(
                "converting the %s backbone to Core ML (%s), once: %s", self.extractor.name, precision, path
            )
            self.dir.mkdir(parents=True, exist_ok=True)
            _, backbone = self._image_features  # not its Normalize: the image input's scale and bias
            model = backbone_to_core_ml(backbone, self.extractor, precision)
            # coremltools saves only to a name ending in .mlpackage
            partial = path.with_name(f".{path.stem}.{os.getpid()}.tmp.mlpackage")
            model.save(str(partial))
            try:
                partial.rename(path)  # a folder: rename is atomic, but will not replace
            except OSError:  # another `convert` got there first with the same conversion
                shutil.rmtree(partial)
        # Opening a package rewrites its Manifest.json in place (coremltools' ModelPackage):
        # a copy is opened, so that a cached package is only ever written whole, once.
        copy = Path(self._scratch.name) / path.name
        shutil.copytree(path, copy, dirs_exist_ok=True)
        return ct.models.MLModel(str(copy), skip_model_load=True)

    def onnx(self) -> onnx.ModelProto:
        path = self.dir / f"onnx-image-v{FORMAT}.onnx"
        if not path.exists():
            log.info("exporting the %s backbone to ONNX, once: %s", self.extractor.name, path)
            self.dir.mkdir(parents=True, exist_ok=True)
            save_onnx(onnx_graph(self._image_features, self._example, ("image", FEATURES.name)), path)
        return onnx.load(path)


def head_to_core_ml(
    head: nn.Module, in_features: int, labels: list[str], precision: str
) -> ct.models.MLModel:
    """`features` -> `classLabel` and `classLabelProbs`, an ML program classifier.

    In float16 for int8 models too: a head has a few thousand weights, where 8 bits
    would save kilobytes and cost accuracy.
    """
    example = torch.zeros(1, in_features)
    with warnings.catch_warnings():
        # Traced, though torch calls jit.trace deprecated: torch.export would import
        # torch._dynamo, 1.5 s more for a few matrix products. The backbone is exported.
        warnings.simplefilter("ignore", FutureWarning)
        traced = torch.jit.trace(Probabilities(head).eval(), example)
    model = ct.convert(
        traced,
        inputs=[ct.TensorType(name=FEATURES.name, shape=example.shape, dtype=np.float32)],
        # named so that coremltools need not rename (and warn about) the traced "15";
        # a classifier calls it classLabel_probs all the same
        outputs=[ct.TensorType(name="probabilities")],
        classifier_config=ct.ClassifierConfig(labels),
        convert_to="mlprogram",
        compute_precision=COMPUTE_PRECISION[precision],
        minimum_deployment_target=DEPLOYMENT_TARGET,
    )
    spec = model.get_spec()
    ct.utils.rename_feature(spec, spec.description.predictedProbabilitiesName, "classLabelProbs")
    return ct.models.MLModel(spec, weights_dir=model.weights_dir, skip_model_load=True)


@contextmanager
def temporary_files_in(folder: str) -> Iterator[None]:
    before, tempfile.tempdir = tempfile.tempdir, folder
    try:
        yield
    finally:
        tempfile.tempdir = before


def core_ml_classifier(backbone: ct.models.MLModel, head: ct.models.MLModel) -> ct.models.MLModel:
    """Backbone and head as one pipeline classifier, the model type Create ML's image
    classifiers have: Vision returns VNClassificationObservations from it."""
    with tempfile.TemporaryDirectory(prefix="pipeline-") as scratch:
        # make_pipeline writes a first package to the temporary folder and never deletes
        # it: a 6.6 MB /tmp/tmp*.mlpackage per `convert` (coremltools 9.0) unless it goes here
        with temporary_files_in(scratch):
            pipeline = ct.utils.make_pipeline(backbone, head)
        return pipeline_classifier(pipeline, head)


def pipeline_classifier(pipeline: ct.models.MLModel, head: ct.models.MLModel) -> ct.models.MLModel:
    spec = pipeline.get_spec()
    spec.pipelineClassifier.pipeline.CopyFrom(spec.pipeline)  # the type is a oneof: this replaces it
    head_spec = head.get_spec()
    spec.description.predictedFeatureName = head_spec.description.predictedFeatureName
    spec.description.predictedProbabilitiesName = head_spec.description.predictedProbabilitiesName
    return ct.models.MLModel(spec, weights_dir=pipeline.weights_dir, skip_model_load=True)


def onnx_classifier(backbone: onnx.ModelProto, head: nn.Module, in_features: int) -> onnx.ModelProto:
    """`image` -> `classLabelProbs`: the cached backbone graph, then the head's."""
    graph = onnx_graph(
        Probabilities(head),
        torch.zeros(1, in_features),
        (FEATURES.name, "classLabelProbs"),
        opset=opset(backbone),
    )
    # the head's own names (weights, intermediate values) must not collide with the backbone's
    graph = onnx.compose.add_prefix(graph, "head/", rename_inputs=False, rename_outputs=False)
    # a backbone cached by an older torch may be of an older IR version, which a newer reads
    graph.ir_version = backbone.ir_version = max(graph.ir_version, backbone.ir_version)
    return onnx.compose.merge_models(
        backbone, graph, io_map=[(FEATURES.name, FEATURES.name)], producer_name="pipeline.convert"
    )
