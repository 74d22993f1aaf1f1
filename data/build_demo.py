"""Rebuild the bundled demo dataset from Debian's `openclipart-png` package.

Provenance only: the images it writes are committed under data/demo and
data/unseen, so nobody needs to run this. It records exactly which clip art became
which image.

    apt-get download openclipart-png && dpkg -x openclipart-png_*.deb /tmp/oc
    python data/build_demo.py /tmp/oc/usr/share/openclipart/png

data/unseen holds clip art of categories the demo has no label for, made the same
way: what a model trained on the demo should answer "unknown" to (README "Can I
trust it?").
"""

import hashlib
import random
import sys
from pathlib import Path

from PIL import Image

LABELS = {  # demo label -> openclipart category folder
    "flag": "signs_and_symbols/flags",
    "fruit": "food/fruit",
    "mammal": "animals/mammals",
    "vehicle": "transportation/vehicles",
}
UNSEEN = ["buildings", "electronics", "tools", "office", "people", "science"]  # none of the demo's labels
TRAIN_PER_LABEL, TEST_PER_LABEL = 40, 15
UNSEEN_PER_CATEGORY = 10
SHORT_SIDE = 300  # Create ML warns below 299 px
BACKGROUND = (255, 255, 255)


def distinct_images(folder: Path) -> list[Path]:
    seen, kept = set(), []
    for path in sorted(folder.rglob("*.png")):
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if digest not in seen and "_bw" not in path.name:
            seen.add(digest)
            kept.append(path)
    return kept


def to_demo_jpeg(source: Path, target: Path) -> None:
    image = Image.open(source).convert("RGBA")  # sources are clip art well under Pillow's limit
    scale = SHORT_SIDE / min(image.size)
    image = image.resize((round(image.width * scale), round(image.height * scale)), Image.LANCZOS)
    flat = Image.new("RGB", image.size, BACKGROUND)
    flat.paste(image, mask=image.getchannel("A"))
    target.parent.mkdir(parents=True, exist_ok=True)
    flat.save(target, quality=80, optimize=True)


def main(clipart_root: Path, out_root: Path) -> None:
    rng = random.Random(0)
    seen_anywhere: set[str] = set()
    for label, category in LABELS.items():
        images = distinct_images(clipart_root / category)
        rng.shuffle(images)
        written: set[str] = set()
        for source in images:
            if len(written) == TRAIN_PER_LABEL + TEST_PER_LABEL:
                break
            split = "train" if len(written) < TRAIN_PER_LABEL else "test"
            target = out_root / split / label / f"{source.stem}.jpg"
            to_demo_jpeg(source, target)
            digest = hashlib.sha256(target.read_bytes()).hexdigest()
            if digest in written or digest in seen_anywhere:  # the clip art repeats itself
                target.unlink()
            else:
                written.add(digest)
        seen_anywhere.update(written)


def unseen(clipart_root: Path, out_root: Path) -> None:
    rng = random.Random(0)
    for category in UNSEEN:
        images = distinct_images(clipart_root / category)
        rng.shuffle(images)
        for source in images[:UNSEEN_PER_CATEGORY]:
            to_demo_jpeg(source, out_root / category / f"{source.stem}.jpg")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(__file__).parent / "demo")
    unseen(Path(sys.argv[1]), Path(__file__).parent / "unseen")
