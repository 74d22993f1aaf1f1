"""Create ML's Preview: the exported ONNX model on images a user drops, decoded and
made square exactly as `predict` does (pipeline/model/onnx_model.py), with the
training images most like each one, so that a user sees why
(docs/preview-and-serving.md)."""

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from omegaconf import DictConfig
from PIL import Image

from pipeline.data.images import DataError, load_rgb
from pipeline.evaluation.similarity import centred_unit, most_similar
from pipeline.features.table import load_table
from pipeline.model.onnx_model import OnnxClassifier

log = logging.getLogger(__name__)

# Training images searched for the nearest ones, at most (a fixed sample past that):
# their vectors are held in memory, 100 MB of v1's at this many.
MAX_SEARCHED = 20_000
THUMBNAIL = 256  # pixels, the longer side of an image shown on the page


@dataclass
class TrainingImages:
    """The training images an answer is shown beside: their files, labels, and
    features as the data audit compares them (pipeline/evaluation/similarity.py)."""

    paths: np.ndarray
    labels: list[str]  # per image
    vectors: np.ndarray  # (images, D), centred and of unit length
    shift: np.ndarray  # the training mean the head standardises with
    run_id: str | None  # the MLflow run that trained the head; None when the store lost it

    def nearest(self, features: np.ndarray, count: int) -> list[dict]:
        rows, similarity = most_similar(centred_unit(features, self.shift), self.vectors, count)
        return [
            {"file": str(self.paths[row]), "label": self.labels[row], "similarity": round(float(alike), 4)}
            for row, alike in zip(rows, similarity, strict=True)
        ]


def training_images(cfg: DictConfig, classifier: OnnxClassifier) -> TrainingImages:
    """The training images of the feature store, with the head's shift; a DataError
    naming what to run when the store, the head and the model are not of one run."""
    # reading the checkpoint takes torch, seconds to import: not before the page is up
    from pipeline.model.checkpoint import load_checkpoint

    head, checkpoint = load_checkpoint(cfg.paths.checkpoint)
    # the files carry no date (the same inputs make the same bytes): the head's data
    # and its calibrated threshold tell a model converted from another head
    threshold = f"{checkpoint.rejection_threshold:.6g}"
    if (classifier.data_fingerprint, f"{classifier.rejection_threshold:.6g}") != (
        checkpoint.data_fingerprint,
        threshold,
    ):
        raise DataError(f"the ONNX model is older than {cfg.paths.checkpoint}: run the convert stage")
    table = load_table(cfg.paths.features, columns=("label_index", "split", "path", "copy"))
    if table["meta"]["extractor"]["fingerprint"] != checkpoint.extractor["fingerprint"]:
        raise DataError(
            f"{cfg.paths.features} is not what {cfg.paths.checkpoint} was trained on: run dvc repro"
        )
    rows = np.flatnonzero((table["split"] == "train") & (table["copy"] == ""))
    if len(rows) > MAX_SEARCHED:
        log.warning("nearest training images: searching %d of %d", MAX_SEARCHED, len(rows))
        rows = np.sort(np.random.default_rng(0).choice(rows, MAX_SEARCHED, replace=False))
    shift = head.shift.numpy()
    names = table["meta"]["labels"]
    return TrainingImages(
        paths=table["path"][rows],
        labels=[names[i] for i in table["label_index"][rows]],
        vectors=centred_unit(table["features"][rows], shift),
        shift=shift,
        run_id=run_that_trained(cfg),
    )


def run_that_trained(cfg: DictConfig) -> str | None:
    """The head's MLflow run (its checkpoint's hash tags it), or None: the Preview works
    without it, only the Training tab cannot tell this model's curves from the others'."""
    from pipeline.project.tracking import training_run_id  # MLflow: imported with the checkpoint's torch

    try:
        return training_run_id(cfg, cfg.paths.checkpoint)
    except DataError as error:
        log.warning("%s", error)
        return None


def thumbnail(path: str | Path) -> Image.Image:
    """An image as the page shows it: upright, on white, HEIC included (browsers show
    no HEIC), at most THUMBNAIL pixels a side."""
    image = load_rgb(path, min_side=THUMBNAIL)
    image.thumbnail((THUMBNAIL, THUMBNAIL))
    return image


def answer(
    classifier: OnnxClassifier, training: TrainingImages, path: str | Path, top_k: int, nearest: int
) -> dict:
    """One image's answer as `predict --json` gives it, and its nearest training images;
    or, for a file that is no image, its `error`. The file is named by `file`, not `path`
    as in `predict`: gradio_client takes a dict with a `path` for a file to download."""
    try:
        features, probabilities = classifier.features_and_probabilities(path)
    except Exception as error:  # Pillow raises many types; one bad file must not stop the others
        reason = str(error).replace(str(path), Path(path).name)  # not the upload's temporary path
        return {"file": Path(path).name, "error": f"cannot read image ({reason})"}
    return {
        "file": Path(path).name,
        "label": classifier.answer(probabilities),
        "predictions": [{"label": lbl, "confidence": c} for lbl, c in classifier.top(probabilities, top_k)],
        "nearest": training.nearest(features, nearest),
    }
