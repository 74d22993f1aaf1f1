"""Lightning wrapper that trains a ClassifierHead on cached features."""

import pytorch_lightning as pl
import torch
from torch import nn

from pipeline.head import ClassifierHead


class LitHead(pl.LightningModule):
    def __init__(
        self,
        head: ClassifierHead,
        learning_rate: float,
        weight_decay: float,
        class_weights: torch.Tensor | None = None,
    ):
        super().__init__()
        self.head = head
        self.learning_rate, self.weight_decay = learning_rate, weight_decay
        self.loss = nn.CrossEntropyLoss(weight=class_weights)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(features)

    def _step(self, batch: tuple[torch.Tensor, torch.Tensor], split: str) -> torch.Tensor:
        features, labels = batch
        logits = self.head(features)
        loss = self.loss(logits, labels)
        accuracy = (logits.argmax(dim=1) == labels).float().mean()
        # Per-epoch means, the curve Create ML draws; "epoch/" keeps them apart from
        # the final metrics that evaluate logs under the plain names.
        self.log(f"epoch/{split}_loss", loss, on_step=False, on_epoch=True, prog_bar=True)
        self.log(f"epoch/{split}_accuracy", accuracy, on_step=False, on_epoch=True, prog_bar=True)
        # Lightning's loggers take a logged "step" as the x axis: epochs, not batches.
        self.log("step", float(self.current_epoch), on_step=False, on_epoch=True)
        return loss

    def training_step(self, batch, batch_idx):
        return self._step(batch, "train")

    def validation_step(self, batch, batch_idx):
        self._step(batch, "validation")

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.learning_rate, weight_decay=self.weight_decay)
