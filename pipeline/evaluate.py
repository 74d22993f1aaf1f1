"""Stage `evaluate`: accuracy per split, per-label precision/recall/F1, the
confusion matrix and the misclassified images (README "The stages")."""

import csv
import logging
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt
import mlflow
import numpy as np
import torch
from omegaconf import DictConfig
from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support

from pipeline import report, tracking
from pipeline.checkpoint import load_checkpoint
from pipeline.config import stage_entry
from pipeline.extract import features_for, originals
from pipeline.files import write_csv, write_json

log = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")


def predict_probabilities(head: torch.nn.Module, features: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        return head(torch.from_numpy(features)).softmax(dim=1).numpy()


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


def evaluate(head: torch.nn.Module, table: dict) -> tuple[dict, list[dict]]:
    """metrics.json's content (a split that does not exist has no key) and one row per image."""
    labels = table["meta"]["labels"]
    probabilities = predict_probabilities(head, table["features"])
    predicted = probabilities.argmax(axis=1)
    metrics = {}
    for split in SPLITS:
        mask = table["split"] == split
        if mask.any():
            metrics[split] = split_metrics(
                table["label_index"][mask], predicted[mask], labels, per_class=split != "train"
            )
    rows = [
        {
            "path": path,
            "split": split,
            "actual": labels[truth],
            "predicted": labels[guess],
            "confidence": float(p[guess]),
        }
        for path, split, truth, guess, p in zip(
            table["path"], table["split"], table["label_index"], predicted, probabilities, strict=True
        )
    ]
    return metrics, rows


def plot_confusion(rows: list[dict], labels: list[str], split: str, path: Path) -> None:
    chosen = [row for row in rows if row["split"] == split]
    matrix = confusion_matrix([r["actual"] for r in chosen], [r["predicted"] for r in chosen], labels=labels)
    figure, axes = plt.subplots(figsize=(1.2 * len(labels) + 2, 1.2 * len(labels) + 1.5))
    axes.imshow(matrix, cmap="Blues")
    axes.set(
        xticks=range(len(labels)),
        yticks=range(len(labels)),
        xticklabels=labels,
        yticklabels=labels,
        xlabel="predicted",
        ylabel="actual",
        title=f"Confusion matrix ({split}, {len(chosen)} images)",
    )
    plt.setp(axes.get_xticklabels(), rotation=45, ha="right")
    for (i, j), n in np.ndenumerate(matrix):
        axes.text(j, i, str(n), ha="center", va="center", color="white" if n > matrix.max() / 2 else "black")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def plot_curves(curve_csv: Path, path: Path) -> None:
    with curve_csv.open() as file:
        rows = list(csv.DictReader(file))
    epochs = [int(r["epoch"]) for r in rows]
    figure, (accuracy, loss) = plt.subplots(1, 2, figsize=(11, 4))
    for split in ("train", "validation"):
        if rows and rows[0].get(f"{split}_accuracy"):
            accuracy.plot(epochs, [float(r[f"{split}_accuracy"]) for r in rows], label=split)
            loss.plot(epochs, [float(r[f"{split}_loss"]) for r in rows], label=split)
    accuracy.set(xlabel="epoch", ylabel="accuracy", title="Accuracy", ylim=(0, 1.02))
    loss.set(xlabel="epoch", ylabel="loss", title="Loss")
    accuracy.legend()
    loss.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def mlflow_metric_name(name: str) -> str:
    """MLflow takes letters, digits and `_-. :/` in names; labels may hold anything."""
    return re.sub(r"[^\w\-. :/]", "_", name)


def mlflow_metrics(metrics: dict) -> dict[str, float]:
    """metrics.json flattened: test_accuracy, test_fruit_recall, ..."""
    flat = {}
    for split, values in metrics.items():
        flat[f"{split}_accuracy"] = values["accuracy"]
        for label, scores in values.get("per_class", {}).items():
            for name in ("precision", "recall", "f1"):
                flat[mlflow_metric_name(f"{split}_{label}_{name}")] = scores[name]
    return flat


def run(cfg: DictConfig) -> None:
    head, checkpoint = load_checkpoint(cfg.paths.checkpoint)
    metrics, rows = evaluate(head, originals(features_for(cfg)))
    write_json(cfg.paths.metrics, metrics)
    write_csv(cfg.paths.predictions, rows)
    confusion_split = "test" if "test" in metrics else "validation" if "validation" in metrics else "train"
    write_csv(
        cfg.paths.confusion,
        [{"actual": r["actual"], "predicted": r["predicted"]} for r in rows if r["split"] == confusion_split],
    )
    plots = Path(cfg.paths.plots_dir)
    plots.mkdir(parents=True, exist_ok=True)
    plot_confusion(rows, checkpoint.labels, confusion_split, plots / "confusion_matrix.png")
    plot_curves(Path(cfg.paths.curves), plots / "training_curves.png")
    misclassified = [r for r in rows if r["split"] != "train" and r["actual"] != r["predicted"]]
    write_csv(cfg.paths.misclassified, misclassified, list(rows[0]))
    warnings = too_few_to_judge(metrics, cfg.evaluate.min_images_to_judge)
    for warning in warnings:
        log.warning("%s", warning)
    page = report.render(metrics, misclassified, warnings, plots, f"{cfg.model.name}: evaluation")
    Path(cfg.paths.report).write_text(page, encoding="utf-8")
    with tracking.resumed_run(cfg, checkpoint.mlflow_run_id):
        mlflow.log_metrics(mlflow_metrics(metrics))
        for path in (cfg.paths.metrics, cfg.paths.predictions, cfg.paths.misclassified, cfg.paths.report):
            mlflow.log_artifact(path)
        mlflow.log_artifacts(str(plots), "plots")
    log.info("accuracy: %s", ", ".join(f"{split} {m['accuracy']:.3f}" for split, m in metrics.items()))
    log.info("report: %s", cfg.paths.report)


main = stage_entry(run)

if __name__ == "__main__":
    main()
