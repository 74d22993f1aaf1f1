import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from sklearn.linear_model import LogisticRegression

from pipeline.evaluation.metrics import evaluate
from pipeline.features import table as table_module
from pipeline.features.table import load_table, save_table
from pipeline.model.calibration import HeldOut, calibrate, out_of_fold
from pipeline.model.head import ClassifierHead
from pipeline.model.regularization import STRENGTHS, balanced_class_weights, fold_of_each_row
from pipeline.model.training import EpochCurve, fit_head
from pipeline.project.config import compose_config


def blobs_table(n_per_label: int = 30, dim: int = 16, mislabelled: float = 0.0, copies: int = 0) -> dict:
    """Three labels of Gaussian blobs, a share of them `mislabelled`; `copies`
    near-identical rows per image, as augmentation adds."""
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 3, (3, dim))
    labels = np.repeat(np.arange(3), n_per_label)
    wrong = rng.random(len(labels)) < mislabelled
    given = np.where(wrong, (labels + rng.integers(1, 3, len(labels))) % 3, labels)
    split = np.where(np.arange(len(labels)) % 5 == 0, "validation", "train")
    features = (centres[labels] + rng.normal(0, 1, (len(labels), dim))).astype(np.float32)
    labels = given
    paths = np.array([f"image{i}.png" for i in range(len(labels))])
    shas = np.array([f"{i:064x}" for i in range(len(labels))])
    copy = np.full(len(labels), "")
    if copies:
        features = np.concatenate([features] + [features + rng.normal(0, 0.01, features.shape)] * copies)
        labels, split, paths, shas = (np.tile(column, copies + 1) for column in (labels, split, paths, shas))
        copy = np.concatenate([copy] + [np.full(len(copy), f"flip{c}") for c in range(copies)])
    return {
        "features": features.astype(np.float32),
        "label_index": labels,
        "split": split,
        "path": paths,
        "sha256": shas,
        "copy": copy,
        "meta": {"labels": ["a", "b", "c"], "extractor": {"dim": dim}},
    }


@pytest.mark.parametrize("head", ["logistic", "mlp"])
def test_head_learns_and_logs_one_curve_point_per_epoch(head):
    cfg = compose_config(f"head={head}", "train.max_iterations=15", "train.regularization=0.01")
    curve = EpochCurve()
    fitted, strength = fit_head(cfg, blobs_table(), [curve])
    assert strength == 0.01
    assert [row["epoch"] for row in curve.rows] == list(range(len(curve.rows)))
    assert 1 < len(curve.rows) <= 15
    assert curve.rows[-1]["validation_accuracy"] == 1.0
    assert curve.rows[-1]["train_loss"] < curve.rows[0]["train_loss"]
    hidden = [m for m in fitted.layers if m.__class__.__name__ == "Linear"][:-1]
    assert [layer.out_features for layer in hidden] == ([256] if head == "mlp" else [])


def test_head_standardises_its_input_inside_the_model():
    """The exported models take raw features: a constant offset on every feature the
    head was trained with must not change its predictions."""
    table = blobs_table()
    shifted = {**table, "features": table["features"] + 100.0}
    cfg = compose_config("train.regularization=0.01")
    plain, _ = fit_head(cfg, table, [])
    moved, _ = fit_head(cfg, shifted, [])
    with torch.no_grad():
        a = plain(torch.from_numpy(table["features"])).softmax(1)
        b = moved(torch.from_numpy(shifted["features"])).softmax(1)
    assert torch.allclose(a, b, atol=1e-3)


def test_cross_validation_regularises_noisy_labels_more_than_clean_ones():
    """Mislabelled images need a stronger L2 penalty than clean ones; `auto` must
    find that out from the training features alone."""
    cfg = compose_config("train.regularization=auto")
    _, clean = fit_head(cfg, blobs_table(n_per_label=60), [])
    _, noisy = fit_head(cfg, blobs_table(n_per_label=60, mislabelled=0.3), [])
    assert clean in STRENGTHS and noisy in STRENGTHS
    assert noisy > clean


def test_augmented_copies_stay_in_their_image_fold():
    """A copy held out while its original trains would make every strength look good."""
    table = blobs_table(copies=2)
    train = table["split"] == "train"
    folds = fold_of_each_row(table["label_index"][train], table["path"][train], 5, seed=0)
    for path in np.unique(table["path"][train]):
        assert len(set(folds[table["path"][train] == path])) == 1
    assert sorted(set(folds)) == [0, 1, 2, 3, 4]


def test_logistic_head_stops_when_converged():
    cfg = compose_config("train.max_iterations=500", "train.regularization=0.1")
    curve = EpochCurve()
    fit_head(cfg, blobs_table(), [curve])
    assert len(curve.rows) < 500


def test_early_stopping_ends_training_before_max_iterations():
    cfg = compose_config(
        "head=mlp",
        "train.max_iterations=300",
        "train.early_stopping_patience=3",
        "train.learning_rate=0.05",
        "train.regularization=0",
    )
    curve = EpochCurve()
    fit_head(cfg, blobs_table(), [curve])
    assert len(curve.rows) < 300


def test_balanced_class_weights_equalise_labels():
    weights = balanced_class_weights(np.array([0] * 90 + [1] * 10), 2)
    assert weights.tolist() == pytest.approx([100 / 180, 100 / 20])


def test_features_that_never_vary_in_training_are_not_blown_up():
    """A channel that is 0 on every training image (common on few, plain images) must
    neither divide by zero nor swamp the others when a new image lights it."""
    features = torch.rand(20, 8)
    features[:, :3] = 0.0
    head = ClassifierHead(8, 2).standardise_on(features)
    assert torch.isfinite(head.scale).all()
    assert head.scale[:3].max() <= 10 / features.std(dim=0).mean() + 1e-4
    assert torch.isfinite(ClassifierHead(8, 2).standardise_on(torch.zeros(5, 8)).scale).all()


@pytest.mark.parametrize("dim", [16, 40])
def test_a_store_shard_is_capped_in_bytes_whatever_the_vectors_width(dim, tmp_path, monkeypatch):
    """A shard holds at most `SHARD_BYTES` of vectors, for v2's wide vectors as for
    v1's (a cap in rows made v2's shards at a million images 2.2 times v1's), and
    the table reads back whole."""
    monkeypatch.setattr(table_module, "SHARD_BYTES", 16 * 4 * 50)  # 50 vectors of 16 floats
    table = blobs_table(dim=dim)  # 90 vectors
    save_table(tmp_path / "features", table)
    shards = sorted((tmp_path / "features" / "shards").iterdir())
    rows = [pq.ParquetFile(shard).metadata.num_rows for shard in shards]
    assert max(rows) * dim * 4 <= 16 * 4 * 50 and sum(rows) == 90
    assert len(shards) == (2 if dim == 16 else 5)
    assert np.array_equal(np.asarray(load_table(tmp_path / "features")["features"]), table["features"])


@pytest.mark.parametrize("head", ["logistic", "mlp"])
def test_features_streamed_from_the_store_in_small_batches_train_the_same_head(head, tmp_path):
    """Past `train.feature_batch_rows` the vectors stay in the store and every pass
    reads them batch by batch: the logistic head must come out as if held whole, and
    `evaluate`'s metrics with it; the MLP must still learn."""
    save_table(tmp_path / "features", blobs_table(copies=1))
    table = load_table(tmp_path / "features")
    assert not isinstance(table["features"], np.ndarray)  # left in the store
    fitted = {}
    for batch_rows in (100_000, 7):
        cfg = compose_config(
            f"head={head}", "train.max_iterations=30", f"train.feature_batch_rows={batch_rows}"
        )
        curve = EpochCurve()
        fitted[batch_rows] = (fit_head(cfg, table, [curve])[0], curve)
    whole, streamed = (fitted[rows][0] for rows in (100_000, 7))
    assert fitted[7][1].rows[-1]["validation_accuracy"] == 1.0
    if head == "logistic":
        features = torch.from_numpy(np.asarray(table["features"]))
        with torch.no_grad():
            assert torch.allclose(whole(features).softmax(1), streamed(features).softmax(1), atol=1e-4)
        assert evaluate(whole, table, batch_rows=5)[0] == evaluate(whole, table)[0]


def test_evaluate_reuses_the_out_of_fold_logits_only_while_their_inputs_are_the_same():
    """`train` keeps the logistic head's out-of-fold logits in the checkpoint; the
    audit takes them instead of fitting the fold models again, unless the table or
    the settings they were made from changed."""
    cfg = compose_config("train.max_iterations=30", "train.regularization=0.01")
    table = blobs_table(copies=1)
    head, strength = fit_head(cfg, table, [])
    _, held_out = calibrate(cfg, table, head, strength)
    saved = held_out.saved(cfg, table)
    reused = HeldOut.reused(saved, cfg, table)
    refitted = out_of_fold(cfg, table, head, strength)
    assert np.array_equal(reused.rows, refitted.rows)
    assert torch.equal(reused.logits, refitted.logits) and torch.equal(reused.labels, refitted.labels)
    relabelled = {**table, "label_index": np.roll(table["label_index"], 1)}
    assert HeldOut.reused(saved, cfg, relabelled) is None
    assert HeldOut.reused(saved, compose_config("train.max_iterations=30", "train.seed=1"), table) is None
    assert HeldOut.reused(None, cfg, table) is None
    assert HeldOut.reused({**saved, "logits": saved["logits"][:, :1]}, cfg, table) is None  # not its shape
    mlp = compose_config("head=mlp", "train.max_iterations=5")
    assert calibrate(mlp, table, fit_head(mlp, table, [])[0], 1e-4)[1] is None  # an MLP's are not kept


def test_an_mlp_right_on_every_validation_image_keeps_temperature_1(caplog):
    """Nothing to fit a temperature on: fitted anyway it went towards 0 (0.11 on the demo)."""
    cfg = compose_config("head=mlp", "train.max_iterations=15")
    table = blobs_table()  # well apart: every validation image answered right
    head, strength = fit_head(cfg, table, [])
    with caplog.at_level("INFO", logger="pipeline"):
        calibration, _ = calibrate(cfg, table, head, strength)
    assert calibration["temperature"] == 1.0
    assert float(head.temperature) == 1.0
    assert "temperature not fitted: all of them answered right" in caplog.text


def correlated_table(rows_per_label: int = 200, dim: int = 96) -> dict:
    """Four labels whose features are mixtures of a few underlying ones, as a
    backbone's features of several depths are: a few directions dominate the variance."""
    rng = np.random.default_rng(1)
    labels = np.repeat(np.arange(4), rows_per_label)
    underlying = rng.normal(0, 1, (4, 6))[labels] + rng.normal(0, 1.5, (len(labels), 6))
    features = underlying @ rng.normal(0, 1, (6, dim)) + rng.normal(0, 0.3, (len(labels), dim))
    table = blobs_table()
    return {
        "features": features.astype(np.float32),
        "label_index": labels,
        "split": np.where(np.arange(len(labels)) % 5 == 0, "validation", "train"),
        "path": np.array([f"image{i}.png" for i in range(len(labels))]),
        "sha256": np.array([f"{i:064x}" for i in range(len(labels))]),
        "copy": np.full(len(labels), ""),
        "meta": {**table["meta"], "labels": ["a", "b", "c", "d"]},
    }


def test_logistic_head_reaches_the_penalised_optimum_on_correlated_features():
    """The logistic head is the optimum of its objective (mean log-loss + strength/2
    |W|^2), here scikit-learn's run to a tight tolerance with the same penalty
    (C = 1 / (strength n)), even where correlated features make it ill-conditioned;
    and training leaves a plain head, as checkpoints and exports expect it."""
    strength, table = 1e-3, correlated_table()
    cfg = compose_config("train.max_iterations=100", f"train.regularization={strength}")
    fitted, _ = fit_head(cfg, table, [])
    train = table["split"] == "train"
    with torch.no_grad():
        features = fitted.standardise(torch.from_numpy(table["features"][train]))
        logits = fitted.layers(features)
    labels = torch.from_numpy(table["label_index"][train])

    @torch.no_grad()
    def objective(logits: torch.Tensor, weight: torch.Tensor) -> float:
        penalty = 0.5 * strength * weight.square().sum()
        return float(torch.nn.functional.cross_entropy(logits, labels) + penalty)

    reference = LogisticRegression(C=1 / (strength * len(labels)), tol=1e-10, max_iter=10_000)
    reference.fit(features.numpy(), labels.numpy())
    optimum = objective(
        torch.from_numpy(reference.decision_function(features.numpy())).float(),
        torch.from_numpy(reference.coef_).float(),
    )
    assert objective(logits, fitted.layers[-1].weight) <= optimum * (1 + 1e-3)
    assert set(fitted.state_dict()) == set(ClassifierHead(96, 4).state_dict())
