import numpy as np
import pytest

from pipeline.config import compose_config
from pipeline.train import EpochCurve, balanced_class_weights, fit_head


def separable_table(n_per_label: int = 30, dim: int = 16) -> dict:
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 3, (3, dim))
    labels = np.repeat(np.arange(3), n_per_label)
    split = np.where(np.arange(len(labels)) % 5 == 0, "validation", "train")
    features = (centres[labels] + rng.normal(0, 1, (len(labels), dim))).astype(np.float32)
    return {"features": features, "label_index": labels, "split": split, "meta": {"labels": ["a", "b", "c"]}}


@pytest.mark.parametrize("head", ["logistic", "mlp"])
def test_head_learns_and_logs_one_curve_point_per_epoch(head):
    cfg = compose_config(f"head={head}", "train.max_iterations=15")
    curve = EpochCurve()
    fitted = fit_head(cfg, separable_table(), [curve])
    assert [row["epoch"] for row in curve.rows] == list(range(15))
    assert curve.rows[-1]["validation_accuracy"] == 1.0
    assert curve.rows[-1]["train_loss"] < curve.rows[0]["train_loss"]
    hidden = [m for m in fitted.layers if m.__class__.__name__ == "Linear"][:-1]
    assert [layer.out_features for layer in hidden] == ([256] if head == "mlp" else [])


def test_early_stopping_ends_training_before_max_iterations():
    cfg = compose_config(
        "train.max_iterations=300", "train.early_stopping_patience=3", "train.learning_rate=0.05"
    )
    curve = EpochCurve()
    fit_head(cfg, separable_table(), [curve])
    assert len(curve.rows) < 300


def test_balanced_class_weights_equalise_labels():
    weights = balanced_class_weights(np.array([0] * 90 + [1] * 10), 2)
    assert weights.tolist() == pytest.approx([100 / 180, 100 / 20])
