import numpy as np
import pytest
import torch
from sklearn.metrics import classification_report

from pipeline.evaluation.metrics import evaluate, summary
from pipeline.model.head import ClassifierHead


def test_metrics_equal_sklearn_classification_report():
    rng = np.random.default_rng(0)
    labels = ["cat", "dog", "élan"]
    n = 90
    table = {
        "features": rng.normal(size=(n, 8)).astype(np.float32),
        "label_index": rng.integers(0, 3, n),
        "split": np.array(["train", "validation", "test"] * (n // 3)),
        "path": np.array([f"img{i}.jpg" for i in range(n)]),
        "meta": {"labels": labels},
    }
    torch.manual_seed(0)
    head = ClassifierHead(8, 3).eval()
    metrics, predictions = evaluate(head, table)

    assert set(metrics) == {"train", "validation", "test"}
    assert "per_class" not in metrics["train"]
    for split in ("validation", "test"):
        chosen = predictions[predictions["split"] == split]
        report = classification_report(
            chosen["actual"].astype(str),
            chosen["predicted"].astype(str),
            labels=labels,
            output_dict=True,
            zero_division=0,
        )
        assert metrics[split]["accuracy"] == pytest.approx(np.mean(chosen["actual"] == chosen["predicted"]))
        for label in labels:
            ours, theirs = metrics[split]["per_class"][label], report[label]
            assert ours["count"] == theirs["support"]
            for key in ("precision", "recall"):
                assert ours[key] == pytest.approx(theirs[key])
            assert ours["f1"] == pytest.approx(theirs["f1-score"])


def test_missing_split_has_no_key():
    table = {
        "features": np.zeros((4, 2), np.float32),
        "label_index": np.array([0, 1, 0, 1]),
        "split": np.array(["train"] * 4),
        "path": np.array(["a", "b", "c", "d"]),
        "meta": {"labels": ["a", "b"]},
    }
    metrics, _ = evaluate(ClassifierHead(2, 2).eval(), table)
    assert set(metrics) == {"train"}


def per_split_figures(labels: list[str]) -> list[str]:
    """The metric keys `dvc exp show` shows as columns, for a model of `labels`."""
    rng = np.random.default_rng(0)
    n = 40 * len(labels)
    table = {
        "features": rng.normal(size=(n, 8)).astype(np.float32),
        "label_index": np.arange(n) % len(labels),
        "split": np.array(["train", "validation", "test", "test"] * (n // 4)),
        "path": np.array([f"img{i}.jpg" for i in range(n)]),
        "meta": {"labels": labels},
    }
    metrics, _ = evaluate(ClassifierHead(8, len(labels)).eval(), table)
    return [f"{split}.{key}" for split, values in summary(metrics).items() for key in values]


def test_dvc_shows_the_same_metric_columns_for_4_labels_as_for_100():
    four = per_split_figures(["flag", "fruit", "mammal", "vehicle"])
    assert four == per_split_figures([f"label{i}" for i in range(100)])
    assert len(four) <= 25 and "test.accuracy" in four and not any("per_class" in key for key in four)
