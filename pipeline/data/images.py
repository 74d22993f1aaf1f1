"""Finding labelled images in folders and decoding them the one way training and
the exported models agree on (docs/your-images.md)."""

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import cv2
import numpy as np
import pillow_heif
from PIL import Image, ImageOps

from pipeline.data.storage import image_source, is_s3, read_bytes, s3_files

pillow_heif.register_heif_opener()

# Transparent pixels are composited on white, here and in the contract of the exported
# models (docs/xcode-and-onnx.md), so a PNG with alpha means the same thing in the app.
BACKGROUND = (255, 255, 255)


class DataError(Exception):
    """The data cannot be trained on at all; the message names the path."""


class SettingError(ValueError):
    """A setting has a value the pipeline cannot use; the message names the setting."""


@dataclass(frozen=True)
class Skipped:
    path: str
    reason: str


@dataclass(frozen=True)
class LabelledImage:
    path: str
    label: str
    sha256: str
    width: int
    height: int


def is_hidden(path: Path) -> bool:
    # .DS_Store, AppleDouble `._x.jpg`, .git and the like
    return path.name.startswith(".")


def check_image(path: str | Path | BinaryIO, max_pixels: int, decode: bool) -> tuple[int, int]:
    """(width, height) of a usable image (a file, or its bytes as a file object);
    ValueError with the reason otherwise.

    `decode` decodes the whole file (JPEG at 1/8 scale, which still reads every
    byte) to catch truncated files, whose header alone looks fine.
    """
    try:
        image = Image.open(path)
    except Image.DecompressionBombError as error:
        raise ValueError(f"image too large ({error})") from None
    except Exception as error:  # Pillow raises many types for non-images
        raise ValueError(f"not a readable image ({type(error).__name__}: {error})") from None
    with image:
        width, height = image.size
        if width * height > max_pixels:
            raise ValueError(f"image too large ({width}x{height} pixels > {max_pixels})")
        if decode:
            try:
                image.draft("RGB", (max(1, width // 8), max(1, height // 8)))
                image.load()
            except Exception as error:
                raise ValueError(f"truncated or corrupt image ({type(error).__name__}: {error})") from None
    return width, height


def valid_utf8(name: str) -> bool:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:  # bytes the file system gave that are not UTF-8 (surrogate escapes)
        return False
    return True


def printable(path: Path) -> str:
    """`path` with bytes that are not UTF-8 shown as \\xNN, to name it in reports."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def files_under(root: Path) -> tuple[list[Path], list[Skipped]]:
    """Every file under `root`, sorted, following symbolic links that stay inside it;
    links that leave it (or loop) are skipped with the reason."""
    inside = root.resolve()
    files, skipped, seen = [], [], {inside}
    for folder, subfolders, names in os.walk(root, followlinks=True):
        links = [name for name in subfolders if (Path(folder) / name).is_symlink()]
        seen.update((Path(folder) / name).resolve() for name in subfolders if name not in links)
        for name in links:
            path, target = Path(folder) / name, (Path(folder) / name).resolve()
            if target in seen or not target.is_relative_to(inside):
                why = "link to a folder already read" if target in seen else "link leaving the data folder"
                skipped.append(Skipped(str(path), f"{why}: not followed"))
                subfolders.remove(name)
            seen.add(target)
        for name in names:
            path = Path(folder) / name
            if path.is_symlink() and not path.resolve().is_relative_to(inside):
                skipped.append(Skipped(str(path), "link leaving the data folder: not followed"))
            elif path.is_file():
                files.append(path)
    return sorted(files), skipped


def layout_problem(parts: tuple[str, ...]) -> str | None:
    """Why a file at `parts` under the data folder is not a labelled image, or None."""
    if any(is_hidden(Path(part)) for part in parts):
        return "hidden file"
    if len(parts) == 1:
        return "not inside a label folder"
    return None


def objects_in_label_folders(root: str) -> tuple[list[tuple[str, str]], list[Skipped]]:
    """files_in_label_folders for an s3:// folder: S3 has no links and its keys are
    UTF-8, so only the layout rules apply."""
    found, skipped, prefix = [], [], root.rstrip("/") + "/"
    for path in s3_files(root):
        parts = tuple(path.removeprefix(prefix).split("/"))
        problem = layout_problem(parts)
        if problem:
            skipped.append(Skipped(path, problem))
        else:
            found.append((path, parts[0]))
    return found, skipped


def files_in_label_folders(root: str | Path) -> tuple[list[tuple[str | Path, str]], list[Skipped]]:
    """(path, label) of every file under `root/<label>/...`; hidden files and files
    outside a label folder are skipped. `root` may be an s3:// folder
    (docs/scaling-out.md): its objects come back as s3:// paths."""
    if is_s3(root):
        return objects_in_label_folders(root)
    found, skipped = [], []
    paths, links = files_under(root)
    for path in paths:
        relative = path.relative_to(root)
        if not valid_utf8(str(path)):  # JSON, DVC and MLflow cannot hold such a name
            skipped.append(Skipped(printable(path), "file name is not valid UTF-8: rename it"))
        elif problem := layout_problem(relative.parts):
            skipped.append(Skipped(str(path), problem))
        else:
            found.append((path, relative.parts[0]))
    return found, skipped + links


def follow_pixel_limit(max_pixels: int) -> None:
    """Make Pillow's decompression-bomb limit data.max_image_pixels: Pillow refuses
    images over twice its own limit, whatever the setting allowed."""
    Image.MAX_IMAGE_PIXELS = max_pixels


def check_labelled(
    files: list[tuple[str | Path, str]], max_pixels: int, verified: set[str] = frozenset()
) -> tuple[list[LabelledImage], list[Skipped]]:
    """Each (path, label) either usable, with its content hash and size, or skipped
    with a reason.

    Images whose content hash is in `verified` were fully decoded by an earlier
    run, so only their header is read again.
    """
    follow_pixel_limit(max_pixels)
    images, skipped = [], []
    for path, label in files:
        content = read_bytes(path)  # a local file or an s3:// object
        if not content:
            skipped.append(Skipped(str(path), "empty file"))
            continue
        sha256 = hashlib.sha256(content).hexdigest()
        try:
            source = image_source(path, content)  # a local file is opened as before
            width, height = check_image(source, max_pixels, decode=sha256 not in verified)
        except ValueError as error:
            skipped.append(Skipped(str(path), str(error)))
            continue
        images.append(LabelledImage(str(path), label, sha256, width, height))
    return images, skipped


def scan_labelled_folder(
    root: str | Path, max_pixels: int, verified: set[str] = frozenset()
) -> tuple[list[LabelledImage], list[Skipped]]:
    """Every file under `root/<label>/...`, either usable or skipped with a reason."""
    files, skipped = files_in_label_folders(root)
    images, unusable = check_labelled(files, max_pixels, verified)
    return images, sorted(skipped + unusable, key=lambda item: item.path)


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode == "RGB":
        return image  # no copy: a copy costs as much as a tenth of a small PNG's decode
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit grayscale: keep the top 8 bits
        image = Image.fromarray((np.asarray(image, dtype=np.uint32) >> 8).astype(np.uint8))
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        flat = Image.new("RGB", rgba.size, BACKGROUND)
        flat.paste(rgba, mask=rgba.getchannel("A"))
        return flat
    return image.convert("RGB")


def load_rgb(path: str | Path | BinaryIO, min_side: int = 0) -> Image.Image:
    """Decode an image (a file, an s3:// object, or its bytes as a file object)
    upright (EXIF orientation) as RGB on the fixed background.

    `min_side` lets JPEG decode at a reduced scale (draft mode) as long as both
    sides stay at least that large: the resize that follows would discard the rest.
    """
    with Image.open(image_source(path)) as image:
        if min_side and image.format == "JPEG":
            image.draft("RGB", (min_side, min_side))
        image.seek(0)  # first frame of a GIF or multi-page TIFF
        ImageOps.exif_transpose(image, in_place=True)
        return _to_rgb(image)


# Vision's VNImageCropAndScaleOption names: how an image becomes the backbone's
# square input, identically at training, in `predict`, the ONNX twin and the app.
CROP_AND_SCALE = ("scaleFill", "centerCrop", "scaleFit")


def _shrink(image: Image.Image, width: int, height: int) -> np.ndarray:
    """`image` resized to width x height, HxWx3 uint8.

    Whole factors of two or more go first through Pillow's box `reduce`, so that
    the bilinear step (OpenCV's: a tenth of Pillow's cost) shrinks by less than
    2x and cannot alias.
    """
    factors = (max(1, image.width // width), max(1, image.height // height))
    if max(factors) >= 2:
        image = image.reduce(factors)
    return cv2.resize(np.asarray(image), (width, height), interpolation=cv2.INTER_LINEAR)


def check_crop_and_scale(option: str) -> None:
    if option not in CROP_AND_SCALE:
        raise SettingError(
            f"extract.crop_and_scale must be one of {', '.join(CROP_AND_SCALE)}, not {option!r}"
        )


def to_square(image: Image.Image, size: int, crop_and_scale: str) -> np.ndarray:
    """The backbone's size x size x 3 uint8 input, by one of Vision's options:

    - `scaleFill`: the whole image squashed to a square (aspect ratio not kept);
    - `centerCrop`: the shorter side scaled to `size`, the centre cut out (ends of
      elongated objects are lost);
    - `scaleFit`: the longer side scaled to `size`, centred on the background colour.
    """
    check_crop_and_scale(crop_and_scale)
    if crop_and_scale == "scaleFill":
        return _shrink(image, size, size)
    if crop_and_scale == "centerCrop":
        scale = size / min(image.size)
        width, height = max(size, round(image.width * scale)), max(size, round(image.height * scale))
        pixels = _shrink(image, width, height)
        left, top = (width - size) // 2, (height - size) // 2
        return np.ascontiguousarray(pixels[top : top + size, left : left + size])
    scale = size / max(image.size)  # scaleFit
    width, height = max(1, round(image.width * scale)), max(1, round(image.height * scale))
    square = np.empty((size, size, 3), np.uint8)
    square[:] = BACKGROUND
    left, top = (size - width) // 2, (size - height) // 2
    square[top : top + height, left : left + width] = _shrink(image, width, height)
    return square
