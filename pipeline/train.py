"""Stage `train`: a Lightning head on the cached features (SPEC 3)."""

import logging
from datetime import UTC, datetime
from pathlib import Path

import mlflow
import numpy as np
import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.loggers import Logger, MLFlowLogger
from torch.utils.data import DataLoader, TensorDataset

from pipeline import tracking
from pipeline.config import show_progress, stage_entry
from pipeline.extract import features_for
from pipeline.files import write_csv
from pipeline.head import ClassifierHead
from pipeline.lit_head import LitHead

log = logging.getLogger(__name__)

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


def loader(table: dict, split: str, batch_size: int, shuffle: bool) -> DataLoader | None:
    mask = table["split"] == split
    if not mask.any():
        return None
    dataset = TensorDataset(
        torch.from_numpy(table["features"][mask]), torch.from_numpy(table["label_index"][mask])
    )
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle)


def balanced_class_weights(labels: np.ndarray, num_classes: int) -> torch.Tensor:
    """n / (k * count): each class weighs the same in the loss, as sklearn's 'balanced'."""
    counts = np.bincount(labels, minlength=num_classes).astype(np.float32)
    return torch.from_numpy(len(labels) / (num_classes * np.maximum(counts, 1)))


def fit_head(
    cfg: DictConfig, table: dict, callbacks: list[pl.Callback], logger: Logger | bool = False
) -> ClassifierHead:
    """Train the head on the table's train rows, validating on its validation rows."""
    pl.seed_everything(cfg.train.seed, verbose=False)
    labels = table["meta"]["labels"]
    head = ClassifierHead(
        table["features"].shape[1], len(labels), list(cfg.head.hidden_sizes), cfg.head.dropout
    )
    train_labels = table["label_index"][table["split"] == "train"]
    weights = balanced_class_weights(train_labels, len(labels)) if cfg.train.class_weighting else None
    module = LitHead(head, cfg.train.learning_rate, cfg.train.weight_decay, weights)
    validation = loader(table, "validation", cfg.train.batch_size, shuffle=False)
    if validation is not None and cfg.train.early_stopping_patience > 0:
        callbacks = [
            *callbacks,
            pl.callbacks.EarlyStopping("epoch/validation_loss", patience=cfg.train.early_stopping_patience),
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
    trainer.fit(module, loader(table, "train", cfg.train.batch_size, shuffle=True), validation)
    return head.eval()


def save_checkpoint(
    path: str | Path, head: ClassifierHead, cfg: DictConfig, table: dict, run_id: str
) -> None:
    """The head with everything needed to use it: labels, input size, extractor, run."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    checkpoint = {
        "state_dict": head.state_dict(),
        "labels": table["meta"]["labels"],
        "in_features": int(table["features"].shape[1]),
        "head": OmegaConf.to_container(cfg.head, resolve=True),
        "extractor": table["meta"]["extractor"],
        "input_size": int(cfg.extractor.input_size),
        "data_fingerprint": table["meta"]["split_sha256"],
        "mlflow_run_id": run_id,
        "trained_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    torch.save(checkpoint, path)


def load_checkpoint(path: str | Path) -> tuple[ClassifierHead, dict]:
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    spec = checkpoint["head"]
    head = ClassifierHead(
        checkpoint["in_features"], len(checkpoint["labels"]), spec["hidden_sizes"], spec["dropout"]
    )
    head.load_state_dict(checkpoint["state_dict"])
    return head.eval(), checkpoint


def run(cfg: DictConfig) -> None:
    table = features_for(cfg)
    run_id = tracking.start_run(cfg, table["meta"]["split_sha256"])
    curve = EpochCurve()
    head = fit_head(cfg, table, [curve], MLFlowLogger(tracking_uri=mlflow.get_tracking_uri(), run_id=run_id))
    write_csv(cfg.paths.curves, curve.rows, CURVE_COLUMNS)
    with tracking.resumed_run(cfg, run_id):
        mlflow.log_artifact(cfg.paths.curves)
    save_checkpoint(cfg.paths.checkpoint, head, cfg, table, run_id)
    last = curve.rows[-1]
    log.info(
        "trained %s head for %d epochs: %s (MLflow run %s)",
        cfg.head.type,
        len(curve.rows),
        ", ".join(f"{k} {v:.3f}" for k, v in last.items() if k != "epoch"),
        run_id,
    )


main = stage_entry(run)

if __name__ == "__main__":
    main()
