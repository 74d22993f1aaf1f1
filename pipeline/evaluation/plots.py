"""The evaluation's pictures: the confusion matrix, the training curves and the
reliability diagram (docs/pipeline.md, docs/trust.md)."""

import csv
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from sklearn.metrics import confusion_matrix

from pipeline.evaluation.metrics import reliability_bins


def plot_confusion(predictions: pd.DataFrame, labels: list[str], split: str, path: Path) -> None:
    """`predictions`: the split's rows of evaluate's predictions."""
    matrix = confusion_matrix(
        predictions["actual"].cat.codes, predictions["predicted"].cat.codes, labels=range(len(labels))
    )
    figure, axes = plt.subplots(figsize=(1.2 * len(labels) + 2, 1.2 * len(labels) + 1.5))
    axes.imshow(matrix, cmap="Blues")
    axes.set(
        xticks=range(len(labels)),
        yticks=range(len(labels)),
        xticklabels=labels,
        yticklabels=labels,
        xlabel="predicted",
        ylabel="actual",
        title=f"Confusion matrix ({split}, {len(predictions)} images)",
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


def plot_reliability(predictions: pd.DataFrame, split: str, errors: tuple[float, float], path: Path) -> None:
    """Accuracy per confidence bin against the diagonal a calibrated model keeps to
    (`predictions`: the split's rows)."""
    confidence = predictions["confidence"].to_numpy()
    correct = (predictions["actual"] == predictions["predicted"]).to_numpy()
    counts, _, accuracy = reliability_bins(confidence, correct, 10)
    edges = np.linspace(0, 1, 11)
    figure, axes = plt.subplots(figsize=(5, 5))
    axes.bar(edges[:-1], accuracy, width=0.1, align="edge", edgecolor="black", alpha=0.7, label="accuracy")
    axes.plot([0, 1], [0, 1], "--", color="gray", label="calibrated")
    for left, n in zip(edges[:-1], counts, strict=True):
        if n:
            axes.text(left + 0.05, 0.02, str(n), ha="center", fontsize=8)
    after, before = errors
    axes.set(
        xlabel="confidence",
        ylabel="accuracy",
        xlim=(0, 1),
        ylim=(0, 1),
        title=f"Reliability ({split}): ECE {after:.3f}, {before:.3f} before scaling",
    )
    axes.legend(loc="upper left")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
