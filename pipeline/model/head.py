"""The classifier head on backbone features: plain PyTorch, no training logic."""

from collections.abc import Iterable

import torch
from torch import nn


class ClassifierHead(nn.Module):
    """Logistic regression (no hidden layer) or an MLP (docs/parameters.md), returning logits.

    The logits are divided by a temperature, 1 while training and then fitted on
    held-out images (pipeline/model/calibration.py), so that everything downstream,
    the exported Core ML and ONNX models included, gives calibrated probabilities.

    Features are standardised first (per-dimension shift and scale fitted on the
    training features, stored as buffers), so one grid of regularisation strengths
    suits every backbone, and the exported models standardise exactly as training did.
    """

    def __init__(
        self, in_features: int, num_classes: int, hidden_sizes: list[int] = (), dropout: float = 0.0
    ):
        super().__init__()
        self.register_buffer("shift", torch.zeros(in_features))
        self.register_buffer("scale", torch.ones(in_features))
        self.register_buffer("temperature", torch.ones(()))
        layers: list[nn.Module] = []
        width = in_features
        for hidden in hidden_sizes:
            layers += [nn.Linear(width, hidden), nn.ReLU(), nn.Dropout(dropout)]
            width = hidden
        layers.append(nn.Linear(width, num_classes))
        self.layers = nn.Sequential(*layers)

    def standardise_on(self, batches: torch.Tensor | Iterable[torch.Tensor]) -> "ClassifierHead":
        """Fit the shift and scale to the training features, (N, D) or batches of
        them: zero mean, unit variance (each batch's mean and variance pooled in
        float64, Chan et al.'s update, so that batches add up to the whole).

        A dimension that barely varies in training (EfficientNet has channels that are
        all but always 0; on a few plain-coloured images, most are) is scaled like one
        of a tenth of the mean spread, not blown up: an image that lights it later
        would otherwise swamp every other feature (an MLP trained that way lost 16
        points on the emoji benchmark set).
        """
        count, mean, squares = 0, 0.0, 0.0  # squares: summed squared deviations from the mean
        for batch in [batches] if isinstance(batches, torch.Tensor) else batches:
            variance, batch_mean = torch.var_mean(batch, dim=0, correction=0)
            n, batch_mean = len(batch), batch_mean.double()
            delta = batch_mean - mean
            mean = mean + delta * n / (count + n)
            squares = squares + variance.double() * n + delta.square() * count * n / (count + n)
            count += n
            del batch  # before the next one is read: one batch in memory at a time
        spread = (squares / max(count - 1, 1)).sqrt()
        self.shift.copy_(mean)
        self.scale.copy_(1.0 / spread.clamp_min(max(0.1 * float(spread.mean()), 1e-6)))
        return self

    def standardise(self, features: torch.Tensor) -> torch.Tensor:
        return (features - self.shift) * self.scale

    def weights(self) -> list[torch.Tensor]:
        """The weight matrices the L2 penalty applies to (biases are not penalised)."""
        return [layer.weight for layer in self.layers if isinstance(layer, nn.Linear)]

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.layers(self.standardise(features)) / self.temperature
