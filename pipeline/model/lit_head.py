"""Lightning wrapper that trains a ClassifierHead on cached features held in memory."""

import pytorch_lightning as pl
import torch

from pipeline.model.head import ClassifierHead
from pipeline.model.regularization import lbfgs, penalised_loss

CONVERGED = 1e-5  # relative change of the objective between L-BFGS iterations


class Evaluation:
    """The objective's last evaluation: the point, its logits, loss and gradients.

    torch's L-BFGS evaluates the objective at the start of every `step`, at the very
    point where the previous step's line search usually ended; with one iteration per
    epoch that doubled the cost of training. Asked again at the same point, this
    answers from memory.
    """

    def __init__(self):
        self.point = None

    def matches(self, parameters: list[torch.Tensor]) -> bool:
        return self.point is not None and all(
            torch.equal(p, q) for p, q in zip(parameters, self.point, strict=True)
        )

    def remember(self, parameters: list[torch.Tensor], logits: torch.Tensor, loss: torch.Tensor) -> None:
        self.point = [p.detach().clone() for p in parameters]
        self.grads = [p.grad.clone() for p in parameters]
        self.logits, self.loss = logits.detach(), loss.detach()

    def restore(self, parameters: list[torch.Tensor]) -> torch.Tensor:
        for parameter, grad in zip(parameters, self.grads, strict=True):
            parameter.grad = grad.clone()
        return self.loss


class LitHead(pl.LightningModule):
    """One epoch is one optimiser step over the full training set for the logistic
    head (an L-BFGS iteration: the problem is convex and fits in memory), or one
    pass of mini-batches for the MLP (AdamW).

    Batches arrive standardised once up front (`ClassifierHead.standardise_on`), so
    the steps run the head's layers alone: standardising 20,000 vectors on every
    L-BFGS evaluation cost twice the matrix product itself.
    """

    def __init__(
        self,
        head: ClassifierHead,
        optimizer: str,
        learning_rate: float,
        strength: float,
        class_weights: torch.Tensor | None = None,
    ):
        super().__init__()
        self.automatic_optimization = False  # L-BFGS needs its closure; AdamW takes one too
        self.head = head
        self.optimizer_name, self.learning_rate, self.strength = optimizer, learning_rate, strength
        self.register_buffer("class_weights", class_weights)
        self.last_loss = float("inf")
        self.last = Evaluation()

    def _log(self, split: str, logits: torch.Tensor, labels: torch.Tensor) -> None:
        """Per-epoch means, the curve Create ML draws; "epoch/" keeps them apart from
        the final metrics that evaluate logs under the plain names."""
        with torch.no_grad():
            loss = torch.nn.functional.cross_entropy(logits, labels, weight=self.class_weights)
            accuracy = (logits.argmax(dim=1) == labels).float().mean()
        size = len(labels)
        self.log(f"epoch/{split}_loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=size)
        self.log(
            f"epoch/{split}_accuracy", accuracy, on_step=False, on_epoch=True, prog_bar=True, batch_size=size
        )
        # Lightning's loggers take a logged "step" as the x axis: epochs, not batches.
        self.log("step", float(self.current_epoch), on_step=False, on_epoch=True, batch_size=size)

    def training_step(self, batch, batch_idx):
        features, labels = batch
        optimizer = self.optimizers()
        parameters = list(self.head.parameters())

        def closure() -> torch.Tensor:
            if self.optimizer_name == "lbfgs" and self.last.matches(parameters):
                return self.last.restore(parameters)
            optimizer.zero_grad()
            logits = self.head.layers(features)
            loss = penalised_loss(logits, labels, self.head.weights(), self.strength, self.class_weights)
            self.manual_backward(loss)
            self.last.remember(parameters, logits, loss)
            return loss

        loss = optimizer.step(closure).item()  # the objective before this step
        if self.optimizer_name == "adamw" or self.last.matches(parameters):
            logits = self.last.logits  # AdamW: this batch's, as it stepped; L-BFGS: where its search ended
        else:
            with torch.no_grad():
                logits = self.head.layers(features)
        self._log("train", logits, labels)
        if self.optimizer_name == "lbfgs":
            # Converged: further iterations change nothing but the wall time (Create ML stops too).
            if abs(self.last_loss - loss) <= CONVERGED * max(1.0, abs(loss)):
                self.trainer.should_stop = True
            self.last_loss = loss

    def validation_step(self, batch, batch_idx):
        features, labels = batch
        with torch.no_grad():
            self._log("validation", self.head.layers(features), labels)

    def configure_optimizers(self):
        if self.optimizer_name == "lbfgs":
            return lbfgs(list(self.head.parameters()), max_iter=1)
        return torch.optim.AdamW(self.head.parameters(), lr=self.learning_rate, weight_decay=0.0)
