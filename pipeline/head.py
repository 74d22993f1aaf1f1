"""The classifier head on backbone features: plain PyTorch, no training logic."""

from torch import nn


class ClassifierHead(nn.Module):
    """Logistic regression (no hidden layer) or an MLP (SPEC 3), returning logits."""

    def __init__(
        self, in_features: int, num_classes: int, hidden_sizes: list[int] = (), dropout: float = 0.0
    ):
        super().__init__()
        layers: list[nn.Module] = []
        width = in_features
        for hidden in hidden_sizes:
            layers += [nn.Linear(width, hidden), nn.ReLU(), nn.Dropout(dropout)]
            width = hidden
        layers.append(nn.Linear(width, num_classes))
        self.layers = nn.Sequential(*layers)

    def forward(self, features):
        return self.layers(features)
