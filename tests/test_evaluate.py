import numpy as np
import pytest
import torch
from sklearn.metrics import classification_report

from pipeline.evaluation.metrics import evaluate
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
