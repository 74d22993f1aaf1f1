"""Training the head on a feature table: Lightning drives it, the logistic head
full-batch with L-BFGS and a cross-validated L2 strength, the MLP with AdamW
(README "The stages", "Accuracy and training speed"). The `train` stage and the
Python API both train here."""

from datetime import UTC, datetime

import numpy as np
import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.loggers import Logger

from pipeline.features.table import FeatureTable
from pipeline.model.checkpoint import Checkpoint
from pipeline.model.head import ClassifierHead
from pipeline.model.lit_head import LitHead
from pipeline.model.regularization import MLP_STRENGTH, balanced_class_weights, choose_strength
from pipeline.project.config import show_progress

CURVE_COLUMNS = ["epoch", "train_loss", "train_accuracy", "validation_loss", "validation_accuracy"]


class EpochCurve(pl.Callback):
    """Collects each epoch's train/validation loss and accuracy for DVC's plots."""

    def __init__(self):
        self.rows = []

    def on_train_epoch_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        row = {"epoch": trainer.current_epoch}
        for column in CURVE_COLUMNS[1:]:
            if f"epoch/{column}" in trainer.callback_metrics:
                row[column] = float(trainer.callback_metrics[f"epoch/{column}"])
        self.rows.append(row)


class Batches:
    """Feature rows in memory as (features, labels) batches, reshuffled each epoch when
    `shuffle`: a DataLoader's per-item collation cost more than the arithmetic here."""

    def __init__(self, features: torch.Tensor, labels: torch.Tensor, size: int, shuffle: bool, seed: int):
        self.features, self.labels, self.size, self.shuffle = features, labels, size, shuffle
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return -(-len(self.labels) // self.size)

    def __iter__(self):
        order = torch.randperm(len(self.labels), generator=self.generator) if self.shuffle else None
        for start in range(0, len(self.labels), self.size):
            rows = slice(start, start + self.size) if order is None else order[start : start + self.size]
            yield self.features[rows], self.labels[rows]


def rows_of(table: FeatureTable, split: str) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """Features, labels and content hashes of one split's rows, ordered by content hash
    and copy: the same images give the same model whatever their file names."""
    rows = np.flatnonzero(table["split"] == split)
    rows = rows[np.lexsort((table["copy"][rows], table["sha256"][rows]))]
    features, labels = table["features"][rows], table["label_index"][rows]
    return torch.from_numpy(features), torch.from_numpy(labels), table["sha256"][rows]


def regularization_strength(
    cfg: DictConfig,
    standardised: torch.Tensor,
    labels: torch.Tensor,
    groups: np.ndarray,
    class_weights: torch.Tensor | None,
) -> float:
    """`train.regularization`, or for `auto` the cross-validated choice (logistic head)."""
    if cfg.train.regularization != "auto":
        return float(cfg.train.regularization)
    if cfg.head.hidden_sizes:
        return MLP_STRENGTH
    return choose_strength(standardised, labels, groups, cfg.train.cv_folds, class_weights, cfg.train.seed)


def fit_head(
    cfg: DictConfig, table: FeatureTable, callbacks: list[pl.Callback], logger: Logger | bool = False
) -> tuple[ClassifierHead, float]:
    """Train the head on the table's train rows, validating on its validation rows.
    Returns the head and the L2 strength it was trained with."""
    pl.seed_everything(cfg.train.seed, verbose=False)
    labels = table["meta"]["labels"]
    features, targets, groups = rows_of(table, "train")  # groups: an image and its augmented copies
    head = ClassifierHead(features.shape[1], len(labels), list(cfg.head.hidden_sizes), cfg.head.dropout)
    with torch.no_grad():  # in place: `features` is rows_of's own copy, and the largest array here
        head.standardise_on(features)
        features.sub_(head.shift).mul_(head.scale)
    weights = balanced_class_weights(targets.numpy(), len(labels)) if cfg.train.class_weighting else None
    strength = regularization_strength(cfg, features, targets, groups, weights)
    optimizer = "adamw" if cfg.head.hidden_sizes else "lbfgs"
    module = LitHead(head, optimizer, cfg.train.learning_rate, strength, weights)
    # the logistic head takes the whole training set as one batch (see LitHead)
    batch_size = cfg.train.batch_size if optimizer == "adamw" else len(targets)
    train_rows = Batches(features, targets, batch_size, shuffle=optimizer == "adamw", seed=cfg.train.seed)
    validation = None
    if (table["split"] == "validation").any():
        validation_features, validation_targets, _ = rows_of(table, "validation")
        with torch.no_grad():
            validation_features = head.standardise(validation_features)
        validation = Batches(
            validation_features, validation_targets, len(validation_targets), shuffle=False, seed=0
        )
        if cfg.train.early_stopping_patience > 0:
            callbacks = [
                *callbacks,
                pl.callbacks.EarlyStopping(
                    "epoch/validation_loss", patience=cfg.train.early_stopping_patience
                ),
            ]
    trainer = pl.Trainer(
        max_epochs=cfg.train.max_iterations,
        accelerator="auto",
        logger=logger,
        enable_checkpointing=False,
        enable_model_summary=False,
        log_every_n_steps=1,  # epoch-level metrics only; silences a warning on small data
        num_sanity_val_steps=0,  # it would log a point before the first epoch
        enable_progress_bar=show_progress(),
        callbacks=callbacks,
        deterministic=True,
    )
    trainer.fit(module, train_rows, validation)
    return head.cpu().eval(), strength


def checkpoint_for(
    cfg: DictConfig,
    table: FeatureTable,
    head: ClassifierHead,
    strength: float,
    calibration: dict,
    run_id: str,
) -> Checkpoint:
    return Checkpoint(
        labels=table["meta"]["labels"],
        in_features=int(table["features"].shape[1]),
        head=OmegaConf.to_container(cfg.head, resolve=True),
        extractor=table["meta"]["extractor"],
        input_size=int(cfg.extractor.input_size),
        data_fingerprint=table["meta"]["split_sha256"],
        mlflow_run_id=run_id,
        trained_at=datetime.now(UTC).isoformat(timespec="seconds"),
        regularization=strength,
        calibration=calibration,
        state_dict=head.state_dict(),
    )
