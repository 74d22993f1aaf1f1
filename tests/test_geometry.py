"""Vision's crop-and-scale options (docs/parameters.md): what each keeps of an image."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import coremltools as ct
import numpy as np
import pytest
from conftest import REPO, with_exported_backbone
from PIL import Image

from pipeline import convert, evaluate, extract, split, train
from pipeline.data.images import BACKGROUND, CROP_AND_SCALE, to_square
from pipeline.project.config import compose_config, output_overrides


def wide_image() -> Image.Image:
    """600x300: a red left quarter, a blue right quarter, grey between."""
    pixels = np.full((300, 600, 3), 128, np.uint8)
    pixels[:, :150] = (255, 0, 0)
    pixels[:, 450:] = (0, 0, 255)
    return Image.fromarray(pixels)


def test_scale_fill_keeps_both_ends_of_an_elongated_object():
    square = to_square(wide_image(), 224, "scaleFill")
    assert square.shape == (224, 224, 3)
    assert tuple(square[112, 10]) == (255, 0, 0) and tuple(square[112, -10]) == (0, 0, 255)


def test_center_crop_cuts_the_ends_off():
    square = to_square(wide_image(), 224, "centerCrop")
    assert square.shape == (224, 224, 3)
    assert tuple(square[112, 10]) == tuple(square[112, -10]) == (128, 128, 128)


def test_scale_fit_keeps_the_aspect_ratio_on_the_background():
    square = to_square(wide_image(), 224, "scaleFit")
    assert square.shape == (224, 224, 3)
    assert tuple(square[10, 112]) == tuple(square[-10, 112]) == BACKGROUND  # bands above and below
    assert tuple(square[112, 10]) == (255, 0, 0) and tuple(square[112, -10]) == (0, 0, 255)


def test_unknown_option_names_the_choices():
    with pytest.raises(ValueError, match="scaleFill, centerCrop, scaleFit"):
        to_square(wide_image(), 224, "stretch")


def test_unknown_option_stops_a_stage_with_one_line(tmp_path):
    """Not every image skipped as undecodable, then a traceback: one line, exit 2."""
    overrides = [
        *output_overrides(tmp_path / "out"),
        f"data.train_dir={REPO / 'data/demo/train'}",
        f"data.test_dir={REPO / 'data/demo/test'}",
    ]
    split.run(compose_config(*overrides))
    result = subprocess.run(
        [sys.executable, "-m", "pipeline.extract", "extract.crop_and_scale=stretch", *overrides],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 2
    assert "extract.crop_and_scale = 'stretch': expected one of scaleFill, centerCrop, scaleFit" in output
    assert "Traceback" not in output


@pytest.mark.slow
@pytest.mark.parametrize("crop_and_scale", CROP_AND_SCALE)
def test_predict_gives_what_evaluate_recorded_and_core_ml_names_the_option(
    crop_and_scale, tmp_path, monkeypatch, exported_backbone
):
    """The option reaches every place an image is made square: training (`evaluate`'s
    predictions), `predict` through the ONNX twin, and the Core ML model's metadata."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)  # MLflow's artifacts go to ./mlruns
    cfg = compose_config(
        *output_overrides(tmp_path / "out"),
        f"data.train_dir={REPO / 'data/demo/train'}",
        f"data.test_dir={REPO / 'data/demo/test'}",
        f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
        f"extract.crop_and_scale={crop_and_scale}",
    )
    with_exported_backbone(cfg, exported_backbone)
    for stage in (split, extract, train, evaluate, convert):
        stage.run(cfg)
    with open(cfg.paths.predictions, encoding="utf-8") as file:
        row = next(r for r in csv.DictReader(file) if r["split"] == "test")
    model = Path(cfg.paths.models_dir) / f"{cfg.model.name}.onnx"
    predict = [sys.executable, "-m", "pipeline.predict", row["path"], "--json", "--top-k", "1"]
    result = subprocess.run(
        [*predict, "--model", str(model)],
        capture_output=True,
        text=True,
        check=True,
    )
    ((best,),) = [answer["predictions"] for answer in json.loads(result.stdout)]
    assert best["label"] == row["predicted"]
    assert best["confidence"] == pytest.approx(float(row["confidence"]), abs=1e-4)

    core_ml = ct.models.MLModel(str(model.with_suffix(".mlpackage")), skip_model_load=True)
    assert core_ml.user_defined_metadata["crop_and_scale"] == crop_and_scale
    assert crop_and_scale in core_ml.get_spec().description.input[0].shortDescription
