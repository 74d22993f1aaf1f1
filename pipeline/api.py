"""The Python API (docs/api.md): Create ML's `MLImageClassifier`,
in Python's style, over the same library the stages run.

    training = DataSource.labeled_directories("data/demo/train")
    model = ImageClassifier.train(training, parameters=ModelParameters(max_iterations=100))
    metrics = model.evaluation(on=DataSource.labeled_directories("data/demo/test"))
    model.write("models/Demo.mlpackage", metadata={"author": "me"})

Training splits, extracts (through the same feature cache), trains and measures
exactly as `dvc repro` does with the same parameters: the same images give the
same model and the same numbers. Nothing is tracked in MLflow; the stages do that.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from omegaconf import DictConfig, OmegaConf

from pipeline.data.images import (
    DataError,
    LabelledImage,
    Skipped,
    check_labelled,
    files_in_label_folders,
    files_under,
    is_hidden,
)
from pipeline.data.split_file import Split, SplitRow
from pipeline.data.splitting import check_trainable, make_split
from pipeline.data.storage import data_path, is_folder, read_bytes
from pipeline.evaluation.metrics import evaluate, of_split, predict_probabilities, split_metrics, wrong
from pipeline.features.extraction import build_table, cached_features
from pipeline.features.table import FeatureTable, originals
from pipeline.model.calibration import calibrate
from pipeline.model.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from pipeline.model.model_files import write_model_files
from pipeline.model.training import EpochCurve, checkpoint_for, fit_head
from pipeline.project.config import compose_config, progress_bars
from pipeline.project.settings import check_settings

__all__ = ["ClassifierMetrics", "DataSource", "ImageClassifier", "ModelParameters"]


@dataclass(frozen=True)
class DataSource:
    """Labelled image files, as Create ML's `MLImageClassifier.DataSource`. Make one
    with `labeled_directories`, `labeled_files` or `files_by_label`.

    Attributes:
        files: (path, label) of every file.
        skipped: files the layout itself rules out (hidden, outside a label folder).
        origin: what errors name: the folder, or "files_by_label".
    """

    files: tuple[tuple[str, str], ...]
    skipped: tuple[Skipped, ...] = ()
    origin: str = "the data source"

    @classmethod
    def labeled_directories(cls, path: str | Path) -> DataSource:
        """`path/<label>/...`: one folder per label, as the stages read `data.train_dir`
        (an s3:// folder too)."""
        root = data_path(path)
        if not is_folder(root):
            raise DataError(f"folder not found: {root}")
        files, skipped = files_in_label_folders(root)
        return cls(tuple((str(p), label) for p, label in files), tuple(skipped), str(root))

    @classmethod
    def labeled_files(cls, path: str | Path) -> DataSource:
        """Every file under `path`, labelled by its name up to the first "."
        (`cat.12.jpg` is a cat), as Create ML's `labeledFiles(at:)`."""
        root = Path(path)
        if not root.is_dir():
            raise DataError(f"folder not found: {root}")
        files, skipped = [], []
        paths, skipped_links = files_under(root)
        for file in paths:
            if any(is_hidden(Path(part)) for part in file.relative_to(root).parts):
                skipped.append(Skipped(str(file), "hidden file"))
            else:
                files.append((str(file), file.name.split(".", 1)[0]))
        return cls(tuple(files), tuple(skipped + skipped_links), str(root))

    @classmethod
    def files_by_label(cls, files: dict[str, list[str | Path]]) -> DataSource:
        """{label: [image files]}."""
        pairs = sorted((str(path), label) for label, paths in files.items() for path in paths)
        return cls(tuple(pairs), (), "files_by_label")

    def images(self, max_pixels: int) -> tuple[list[LabelledImage], list[Skipped]]:
        """The usable images, with content hashes; the rest skipped with a reason."""
        images, unusable = check_labelled([(data_path(p), label) for p, label in self.files], max_pixels)
        return images, [*self.skipped, *unusable]


@dataclass
class ModelParameters:
    """Create ML's `MLImageClassifier.ModelParameters`. None keeps conf/'s default,
    so that unset parameters train exactly as `dvc repro` does; each is the setting of
    the same meaning on docs/parameters.md.

    Attributes:
        feature_extractor: `extractor`: v1 or v2 (conf/extractor/).
        max_iterations: `train.max_iterations`.
        augmentations: copies per kind, e.g. `{"flip": 1, "blur": 1}` (`augment.*`);
            the kinds left out are off.
        classifier: `head`: logistic or mlp.
        hidden_sizes: `head.hidden_sizes`, the MLP's layer sizes.
        class_weighting: `train.class_weighting`.
        crop_and_scale: `extract.crop_and_scale`: scaleFill, centerCrop or scaleFit.
        regularization: `train.regularization`: auto or an L2 strength.
        seed: `train.seed`.
        feature_cache: `paths.feature_cache`, where features are cached.
    """

    feature_extractor: str | None = None
    max_iterations: int | None = None
    augmentations: dict[str, int] | None = None
    classifier: str | None = None
    hidden_sizes: list[int] | None = None
    class_weighting: bool | None = None
    crop_and_scale: str | None = None
    regularization: str | float | None = None
    seed: int | None = None
    feature_cache: str | Path | None = None

    def overrides(self) -> list[str]:
        """These parameters as the Hydra overrides the stages would take."""
        settings = {
            "extractor": self.feature_extractor,
            "head": self.classifier,
            "train.max_iterations": self.max_iterations,
            "head.hidden_sizes": self.hidden_sizes,
            "train.class_weighting": self.class_weighting,
            "extract.crop_and_scale": self.crop_and_scale,
            "train.regularization": self.regularization,
            "train.seed": self.seed,
            "paths.feature_cache": self.feature_cache,
        }
        if self.augmentations is not None:
            settings.update({f"augment.{kind}": count for kind, count in self.augmentations.items()})
            settings.update({f"augment.{kind}": 0 for kind in AUGMENTATION_KINDS - set(self.augmentations)})
        # head= must come first: it resets the head group's keys
        ordered = sorted(settings.items(), key=lambda item: item[0] != "head")
        return [f"{key}={value}" for key, value in ordered if value is not None]

    def config(self) -> DictConfig:
        """conf/ with these parameters; SettingError naming each one that cannot be used."""
        cfg = compose_config(*self.overrides())
        check_settings(cfg)
        return cfg


AUGMENTATION_KINDS = {"noise", "blur", "crop", "exposure", "flip", "rotate"}
METADATA = {"author", "license", "short_description", "version"}


@dataclass
class ClassifierMetrics:
    """Create ML's `MLClassifierMetrics`, with the images behind the numbers.

    Attributes:
        accuracy: the share of images whose top label is right.
        per_label: index: label; columns: count, precision, recall, f1.
        confusion: images per actual label (rows) and predicted label (columns).
        misclassified: path, actual, predicted, confidence of each wrong answer.
        skipped: files that could not be used, with the reason.
    """

    accuracy: float
    per_label: pd.DataFrame
    confusion: pd.DataFrame
    misclassified: pd.DataFrame
    skipped: list[Skipped] = field(default_factory=list)

    @property
    def classification_error(self) -> float:
        """1 - accuracy, as Create ML reports it."""
        return 1.0 - self.accuracy

    def __repr__(self) -> str:
        return (
            f"ClassifierMetrics(accuracy={self.accuracy:.4f}, images={int(self.per_label['count'].sum())}, "
            f"misclassified={len(self.misclassified)}, skipped={len(self.skipped)})"
        )


def metrics_of(
    metrics: dict, predictions: pd.DataFrame, labels: list[str], skipped: list[Skipped]
) -> ClassifierMetrics:
    """ClassifierMetrics from one split's metrics.json entry and its rows of evaluate's predictions."""
    per_label = pd.DataFrame.from_dict(metrics["per_class"], orient="index")[
        ["count", "precision", "recall", "f1"]
    ]
    confusion = pd.crosstab(
        predictions["actual"],
        predictions["predicted"],
        rownames=["actual"],
        colnames=["predicted"],
        dropna=False,
    )
    columns = ["path", "actual", "predicted", "confidence"]
    misclassified = (
        wrong(predictions)[columns].astype({"actual": str, "predicted": str}).reset_index(drop=True)
    )
    return ClassifierMetrics(metrics["accuracy"], per_label, confusion, misclassified, skipped)


def metrics_for_split(
    table: FeatureTable, head: torch.nn.Module, split: str, skipped: list[Skipped]
) -> ClassifierMetrics | None:
    """The metrics of one split of a table (its original images), or None if it has none;
    the numbers `evaluate` writes to metrics.json for that split."""
    table = originals(table)
    _, predictions = evaluate(head, table)
    chosen = of_split(predictions, split)
    if chosen.empty:
        return None
    labels = table["meta"]["labels"]
    truth, predicted = chosen["actual"].cat.codes.to_numpy(), chosen["predicted"].cat.codes.to_numpy()
    return metrics_of(split_metrics(truth, predicted, labels, per_class=True), chosen, labels, skipped)


def sha256_of(path: str) -> str:
    return hashlib.sha256(read_bytes(path)).hexdigest()


class ImageClassifier:
    """A trained head on its backbone: Create ML's `MLImageClassifier`. Make one with
    `train` or `load`.

    Attributes:
        training_metrics: the metrics on the training images (after `train`).
        validation_metrics: the metrics on the held-out images, None without any.
        skipped: training and validation files that could not be used, with the reason.
    """

    def __init__(self, head: torch.nn.Module, checkpoint: Checkpoint, cfg: DictConfig):
        self.head, self.checkpoint, self.cfg = head, checkpoint, cfg
        self.training_metrics: ClassifierMetrics | None = None
        self.validation_metrics: ClassifierMetrics | None = None
        self.skipped: list[Skipped] = []

    @property
    def labels(self) -> list[str]:
        """The labels the model answers with, in the order of its outputs."""
        return self.checkpoint.labels

    def __repr__(self) -> str:
        return f"ImageClassifier(labels={self.labels}, extractor={self.checkpoint.extractor['name']})"

    @classmethod
    def train(
        cls,
        training: DataSource,
        validation: str | DataSource | None = "auto",
        parameters: ModelParameters | None = None,
        progress: bool | None = None,
    ) -> ImageClassifier:
        """Train on `training`. `validation`: "auto" holds out images as the stages do
        (Create ML's rule), a DataSource gives them, None holds out none. `progress`
        forces the progress bars on or off (default: on at a terminal)."""
        parameters = parameters or ModelParameters()
        cfg = parameters.config()
        train_images, skipped = training.images(cfg.data.max_image_pixels)
        check_trainable(train_images, training.origin)
        held_out = None
        if isinstance(validation, DataSource):
            held_out, skipped_validation = validation.images(cfg.data.max_image_pixels)
            skipped += skipped_validation
        setting = cfg.split.validation if validation == "auto" else 0.0
        split = make_split(train_images, [], skipped, setting, cfg.split.seed, validation=held_out)
        with progress_bars(progress):
            table = build_table(cfg, split)
            head, strength = fit_head(cfg, table, [EpochCurve()])
            calibration, _ = calibrate(cfg, table, head, strength)
        model = cls(head, checkpoint_for(cfg, table, head, strength, calibration), cfg)
        model.skipped = [Skipped(**s) for s in split["skipped"]] + [
            Skipped(**s) for s in table["meta"]["skipped"]
        ]
        model.training_metrics = metrics_for_split(table, head, "train", [])
        model.validation_metrics = metrics_for_split(table, head, "validation", [])
        return model

    def evaluation(self, on: DataSource) -> ClassifierMetrics:
        """Accuracy, per-label precision and recall, the confusion and the
        misclassified images on labelled images the model did not train on."""
        images, skipped = on.images(self.cfg.data.max_image_pixels)
        known = [image for image in images if image.label in self.labels]
        skipped += [
            Skipped(i.path, f"label '{i.label}' is not one the model knows") for i in images if i not in known
        ]
        if not known:
            raise DataError(f"no usable image with a label the model knows in {on.origin}")
        split = Split(
            labels=self.labels,
            validation_fraction=0.0,
            seed=0,
            images=[SplitRow(**vars(image), split="test") for image in known],
            skipped=[],
            warnings=[],
        )
        table = build_table(self.cfg, split)
        skipped += [Skipped(**item) for item in table["meta"]["skipped"]]
        return metrics_for_split(table, self.head, "test", skipped)

    def predictions(self, images: list[str | Path], top_k: int = 1) -> pd.DataFrame:
        """The `top_k` labels of each image file, most likely first: path, label, confidence."""
        rows = [
            SplitRow(path=str(p), label="", sha256=sha256_of(str(p)), width=0, height=0, split="test")
            for p in images
        ]
        features, entries, failed, _ = cached_features(self.cfg, [(row, None) for row in rows])
        if failed:
            raise DataError(f"cannot read {failed[0]['path']}: {failed[0]['reason']}")
        probabilities = predict_probabilities(self.head, features)
        answers = [
            {"path": row["path"], "label": self.labels[i], "confidence": float(p[i])}
            for (row, _), p in zip(entries, probabilities, strict=True)
            for i in np.argsort(-p)[:top_k]
        ]
        return pd.DataFrame(answers, columns=["path", "label", "confidence"])

    def write(self, path: str | Path, metadata: dict[str, str] | None = None) -> Path:
        """The Core ML model at `path` (.mlpackage) and its ONNX twin beside it (.onnx).
        `metadata`: author, license, short_description, version; the ones left out
        are filled as Create ML fills them (`model.*` on docs/parameters.md)."""
        unknown = set(metadata or {}) - METADATA
        if unknown:
            raise ValueError(f"unknown metadata {sorted(unknown)}: known are {sorted(METADATA)}")
        cfg = OmegaConf.merge(self.cfg, {"model": dict(metadata or {})})
        mlpackage = Path(path).with_suffix(".mlpackage")
        write_model_files(cfg, self.head, self.checkpoint, mlpackage, mlpackage.with_suffix(".onnx"))
        return mlpackage

    def save(self, path: str | Path) -> None:
        """The trained head in the stages' checkpoint format (what `load` reads)."""
        save_checkpoint(path, self.checkpoint)

    @classmethod
    def load(cls, path: str | Path, feature_cache: str | Path | None = None) -> ImageClassifier:
        """A model saved by `save`, or the `train` stage's models/head.ckpt."""
        head, checkpoint = load_checkpoint(path)
        extractor = checkpoint.extractor
        parameters = ModelParameters(
            feature_extractor=extractor["name"],
            crop_and_scale=checkpoint.crop_and_scale,
            feature_cache=feature_cache,
        )
        return cls(head, checkpoint, parameters.config())
