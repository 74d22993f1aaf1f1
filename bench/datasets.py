"""Benchmark image sets of different kinds, built reproducibly from public Debian packages.

Each set is `<root>/<name>/train/<label>/...` and `<root>/<name>/test/<label>/...`,
what `data.train_dir` and `data.test_dir` take. A set already built is left as it
is. The sources come from Debian 12 (bookworm); the builds below were made from
openclipart-png 1:0.18+dfsg-19, fonts-noto-color-emoji 2.042-0+deb12u1 and
unicode-data 15.0.0-1:

    cd /tmp && apt-get download openclipart-png fonts-noto-color-emoji unicode-data
    for deb in openclipart-png_*.deb fonts-noto-color-emoji_*.deb unicode-data_*.deb; do
        dpkg -x "$deb" /tmp/bench-sources
    done
    python bench/datasets.py                    # into bench/.data (ignored by git)
    python bench/datasets.py --root DIR --sources /tmp/bench-sources objects emoji

The sets:
- demo: the bundled data/demo (4 labels, 60 test images; see data/build_demo.py).
- objects: openclipart clip art of 8 categories that the demo does not use, kept as
  the PNGs they are (transparency, original aspect ratio; only huge ones scaled down).
- clipart: openclipart clip art of 9 more categories, composited on white, 300 px
  shorter side, JPEG, exactly as the demo was made.
- coarse: openclipart's 11 top-level categories (animals, food, people, ...) as
  labels, made like clipart, with 25 test images per label (275 in all).
- emoji: Noto Color Emoji glyphs (136x128 RGBA PNGs), labelled by their Unicode
  emoji group/subgroup (emoji-test.txt), 10 labels.

Every image is distinct by content (sha256 of the written file; an image found
under two labels is left out). Left out too: black-and-white `_bw` variants, icons
under 64 px, one "Linked Image Not Found" placeholder, emoji skin-tone variants.
Variants of one drawing, as far as names tell (`eagle_01`, `eagle_02`; "man biking",
"woman biking"), go to the same split, at most 4 of them, so that the test set holds
no recolouring of a training image and no series fills a label. Per label: 12, 13 or 25
test images, then up to 40 training images. Same sources, same sets, byte for byte.
"""

import argparse
import hashlib
import io
import random
import re
import shutil
import sys
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_ROOT = ROOT / "bench" / ".data"
DEFAULT_SOURCES = Path("/tmp/bench-sources")

# Where each Debian package puts what we read, relative to the `dpkg -x` folder.
OPENCLIPART = ("openclipart-png", "usr/share/openclipart/png")
EMOJI_FONT = ("fonts-noto-color-emoji", "usr/share/fonts/truetype/noto/NotoColorEmoji.ttf")
EMOJI_TEST = ("unicode-data", "usr/share/unicode/emoji/emoji-test.txt")

SEED = 0
TRAIN_PER_LABEL = 40  # at most; labels with fewer distinct drawings get what is left after the test images
MIN_TRAIN_PER_LABEL = 20
MAX_SIDE = 2048  # "huge": longer sides are scaled down to HUGE_TO (openclipart has 16000 px food)
HUGE_TO = 1024
MIN_SIDE = 64  # longer side below this: a toolbar icon, not a drawing of the thing
MAX_PER_GROUP = 4  # a series (31 `smileyNNN`, 12 pantyhose) would fill a label with one drawing


class MissingSource(Exception):
    """A source package is not unpacked where we look; the message says how to get it."""


@dataclass(frozen=True)
class Item:
    label: str
    group: str  # variants of one drawing share it and stay in one split
    name: str  # file name to write, suffix included
    data: bytes


def source(sources: Path, package_and_path: tuple[str, str]) -> Path:
    package, relative = package_and_path
    path = sources / relative
    if not path.exists():
        raise MissingSource(
            f"{path} is missing: unpack Debian's {package} there "
            f"(apt-get download {package} && dpkg -x {package}_*.deb {sources}; see bench/datasets.py)"
        )
    return path


@contextmanager
def no_pixel_limit() -> Iterator[None]:
    """Our own trusted sources include 168-megapixel clip art; Pillow's bomb guard is
    global, so it is lifted only while we read them (the pipeline may run in this process)."""
    limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = limit


# --- openclipart ------------------------------------------------------------------


@dataclass(frozen=True)
class Category:
    folder: str  # under usr/share/openclipart/png, subfolders included
    exclude: tuple[str, ...] = ()  # subfolders that are another kind of thing


# Categories the demo (flags, fruit, mammals, vehicles) does not use, each with at
# least 13 + 20 distinct drawings, and no category in both sets.
OBJECTS = {
    "bird": Category("animals/birds"),
    "insect": Category("animals/bugs"),
    "music": Category("recreation/music"),  # instruments, notes, records
    "computer": Category("computer/hardware"),
    "plant": Category("plants"),
    "tool": Category("tools", exclude=("weapons", "toys")),
    "building": Category("buildings", exclude=("furniture",)),
    "clothing": Category("people/clothing"),
}
CLIPART = {
    "dessert": Category("food/desserts"),
    "beverage": Category("food/beverages"),
    "sport": Category("recreation/sports"),
    "electronics": Category("electronics"),
    "weapon": Category("tools/weapons"),
    "office": Category("office"),
    "holiday": Category("recreation/holiday"),
    "map": Category("geography"),  # maps, globes, country outlines
    "road-sign": Category("transportation/roadsigns"),
}
# openclipart's top-level categories as labels: broad, mixed kinds of drawing each,
# and 25 test images per label, so that one image is 0.36 points (the others: 0.8-1).
COARSE = {
    "animal": Category("animals"),
    "building": Category("buildings"),
    "food": Category("food"),
    "geography": Category("geography"),
    "office": Category("office"),
    "people": Category("people"),
    "plant": Category("plants"),
    "recreation": Category("recreation"),
    "sign": Category("signs_and_symbols"),
    "tool": Category("tools"),
    "transport": Category("transportation"),
}


def drawing_group(path: Path) -> str:
    """`eagle_01.png`, `eagle_02.png` -> `eagle`: numbered variants of one drawing."""
    return re.sub(r"[_\-\s\d]+$", "", path.stem.lower()) or path.stem


BROKEN = {"animals/birds/duck_yellow_ii_kurt_cagl_.png"}  # renders as "Linked Image Not Found"


def clipart_files(root: Path, category: Category) -> list[Path]:
    folder = root / category.folder
    excluded = [folder / name for name in category.exclude]
    return [
        path
        for path in sorted(folder.rglob("*.png"))
        if "_bw" not in path.name
        and path.relative_to(root).as_posix() not in BROKEN
        and not any(path.is_relative_to(skip) for skip in excluded)
    ]


def as_is_png(path: Path) -> bytes | None:
    """The PNG as it is (alpha, aspect ratio), scaled down only when huge; None for icons."""
    data = path.read_bytes()
    with no_pixel_limit(), Image.open(io.BytesIO(data)) as image:
        if max(image.size) < MIN_SIDE:
            return None
        if max(image.size) <= MAX_SIDE:
            return data
        image.thumbnail((HUGE_TO, HUGE_TO), Image.LANCZOS)  # keeps the aspect ratio
        out = io.BytesIO()
        image.save(out, format="PNG", optimize=True)
        return out.getvalue()


def on_white_jpeg(path: Path) -> bytes | None:
    """As data/build_demo.py makes the demo: 300 px shorter side, on white, JPEG q80."""
    with no_pixel_limit(), Image.open(path) as opened:
        if max(opened.size) < MIN_SIDE:
            return None
        image = opened.convert("RGBA")
    scale = 300 / min(image.size)
    image = image.resize((round(image.width * scale), round(image.height * scale)), Image.LANCZOS)
    flat = Image.new("RGB", image.size, (255, 255, 255))
    flat.paste(image, mask=image.getchannel("A"))
    out = io.BytesIO()
    flat.save(out, format="JPEG", quality=80, optimize=True)
    return out.getvalue()


def clipart_items(root: Path, categories: dict[str, Category], encode, suffix: str) -> list[Item]:
    items = []
    for label, category in categories.items():
        for path in clipart_files(root, category):
            data = encode(path)
            if data is not None:
                items.append(Item(label, drawing_group(path), f"{path.stem}{suffix}", data))
    return items


def build_objects(target: Path, sources: Path) -> None:
    root = source(sources, OPENCLIPART)
    write_set(clipart_items(root, OBJECTS, as_is_png, ".png"), target, test_per_label=13)


def build_clipart(target: Path, sources: Path) -> None:
    root = source(sources, OPENCLIPART)
    write_set(clipart_items(root, CLIPART, on_white_jpeg, ".jpg"), target, test_per_label=12)


def build_coarse(target: Path, sources: Path) -> None:
    root = source(sources, OPENCLIPART)
    write_set(clipart_items(root, COARSE, on_white_jpeg, ".jpg"), target, test_per_label=25)


# --- emoji ------------------------------------------------------------------------

# label -> emoji-test.txt subgroups. Labels whose subgroups are mostly recolourings
# (clock faces, coloured squares, keycaps, skin tones) are left out: they test nothing.
EMOJI = {
    "mammal": ("animal-mammal",),
    "other-animal": ("animal-bird", "animal-marine", "animal-bug", "animal-reptile", "animal-amphibian"),
    "fruit-vegetable": ("food-fruit", "food-vegetable"),
    "prepared-food": ("food-prepared", "food-asian"),
    "ground-transport": ("transport-ground",),
    "sky-weather": ("sky & weather",),
    "clothing": ("clothing",),
    "face": (
        "face-smiling",
        "face-affection",
        "face-tongue",
        "face-hand",
        "face-neutral-skeptical",
        "face-sleepy",
        "face-unwell",
        "face-hat",
        "face-glasses",
        "face-concerned",
        "face-negative",
        "face-costume",
    ),
    "flag": ("country-flag",),
    "building": ("place-building", "place-religious"),
}
EMOJI_SIZE = 109  # the one size at which Noto Color Emoji's bitmaps are drawn 1:1
GLYPH_WIDTH = 136  # ... and they are 136x128 then
SKIN_TONES = range(0x1F3FB, 0x1F400)
GENDERED = re.compile(r"^(man|woman|person|men|women|people) ")


def emoji_list(emoji_test: Path) -> Iterator[tuple[str, str, str]]:
    """(subgroup, emoji, name) of each fully-qualified emoji without a skin tone."""
    subgroup = None
    for line in emoji_test.read_text(encoding="utf-8").splitlines():
        if line.startswith("# subgroup:"):
            subgroup = line.split(":", 1)[1].strip()
        elif line and not line.startswith("#"):
            codes, rest = line.split(";", 1)
            status, comment = rest.split("#", 1)
            points = [int(code, 16) for code in codes.split()]
            if status.strip() == "fully-qualified" and not any(p in SKIN_TONES for p in points):
                name = comment.split(maxsplit=2)[2]  # "😀 E1.0 grinning face"
                yield subgroup, "".join(map(chr, points)), name


def render_emoji(font: ImageFont.FreeTypeFont, emoji: str) -> bytes | None:
    """The glyph as an RGBA PNG; None when the font has no single glyph for it."""
    left, top, right, bottom = font.getbbox(emoji)
    if right - left > 1.2 * GLYPH_WIDTH:  # drawn as several glyphs side by side
        return None
    image = Image.new("RGBA", (right, bottom), (0, 0, 0, 0))
    ImageDraw.Draw(image).text((0, 0), emoji, font=font, embedded_color=True)
    if image.getbbox() is None:
        return None
    out = io.BytesIO()
    image.save(out, format="PNG", optimize=True)
    return out.getvalue()


def build_emoji(target: Path, sources: Path) -> None:
    font = ImageFont.truetype(str(source(sources, EMOJI_FONT)), EMOJI_SIZE)
    label_of = {subgroup: label for label, subgroups in EMOJI.items() for subgroup in subgroups}
    items = []
    for subgroup, emoji, name in emoji_list(source(sources, EMOJI_TEST)):
        if subgroup in label_of and (data := render_emoji(font, emoji)) is not None:
            file_name = re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_") + ".png"
            items.append(Item(label_of[subgroup], GENDERED.sub("", name), file_name, data))
    write_set(items, target, test_per_label=12)


# --- splitting and writing -----------------------------------------------------------


def distinct(items: list[Item]) -> list[Item]:
    """One item per content; content found under two labels is dropped (which is right?)."""
    labels, first = defaultdict(set), {}
    for item in items:
        digest = hashlib.sha256(item.data).hexdigest()
        labels[digest].add(item.label)
        first.setdefault(digest, item)
    return [item for digest, item in first.items() if len(labels[digest]) == 1]


def deal(groups: dict[str, list], test_count: int, rng: random.Random) -> tuple[list, list]:
    """(train, test): whole groups, in random order, into test until it holds
    `test_count`, the rest into train (bench/accuracy.py deals its reshuffles so too)."""
    order = sorted(groups)
    rng.shuffle(order)
    test, train = [], []
    for group in order:
        (test if len(test) < test_count else train).extend(groups[group])
    return train, test


def split_label(items: list[Item], test_count: int, rng: random.Random) -> tuple[list[Item], list[Item]]:
    """Whole groups into test until it holds `test_count`, then into train up to its cap."""
    groups = defaultdict(list)
    for item in items:
        if len(groups[item.group]) < MAX_PER_GROUP:
            groups[item.group].append(item)
    train, test = deal(groups, test_count, rng)
    return train[:TRAIN_PER_LABEL], test


def write_set(items: list[Item], target: Path, test_per_label: int) -> None:
    """Split per label and write the files; the set appears at `target` whole or not at all."""
    rng = random.Random(SEED)
    by_label = defaultdict(list)
    for item in distinct(items):
        by_label[item.label].append(item)
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    for label in sorted(by_label):
        train, test = split_label(by_label[label], test_per_label, rng)
        if len(train) < MIN_TRAIN_PER_LABEL:
            raise ValueError(f"{target.name}/{label}: only {len(train)} training images")
        for split, chosen in (("train", train), ("test", test)):
            folder = partial / split / label
            folder.mkdir(parents=True, exist_ok=True)
            for item in chosen:
                path = folder / item.name
                while path.exists():  # two drawings with one name in different subfolders
                    path = path.with_stem(path.stem + "_")
                path.write_bytes(item.data)
    partial.rename(target)


# --- the sets --------------------------------------------------------------------------

BUILDERS = {"objects": build_objects, "clipart": build_clipart, "coarse": build_coarse, "emoji": build_emoji}
NAMES = ["demo", *BUILDERS]


def dataset_dir(name: str, root: Path = DEFAULT_ROOT) -> Path:
    return ROOT / "data" / "demo" if name == "demo" else root / name


def ensure(name: str, root: Path = DEFAULT_ROOT, sources: Path = DEFAULT_SOURCES) -> Path:
    """The set's folder, built first if it is not there yet (MissingSource if it cannot be)."""
    target = dataset_dir(name, root)
    if not target.exists():
        BUILDERS[name](target, sources)
    return target


def counts(folder: Path) -> dict[str, dict[str, int]]:
    """{label: {"train": n, "test": n}} of a built set."""
    table = defaultdict(lambda: {"train": 0, "test": 0})
    for split in ("train", "test"):
        for label_dir in sorted(p for p in (folder / split).iterdir() if p.is_dir()):
            table[label_dir.name][split] = sum(1 for p in label_dir.rglob("*") if p.is_file())
    return dict(sorted(table.items()))


def describe(name: str, folder: Path) -> str:
    table = counts(folder)
    train = sum(c["train"] for c in table.values())
    test = sum(c["test"] for c in table.values())
    per_label = ", ".join(f"{label} {c['train']}/{c['test']}" for label, c in table.items())
    return f"{name}: {len(table)} labels, {train} train / {test} test images ({per_label})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", default=NAMES, help=f"sets to build (default: all of {NAMES})")
    parser.add_argument("--root", type=Path, default=DEFAULT_ROOT, help="where the sets go")
    parser.add_argument("--sources", type=Path, default=DEFAULT_SOURCES, help="where the .debs are unpacked")
    args = parser.parse_args()
    for name in args.names:
        if name not in NAMES:
            sys.exit(f"unknown set {name!r}: choose from {', '.join(NAMES)}")
        try:
            folder = ensure(name, args.root, args.sources)
        except MissingSource as error:
            sys.exit(str(error))
        print(describe(name, folder) + "  (label train/test)")


if __name__ == "__main__":
    main()
