"""Training the head on a feature table: Lightning drives it, the logistic head
full-batch with L-BFGS and a cross-validated L2 strength, the MLP with AdamW
(docs/pipeline.md, docs/accuracy.md). The `train` stage and the
Python API both train here."""

from collections.abc import Iterator
from contextlib import nullcontext

import numpy as np
import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.loggers import Logger

from pipeline.features.table import FeatureTable, feature_batches, in_image_order
from pipeline.model.checkpoint import Checkpoint
from pipeline.model.head import ClassifierHead
from pipeline.model.lit_head import LitHead
from pipeline.model.preconditioning import preconditioned
from pipeline.model.regularization import (
    MAX_CV_ROWS,
    MLP_STRENGTH,
    balanced_class_weights,
    choose_strength,
    sample_of_groups,
)
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


# What training reads of the table's rows: not the paths (at a million images, tens of MB)
TABLE_COLUMNS = ("label_index", "split", "sha256", "copy")


class FeatureRows:
    """One split's rows of the table as standardised (features, labels) batches of
    at most `batch_rows` (`train.feature_batch_rows`): read once and held when one
    batch holds them all, else read from the store again on every pass, so that
    memory holds one batch however many images there are (docs/many-images.md).
    Rows are ordered by content hash and copy: the same images give the same model
    whatever their file names."""

    def __init__(self, table: FeatureTable, split: str, batch_rows: int):
        self.rows, self.groups = in_image_order(table, np.flatnonzero(table["split"] == split))
        self.labels = torch.from_numpy(table["label_index"][self.rows])
        self.vectors, self.batch_rows = table["features"], batch_rows
        self.head: ClassifierHead | None = None
        self.held: tuple[torch.Tensor, torch.Tensor] | None = None

    def __len__(self) -> int:
        """Batches per pass (Lightning counts batches)."""
        return -(-len(self.rows) // self.batch_rows)

    def raw(self) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
        """(positions, features as stored). Each generator here and its callers let go
        of a batch before the next is read (`del`; a generator expression cannot):
        one reference held across the read doubled the peak memory."""
        for positions, vectors in feature_batches(self.vectors, self.rows, self.batch_rows):
            yield positions, torch.from_numpy(vectors)
            del vectors

    def stored(self) -> Iterator[torch.Tensor]:
        """The features as stored, batch by batch: what the standardisation is fitted on."""
        for _, features in self.raw():
            yield features
            del features

    def standardised_by(self, head: ClassifierHead) -> "FeatureRows":
        self.head = head
        return self

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self.held is not None:
            yield self.held
            return
        for positions, features in self.raw():
            with torch.no_grad():  # in place: each batch is a fresh copy
                features.sub_(self.head.shift).mul_(self.head.scale)
            batch = features, self.labels[positions]
            del features
            if len(positions) == len(self.rows):
                self.held = batch
            yield batch
            del batch

    def __getitem__(self, positions: np.ndarray) -> torch.Tensor:
        """Standardised features at `positions` (a cross-validation sample), read alone."""
        with torch.no_grad():
            return self.head.standardise(torch.from_numpy(self.vectors[self.rows[positions]]))


class WholePasses:
    """The logistic head's epochs: each one step that L-BFGS takes over every row."""

    def __init__(self, rows: FeatureRows):
        self.rows = rows

    def __len__(self) -> int:
        return 1

    def __iter__(self):
        yield self.rows


class MiniBatches:
    """The MLP's AdamW steps: each batch of `rows` reshuffled every epoch and cut into
    `size` rows (a DataLoader's per-item collation cost more than the arithmetic here)."""

    def __init__(self, rows: FeatureRows, size: int, seed: int):
        self.rows, self.size = rows, size
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        whole, rest = divmod(len(self.rows.rows), self.rows.batch_rows)
        return whole * -(-self.rows.batch_rows // self.size) + -(-rest // self.size)

    def __iter__(self):
        for features, labels in self.rows:
            order = torch.randperm(len(labels), generator=self.generator)
            for start in range(0, len(labels), self.size):
                rows = order[start : start + self.size]
                yield features[rows], labels[rows]
            del features, labels  # before the next batch is read


def regularization_strength(cfg: DictConfig, rows: FeatureRows, class_weights: torch.Tensor | None) -> float:
    """`train.regularization`, or for `auto` the cross-validated choice (logistic head)."""
    if cfg.train.regularization != "auto":
        return float(cfg.train.regularization)
    if cfg.head.hidden_sizes:
        return MLP_STRENGTH
    return choose_strength(rows, rows.labels, rows.groups, cfg.train.cv_folds, class_weights, cfg.train.seed)


def fit_head(
    cfg: DictConfig, table: FeatureTable, callbacks: list[pl.Callback], logger: Logger | bool = False
) -> tuple[ClassifierHead, float]:
    """Train the head on the table's train rows, validating on its validation rows.
    Returns the head and the L2 strength it was trained with."""
    pl.seed_everything(cfg.train.seed, verbose=False)
    labels = table["meta"]["labels"]
    batch_rows = cfg.train.feature_batch_rows
    train_rows = FeatureRows(table, "train", batch_rows)
    dim = table["features"].shape[1]
    head = ClassifierHead(dim, len(labels), list(cfg.head.hidden_sizes), cfg.head.dropout)
    with torch.no_grad():
        head.standardise_on(train_rows.stored())
    train_rows.standardised_by(head)
    targets = train_rows.labels
    weights = balanced_class_weights(targets.numpy(), len(labels)) if cfg.train.class_weighting else None
    strength = regularization_strength(cfg, train_rows, weights)
    optimizer = "adamw" if cfg.head.hidden_sizes else "lbfgs"
    module = LitHead(head, optimizer, cfg.train.learning_rate, strength, weights)
    if optimizer == "lbfgs":
        steps = WholePasses(train_rows)  # the whole training set is one batch (see LitHead)
    else:
        steps = MiniBatches(train_rows, cfg.train.batch_size, seed=cfg.train.seed)
    validation = None
    if (table["split"] == "validation").any():
        validation = FeatureRows(table, "validation", batch_rows).standardised_by(head)
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
    steering = nullcontext()  # AdamW scales each coordinate itself: the MLP trains as it is
    if optimizer == "lbfgs":
        sample = sample_of_groups(targets.numpy(), train_rows.groups, MAX_CV_ROWS, cfg.train.seed)
        steering = preconditioned(head.layers[-1], train_rows[sample])
    with steering:
        trainer.fit(module, steps, validation)
    return head.cpu().eval(), strength


def checkpoint_for(
    cfg: DictConfig,
    table: FeatureTable,
    head: ClassifierHead,
    strength: float,
    calibration: dict,
    held_out: dict | None = None,
) -> Checkpoint:
    return Checkpoint(
        labels=table["meta"]["labels"],
        in_features=int(table["features"].shape[1]),
        head=OmegaConf.to_container(cfg.head, resolve=True),
        extractor=table["meta"]["extractor"],
        input_size=int(cfg.extractor.input_size),
        data_fingerprint=table["meta"]["split_sha256"],
        regularization=strength,
        calibration=calibration,
        state_dict=head.state_dict(),
        held_out=held_out,
    )
