"""Accuracy per split, per-label precision/recall/F1 and one row per image, from a
head and a feature table (docs/pipeline.md): what `evaluate` writes to
reports/metrics.json and what the Python API's `evaluation` returns."""

import hashlib
import re

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import accuracy_score, precision_recall_fscore_support

from pipeline.features.table import FeatureTable, feature_batches

SPLITS = ("train", "validation", "test")


PREDICTION_COLUMNS = ["path", "split", "actual", "predicted", "confidence", "answer"]
HEAD_ROWS = 8192  # vectors through the head at a time
UNKNOWN = "unknown"  # the answer under the rejection threshold (as the exported models answer)


def predict_probabilities(head: torch.nn.Module, features: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        return head(torch.from_numpy(features)).softmax(dim=1).numpy()


def reliability_bins(confidence: np.ndarray, correct: np.ndarray, bins: int) -> tuple[np.ndarray, ...]:
    """Per equal-width confidence bin: images, mean confidence, accuracy."""
    index = np.clip((confidence * bins).astype(int), 0, bins - 1)
    count = np.bincount(index, minlength=bins)
    mean_confidence = np.bincount(index, weights=confidence, minlength=bins) / np.maximum(count, 1)
    accuracy = np.bincount(index, weights=correct, minlength=bins) / np.maximum(count, 1)
    return count, mean_confidence, accuracy


def calibration_error(probabilities: np.ndarray, truth: np.ndarray, bins: int = 15) -> float:
    """Expected calibration error: the gap between confidence and accuracy over 15
    confidence bins, weighted by how many images fall in each (torchmetrics' definition;
    importing torchmetrics cost the evaluate stage 1.3 s, torchvision and torch._dynamo)."""
    confidence = probabilities.max(axis=1)
    count, mean_confidence, accuracy = reliability_bins(
        confidence, probabilities.argmax(axis=1) == truth, bins
    )
    return float(np.sum(count * np.abs(accuracy - mean_confidence)) / len(confidence))


def trust_metrics(
    probabilities: np.ndarray, uncalibrated: np.ndarray, truth: np.ndarray, threshold: float
) -> dict:
    """Calibration before and after temperature scaling, and what the rejection
    threshold keeps: the share of images answered with a label, and their accuracy."""
    kept = probabilities.max(axis=1) >= threshold
    right = probabilities.argmax(axis=1) == truth
    return {
        "expected_calibration_error": calibration_error(probabilities, truth),
        "expected_calibration_error_uncalibrated": calibration_error(uncalibrated, truth),
        "kept": float(kept.mean()),
        "kept_accuracy": float(right[kept].mean()) if kept.any() else 0.0,
    }


def split_metrics(truth: np.ndarray, predicted: np.ndarray, labels: list[str], per_class: bool) -> dict:
    metrics = {"accuracy": float(accuracy_score(truth, predicted))}
    if per_class:
        indices = list(range(len(labels)))
        scores = precision_recall_fscore_support(truth, predicted, labels=indices, zero_division=0)
        precision, recall, f1, count = scores
        metrics["per_class"] = {
            label: {
                "count": int(count[i]),
                "precision": float(precision[i]),
                "recall": float(recall[i]),
                "f1": float(f1[i]),
            }
            for i, label in enumerate(labels)
        }
        for average in ("macro", "weighted"):
            p, r, f, _ = precision_recall_fscore_support(
                truth, predicted, labels=indices, average=average, zero_division=0
            )
            metrics[f"{average}_avg"] = {"precision": float(p), "recall": float(r), "f1": float(f)}
    return metrics


def too_few_to_judge(metrics: dict, minimum: int) -> list[str]:
    """Labels whose test (else validation) count makes their precision and recall noise."""
    split = "test" if "test" in metrics else "validation"
    if split not in metrics:
        return ["no validation or test images: the accuracies above are on the training data only"]
    return [
        f"'{label}' has {scores['count']} {split} images: too few to judge its precision and recall "
        f"(fewer than {minimum})"
        for label, scores in metrics[split]["per_class"].items()
        if scores["count"] < minimum
    ]


def head_logits(head: torch.nn.Module, table: FeatureTable, batch_rows: int | None) -> torch.Tensor:
    """The head's logits of every row, its vectors read `batch_rows` at a time (None: at once)."""
    rows = np.arange(len(table["features"]))
    logits = torch.empty(len(rows), len(table["meta"]["labels"]))
    with torch.inference_mode():
        for positions, vectors in feature_batches(table["features"], rows, batch_rows or max(len(rows), 1)):
            # the head standardises into new tensors: a slice at a time, not twice the batch
            for start in range(0, len(positions), HEAD_ROWS):
                part = slice(start, start + HEAD_ROWS)
                logits[positions[part]] = head(torch.from_numpy(vectors[part]))
            del vectors  # before the next batch is read: one batch in memory at a time
    return logits


def evaluate(
    head: torch.nn.Module, table: FeatureTable, threshold: float = 0.0, batch_rows: int | None = None
) -> tuple[dict, pd.DataFrame]:
    """metrics.json's content (a split that does not exist has no key) and one row per
    image (PREDICTION_COLUMNS), its answer "unknown" when its confidence is under `threshold`. The vectors
    are read `batch_rows` at a time (`train.feature_batch_rows`; None: all at once)."""
    labels = table["meta"]["labels"]
    logits = head_logits(head, table, batch_rows)  # one pass: calibrated, and before the temperature
    probabilities = logits.softmax(dim=1).numpy()
    uncalibrated = (logits * head.temperature).softmax(dim=1).numpy()
    predicted = probabilities.argmax(axis=1)
    metrics = {}
    for split in SPLITS:
        mask = table["split"] == split
        if mask.any():
            truth = table["label_index"][mask]
            metrics[split] = split_metrics(truth, predicted[mask], labels, per_class=split != "train")
            if split != "train":
                metrics[split] |= trust_metrics(probabilities[mask], uncalibrated[mask], truth, threshold)
    confidence = probabilities[np.arange(len(predicted)), predicted].astype(np.float64)
    # columns, not a dict per image: a million rows as dicts held about 0.5 GB
    predictions = pd.DataFrame(
        {
            "path": table["path"],
            "split": pd.Categorical(table["split"], categories=SPLITS),
            "actual": pd.Categorical.from_codes(table["label_index"], categories=labels),
            "predicted": pd.Categorical.from_codes(predicted, categories=labels),
            "confidence": confidence,
            "answer": pd.Categorical(
                np.where(confidence >= threshold, np.asarray(labels)[predicted], UNKNOWN)
            ),
        },
        columns=PREDICTION_COLUMNS,
    )
    return metrics, predictions


def of_split(predictions: pd.DataFrame, split: str) -> pd.DataFrame:
    return predictions[predictions["split"] == split]


def confusion_counts(predictions: pd.DataFrame) -> pd.DataFrame:
    """Images per (actual, predicted) pair, every pair of labels: `confusion.csv`,
    which `dvc plots` draws (a row per image would grow with the data set)."""
    counts = predictions.groupby(["actual", "predicted"], observed=False).size()
    return counts.rename("count").reset_index()


def wrong(predictions: pd.DataFrame) -> pd.DataFrame:
    """The misclassified rows (the actual and predicted columns share their labels)."""
    return predictions[predictions["actual"] != predictions["predicted"]]


MAX_METRIC_NAME = 250  # MLflow refuses longer metric names


def mlflow_metric_name(split: str, label: str, metric: str) -> str:
    """`<split>_<label>_<metric>`. MLflow takes letters, digits and `_-. :/` in names,
    at most 250 of them; labels may hold anything, up to 255 bytes. A label too long
    keeps its start and gets a hash of the whole, so two long labels stay two metrics."""
    label = re.sub(r"[^\w\-. :/]", "_", label)
    room = MAX_METRIC_NAME - len(split) - len(metric) - 2
    if len(label) > room:
        label = f"{label[: room - 13]}~{hashlib.sha256(label.encode()).hexdigest()[:12]}"
    return f"{split}_{label}_{metric}"


def summary(metrics: dict) -> dict:
    """metrics.json without its per-label figures: the file dvc.yaml declares as
    metrics, so that `dvc exp show` and `dvc metrics show` have a column per figure of
    a split (23 with a test set), not four more for every label (docs/comparing-runs.md)."""
    return {split: {k: v for k, v in values.items() if k != "per_class"} for split, values in metrics.items()}


def mlflow_metrics(metrics: dict) -> dict[str, float]:
    """metrics.json flattened: test_accuracy, test_fruit_recall, ..."""
    flat = {}
    for split, values in metrics.items():
        flat |= {f"{split}_{name}": value for name, value in values.items() if not isinstance(value, dict)}
        for label, scores in values.get("per_class", {}).items():
            for name in ("precision", "recall", "f1"):
                flat[mlflow_metric_name(split, label, name)] = scores[name]
    return flat
