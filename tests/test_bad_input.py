"""Messy folders (docs/your-images.md). Nothing crashes, nothing is lost, the user is told."""

import csv
import hashlib
import io
import json

import numpy as np
import pillow_heif
import pytest
import torch
from conftest import with_exported_backbone
from PIL import Image

from pipeline import convert, evaluate, extract, split, train
from pipeline.data.images import BACKGROUND, CROP_AND_SCALE, load_rgb, to_square
from pipeline.data.split_file import load_split
from pipeline.features.backbone import feature_extractor
from pipeline.model.export import ct
from pipeline.project.config import compose_config, output_overrides

LABELS = {"rouge écarlate": (200, 40, 40), "green, leafy": (40, 180, 60), "blue": (40, 60, 200)}


def pixels(colour, seed, size=(320, 360)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    noisy = np.array(colour) + rng.normal(0, 30, (size[1], size[0], 3))
    return np.clip(noisy, 0, 255).astype(np.uint8)


def save_good_images(folder, colour, seed) -> list:
    """One image per format and mode the loader must handle."""
    rgb = Image.fromarray(pixels(colour, seed))
    rgba = rgb.copy()
    rgba.putalpha(Image.fromarray(np.full(rgb.size[::-1], 200, np.uint8)))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees to display
    folder.mkdir(parents=True, exist_ok=True)
    nested = folder / "nested" / "deeper"
    nested.mkdir(parents=True)
    files = {
        "plain.jpg": lambda p: rgb.save(p, quality=90),
        "progressive.jpg": lambda p: rgb.save(p, progressive=True),
        "cmyk.jpg": lambda p: rgb.convert("CMYK").save(p),
        "rgba.png": lambda p: rgba.save(p),
        "palette_transparent.png": lambda p: rgb.quantize(16).save(p, transparency=0),
        "gray16.png": lambda p: Image.fromarray(np.asarray(rgb.convert("L"), np.uint16) * 257).save(p),
        "gray_alpha.png": lambda p: rgba.convert("LA").save(p),
        "photo.webp": lambda p: rgb.save(p),
        "anim.gif": lambda p: rgb.save(p, save_all=True, append_images=[rgb.rotate(90)]),
        "scan.bmp": lambda p: rgb.save(p),
        "scan.tiff": lambda p: rgb.save(p),
        "phone.heic": lambda p: pillow_heif.from_pillow(rgb).save(p),
        "rotated.jpg": lambda p: rgb.save(p, exif=exif),
        "png_named.jpg": lambda p: rgb.save(p, format="PNG"),
    }
    paths = []
    for index, (name, write) in enumerate(files.items()):
        path = (nested if index % 5 == 0 else folder) / name
        write(path)
        paths.append(path)
    return paths


def save_bad_files(folder) -> dict:
    """file -> the start of the reason the report must give."""
    good = io.BytesIO()
    Image.fromarray(pixels((90, 90, 90), 0)).save(good, "JPEG")
    bad = {
        folder / "empty.jpg": (b"", "empty file"),
        folder / "truncated.jpg": (
            good.getvalue()[: len(good.getvalue()) // 2],
            "truncated or corrupt image",
        ),
        folder / "garbage.png": (b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4, "not a readable image"),
        folder / "notes.jpg": (b"shopping list: eggs, milk", "not a readable image"),
        folder / ".DS_Store": (b"\0\0\0\1Bud1", "hidden file"),
        folder / "._plain.jpg": (b"\0\5\26\7AppleDouble", "hidden file"),
        folder.parent / "stray.jpg": (good.getvalue(), "not inside a label folder"),
    }
    for path, (content, _) in bad.items():
        path.write_bytes(content)
    poster = folder / "poster.png"
    Image.new("RGB", (1500, 1000), (255, 255, 0)).save(poster)  # over the test's 1 Mpx limit
    return {path: reason for path, (_, reason) in bad.items()} | {poster: "image too large"}


def checksums(root) -> dict:
    return {
        str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()
    }


@pytest.mark.slow
def test_messy_folder_runs_through_the_whole_pipeline(tmp_path, monkeypatch, exported_backbone):
    data = tmp_path / "data"
    good = []
    for seed, (label, colour) in enumerate(LABELS.items()):
        good += save_good_images(data / "train" / label, colour, seed)
        good += save_good_images(data / "test" / label, colour, seed + 100)
    bad = save_bad_files(data / "train" / "blue")
    before = checksums(data)

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out = tmp_path / "out"
    cfg = compose_config(
        f"data.train_dir={data / 'train'}",
        f"data.test_dir={data / 'test'}",
        "data.max_image_pixels=1000000",
        "train.max_iterations=5",
        f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
        *output_overrides(out),
    )
    with_exported_backbone(cfg, exported_backbone)
    for stage in (split, extract, train, evaluate, convert):
        stage.run(cfg)

    report = json.loads((out / "reports/data_report.json").read_text())
    reasons = {item["path"]: item["reason"] for item in report["skipped"]}
    for path, reason in bad.items():
        assert reasons[str(path)].startswith(reason), (path, reasons.get(str(path)))
    assert len(reasons) == len(bad)
    with open(out / "reports/predictions.csv", encoding="utf-8") as file:
        used = {row["path"] for row in csv.DictReader(file)}
    assert used == {str(path) for path in good}
    metrics = json.loads((out / "reports/metrics.json").read_text())
    assert set(metrics["test"]["per_class"]) == set(LABELS)
    spec = ct.utils.load_spec(str(out / "models/ImageClassifier.mlpackage"))
    assert json.loads(spec.description.metadata.userDefined["labels"]) == sorted(LABELS)
    assert report["warnings"] == []  # every good image is large, distinct and in a full label
    assert checksums(data) == before  # the user's folders are only read


def test_data_warnings_follow_create_ml(cfg_factory, tmp_path):
    for label, n in (("many", 40), ("few", 3)):
        for i in range(n):
            Image.fromarray(pixels((10 * i % 250, 90, 90), seed=len(label) * 1000 + i, size=(200, 400))).save(
                tmp_path / f"{label}{i}.png"
            )
            (tmp_path / "train" / label).mkdir(parents=True, exist_ok=True)
            (tmp_path / f"{label}{i}.png").rename(tmp_path / "train" / label / f"{i}.png")
    (tmp_path / "test" / "many").mkdir(parents=True)
    (tmp_path / "test" / "many" / "copy.png").write_bytes((tmp_path / "train/many/0.png").read_bytes())
    (tmp_path / "train" / "many" / "again.png").write_bytes((tmp_path / "train/many/1.png").read_bytes())
    cfg = cfg_factory(f"data.train_dir={tmp_path / 'train'}", f"data.test_dir={tmp_path / 'test'}")
    split.run(cfg)
    warnings = load_split(cfg.paths.split, cfg.paths.split_table)["warnings"]
    assert any("'few' has only 3 training images" in w for w in warnings)
    assert any("unbalanced" in w and "'many' has 41" in w for w in warnings)
    assert any("images are under 299 px" in w and "(200x400)" in w for w in warnings)
    assert any("in train and test" in w and "copy.png" in w for w in warnings)
    assert any("in label 'many' more than once" in w and "again.png" in w for w in warnings)


def features(model, image) -> np.ndarray:
    batch = torch.from_numpy(to_square(image, 224, "centerCrop"))[None]
    with torch.inference_mode():
        return model(batch)[0].numpy()


def feature_gap(model, first, second) -> float:
    """Largest difference between the backbone features of two image files."""
    return float(np.abs(features(model, load_rgb(first)) - features(model, load_rgb(second))).max())


def test_exif_rotation_and_transparency_give_the_same_features(tmp_path):
    model = feature_extractor(compose_config().extractor)
    upright = pixels((120, 80, 200), 1, size=(300, 400))
    exif = Image.Exif()
    exif[0x0112] = 8  # stored turned: displayed after a 90-degree turn counter-clockwise
    Image.fromarray(upright).rotate(-90, expand=True).save(tmp_path / "exif.png", exif=exif)
    Image.fromarray(upright).save(tmp_path / "twin.png")
    assert feature_gap(model, tmp_path / "exif.png", tmp_path / "twin.png") < 1e-4

    rgba = Image.fromarray(upright).convert("RGBA")
    rgba.putalpha(Image.fromarray(np.tile((np.arange(300) % 256).astype(np.uint8)[None], (400, 1))))
    rgba.save(tmp_path / "alpha.png")
    flat = Image.new("RGB", rgba.size, BACKGROUND)
    flat.paste(rgba, mask=rgba.getchannel("A"))
    flat.save(tmp_path / "composited.png")
    assert feature_gap(model, tmp_path / "alpha.png", tmp_path / "composited.png") < 1e-4


@pytest.mark.parametrize("crop_and_scale", CROP_AND_SCALE)
def test_large_images_are_averaged_down_not_aliased(tmp_path, crop_and_scale):
    """A big PNG (no JPEG draft mode to shrink it) of 1-pixel black and white squares
    must come out mid-grey: sampling every 13th pixel would give black or white."""
    squares = (np.indices((3000, 4000)).sum(axis=0) % 2 * 255).astype(np.uint8)
    Image.fromarray(squares).convert("RGB").save(tmp_path / "squares.png")
    scaled = to_square(load_rgb(tmp_path / "squares.png", 224), 224, crop_and_scale)
    assert scaled.shape == (224, 224, 3)
    image = scaled[30:-30] if crop_and_scale == "scaleFit" else scaled  # 4:3 fits between white bands
    assert np.abs(image.astype(int) - 127.5).max() <= 2
