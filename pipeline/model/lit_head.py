"""Lightning wrapper that trains a ClassifierHead on cached features, held in memory
or streamed from the feature store in batches."""

import pytorch_lightning as pl
import torch

from pipeline.model.head import ClassifierHead
from pipeline.model.regularization import lbfgs, penalised_loss

# Relative change of the objective between L-BFGS iterations where training stops:
# bench/head.py's head stopped after 41 passes at 1e-4, after 68 at 1e-5, for the same
# test accuracy (73.6 and 73.4 %).
CONVERGED = 1e-4


class Evaluation:
    """The objective's last evaluation: the point, its loss, gradients and fit.

    torch's L-BFGS evaluates the objective at the start of every `step`, at the very
    point where the previous step's line search usually ended; with one iteration per
    epoch that doubled the cost of training (and, streamed from the store, a pass
    over every feature vector). Asked again at the same point, this answers from memory.
    """

    def __init__(self):
        self.point = None

    def matches(self, parameters: list[torch.Tensor]) -> bool:
        return self.point is not None and all(
            torch.equal(p, q) for p, q in zip(parameters, self.point, strict=True)
        )

    def remember(self, parameters: list[torch.Tensor], loss: torch.Tensor, fit: tuple[float, float]) -> None:
        self.point = [p.detach().clone() for p in parameters]
        self.grads = [p.grad.clone() for p in parameters]
        self.loss, self.fit = loss.detach(), fit

    def restore(self, parameters: list[torch.Tensor]) -> torch.Tensor:
        for parameter, grad in zip(parameters, self.grads, strict=True):
            parameter.grad = grad.clone()
        return self.loss


class LitHead(pl.LightningModule):
    """One epoch is one optimiser step over the full training set for the logistic
    head (an L-BFGS iteration: the problem is convex), or one pass of mini-batches
    for the MLP (AdamW).

    The logistic head's step gets the training rows whole (`FeatureRows`) and sums
    its objective and gradients over their batches: the full-batch objective, in the
    memory of one batch. Batches arrive standardised (`ClassifierHead.standardise_on`),
    so the steps run the head's layers alone: standardising 20,000 vectors on every
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

    def _log(self, split: str, loss: float, accuracy: float, size: int) -> None:
        """Per-epoch means, the curve Create ML draws; "epoch/" keeps them apart from
        the final metrics that evaluate logs under the plain names."""
        self.log(f"epoch/{split}_loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=size)
        self.log(
            f"epoch/{split}_accuracy", accuracy, on_step=False, on_epoch=True, prog_bar=True, batch_size=size
        )
        # Lightning's loggers take a logged "step" as the x axis: epochs, not batches.
        self.log("step", float(self.current_epoch), on_step=False, on_epoch=True, batch_size=size)

    def _row_weights(self, labels: torch.Tensor) -> torch.Tensor:
        if self.class_weights is None:
            return torch.ones(len(labels), device=labels.device)
        return self.class_weights[labels]

    def _fit(self, logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The weighted sum of cross-entropy losses, and the count of right answers."""
        losses = torch.nn.functional.cross_entropy(logits, labels, weight=self.class_weights, reduction="sum")
        return losses, (logits.argmax(dim=1) == labels).sum()

    def _whole_pass(self, rows, backward: bool) -> tuple[torch.Tensor, tuple[float, float]]:
        """The penalised mean loss over every batch of `rows`, its gradients summed
        batch by batch when `backward`; and the unpenalised loss and the accuracy."""
        total_weight = float(self._row_weights(rows.labels.to(self.device)).sum())
        loss_sum, right = 0.0, 0
        for features, labels in rows:
            features, labels = features.to(self.device), labels.to(self.device)
            with torch.set_grad_enabled(backward):
                losses, correct = self._fit(self.head.layers(features), labels)
                if backward:
                    self.manual_backward(losses / total_weight)
            loss_sum, right = loss_sum + float(losses.detach()), right + int(correct)
            del features, labels, losses  # before the next batch is read (see FeatureRows.raw)
        with torch.set_grad_enabled(backward):
            penalty = 0.5 * self.strength * sum(w.square().sum() for w in self.head.weights())
            if backward:
                self.manual_backward(penalty)
        mean = loss_sum / total_weight
        return torch.tensor(mean + float(penalty.detach())), (mean, right / len(rows.labels))

    def training_step(self, batch, batch_idx):
        optimizer = self.optimizers()
        parameters = list(self.head.parameters())
        if self.optimizer_name == "adamw":
            features, labels = batch

            def closure() -> torch.Tensor:
                optimizer.zero_grad()
                logits = self.head.layers(features)
                loss = penalised_loss(logits, labels, self.head.weights(), self.strength, self.class_weights)
                self.manual_backward(loss)
                losses, correct = self._fit(logits.detach(), labels)
                weight = float(self._row_weights(labels).sum())
                self.last.remember(parameters, loss, (float(losses) / weight, int(correct) / len(labels)))
                return loss

            optimizer.step(closure)
            self._log("train", *self.last.fit, len(labels))
            return

        def whole_closure() -> torch.Tensor:
            if self.last.matches(parameters):
                return self.last.restore(parameters)
            optimizer.zero_grad()
            loss, fit = self._whole_pass(batch, backward=True)
            self.last.remember(parameters, loss, fit)
            return loss

        loss = optimizer.step(whole_closure).item()  # the objective before this step
        # where the line search ended, the usual case, answers from memory; else one more pass
        fit = self.last.fit if self.last.matches(parameters) else self._whole_pass(batch, backward=False)[1]
        self._log("train", *fit, len(batch.labels))
        # Converged: further iterations change nothing but the wall time (Create ML stops too).
        if abs(self.last_loss - loss) <= CONVERGED * max(1.0, abs(loss)):
            self.trainer.should_stop = True
        self.last_loss = loss

    def validation_step(self, batch, batch_idx):
        features, labels = batch
        with torch.no_grad():
            losses, correct = self._fit(self.head.layers(features), labels)
        weight = float(self._row_weights(labels).sum())
        self._log("validation", float(losses) / weight, int(correct) / len(labels), len(labels))

    def configure_optimizers(self):
        if self.optimizer_name == "lbfgs":
            return lbfgs(list(self.head.parameters()), max_iter=1)
        return torch.optim.AdamW(self.head.parameters(), lr=self.learning_rate, weight_decay=0.0)
