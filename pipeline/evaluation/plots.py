"""The evaluation's pictures: the confusion matrix and the training curves
(README "The stages")."""

import csv
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt
import numpy as np
from sklearn.metrics import confusion_matrix


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
