"""Create ML's augmentations (docs/accuracy.md): each adds transformed copies of every
training image, whose features are cached like an original's.

A copy is a pure function of the image's content, the augmentation, the copy's
number and the seed: reruns draw the same copies, in any order, on any thread.
"""

import hashlib
import json
from dataclasses import dataclass
from importlib.metadata import version

import numpy as np
from omegaconf import DictConfig

from pipeline.data.images import SettingError

BORDER_REFLECT_101 = 4  # cv2's: rotated corners mirror the image rather than going black

# augmentation -> the albumentations pipelines its copies take in turn, each a
# list of (transform, arguments). Most draw fresh random parameters per copy;
# flip has three distinct outcomes, so its copies cycle through them.
AUGMENTATIONS = {
    "noise": [[("GaussNoise", {"std_range": [0.03, 0.1]})]],
    "blur": [[("GaussianBlur", {"sigma_limit": [0.8, 2.0]})]],
    "crop": [[("Affine", {"scale": [1.15, 1.5], "translate_percent": [-0.1, 0.1]})]],
    "exposure": [[("RandomBrightnessContrast", {"brightness_limit": [-0.3, 0.3], "contrast_limit": 0})]],
    "flip": [
        [("HorizontalFlip", {})],
        [("VerticalFlip", {})],
        [("HorizontalFlip", {}), ("VerticalFlip", {})],
    ],
    "rotate": [[("Rotate", {"limit": 30, "border_mode": BORDER_REFLECT_101})]],
}


@dataclass(frozen=True)
class Copy:
    augmentation: str
    number: int
    key: str  # names the copy in the feature cache: changes when its recipe or seed does


def planned_copies(augment: DictConfig) -> list[Copy]:
    """The copies `augment` asks for, of every training image."""
    unknown = set(augment) - set(AUGMENTATIONS) - {"seed"}
    if unknown:
        known = ", ".join(AUGMENTATIONS)
        raise SettingError(f"augment.{sorted(unknown)[0]}: unknown augmentation, known are {known}")
    copies = []
    for name in AUGMENTATIONS:
        count = int(augment.get(name, 0))
        if count < 0:
            raise SettingError(f"augment.{name} is a number of copies, not {count}")
        for number in range(count):
            recipe = {
                "steps": recipe_of(name, number),
                "albumentations": version("albumentations"),
                "seed": int(augment.seed),
            }
            digest = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:8]
            copies.append(Copy(name, number, f"{name}{number}-{digest}"))
    return copies


def recipe_of(name: str, number: int) -> list:
    choices = AUGMENTATIONS[name]
    return choices[number % len(choices)]


def augmented(pixels: np.ndarray, image_sha256: str, copy: Copy) -> np.ndarray:
    """`copy` of an image's decoded (S, S, 3) uint8 pixels."""
    # albumentations imports torch (seconds): only runs that make copies pay for it.
    import albumentations

    steps = [
        getattr(albumentations, kind)(p=1.0, **args)
        for kind, args in recipe_of(copy.augmentation, copy.number)
    ]
    seed = int(hashlib.sha256(f"{image_sha256}-{copy.key}".encode()).hexdigest()[:8], 16)
    return albumentations.Compose(steps, seed=seed)(image=pixels)["image"]
