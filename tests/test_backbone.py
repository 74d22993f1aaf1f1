import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data as photos
from torchvision.models import ResNet50_Weights

from pipeline.data.images import to_square
from pipeline.features.backbone import Normalize, load_classifier
from pipeline.project.config import compose_config

IMAGENET_LABELS = ResNet50_Weights.IMAGENET1K_V2.meta["categories"]  # ships with torchvision


@pytest.mark.parametrize("extractor", ["v1", "v2"])
@pytest.mark.parametrize(
    ("photo", "expected"),
    [("chelsea", {"tabby", "tiger cat", "Egyptian cat"}), ("coffee", {"espresso", "cup", "coffee mug"})],
)
def test_pretrained_weights_recognise_imagenet_classes(extractor, photo, expected):
    """Wrongly loaded weights give noise: the photo's class would not be in the top 5."""
    cfg = compose_config(f"extractor={extractor}").extractor
    model = torch.nn.Sequential(Normalize(cfg.mean, cfg.std), load_classifier(cfg))
    pixels = to_square(Image.fromarray(getattr(photos, photo)()), cfg.input_size, "centerCrop")
    with torch.inference_mode():
        logits = model(torch.from_numpy(pixels.astype(np.float32)).permute(2, 0, 1)[None])
    top5 = {IMAGENET_LABELS[i] for i in logits[0].topk(5).indices}
    assert top5 & expected, f"{extractor} top 5 for {photo}: {top5}"
