"""The head's objective, and its L2 strength chosen by k-fold cross-validation.

A validation split of a small set is 10-20 images, too few to choose on, so the
strength is chosen on the training features themselves: each fold trains on the
others and is scored on its held-out part. All folds train at once, as one
(D, folds x labels) matrix: the objective is a sum of independent convex
problems, so L-BFGS on the sum reaches each fold's own optimum, and one wide
matrix product is several times cheaper than one narrow product per fold.
"""

import logging
from collections.abc import Callable

import numpy as np
import torch
from sklearn.model_selection import StratifiedKFold
from torch import nn

log = logging.getLogger(__name__)

# L2 strengths (on the mean loss over standardised features) tried, strongest
# first so that each fit warm-starts from a smoother neighbour's solution.
STRENGTHS = tuple(10.0 ** np.arange(0.0, -4.01, -0.5))
MLP_STRENGTH = 1e-4  # an MLP is not cross-validated: 5 folds x 9 strengths of it take minutes
ITERATIONS_PER_STRENGTH = 25
LINE_SEARCH_EVALUATIONS = 25  # at most, per L-BFGS iteration (torch's own limit)
# Past this many training vectors the strength is chosen on a stratified sample of
# them and rescaled (below): a larger set needs less of it, and where it matters
# least the folds would cost more than the final fit.
MAX_CV_ROWS = 2048


def penalised_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    weights: list[torch.Tensor],
    strength: float,
    class_weights: torch.Tensor | None,
) -> torch.Tensor:
    """Mean cross-entropy plus strength/2 * the squared norm of the weight matrices."""
    loss = nn.functional.cross_entropy(logits, labels, weight=class_weights)
    return loss + 0.5 * strength * sum(w.square().sum() for w in weights)


def balanced_class_weights(labels: np.ndarray, num_classes: int) -> torch.Tensor:
    """n / (k * count): each class weighs the same in the loss, as sklearn's 'balanced'."""
    counts = np.bincount(labels, minlength=num_classes).astype(np.float32)
    return torch.from_numpy(len(labels) / (num_classes * np.maximum(counts, 1)))


def lbfgs(parameters: list[torch.Tensor], max_iter: int) -> torch.optim.LBFGS:
    """The optimiser for the convex logistic objective: no learning rate to tune.

    torch's default budget of evaluations, max_iter * 5 // 4, leaves a one-iteration
    step (the head's epoch) no evaluation past the line search's first: a step that
    overshoots is then discarded, and every later step repeats it, so training
    stopped short of the optimum (at 0.448 on bench/head.py's set, which converges at 0.444).
    """
    return torch.optim.LBFGS(
        parameters,
        lr=1.0,
        max_iter=max_iter,
        max_eval=max_iter + LINE_SEARCH_EVALUATIONS,
        history_size=20,
        line_search_fn="strong_wolfe",
    )


def minimise(parameters: list[torch.Tensor], objective: Callable[[], torch.Tensor], iterations: int) -> None:
    optimiser = lbfgs(parameters, iterations)

    def closure() -> torch.Tensor:
        optimiser.zero_grad()
        loss = objective()
        loss.backward()
        return loss

    optimiser.step(closure)


def fold_of_each_row(labels: np.ndarray, groups: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """A stratified fold number per row; rows of one group (an image and its
    augmented copies) share a fold, so no image is scored by a model that saw a copy of it."""
    unique_groups, first, inverse = np.unique(groups, return_index=True, return_inverse=True)
    splitter = StratifiedKFold(folds, shuffle=True, random_state=seed)
    fold_of_group = np.empty(len(unique_groups), np.int64)
    for fold, (_, held_out) in enumerate(splitter.split(np.zeros(len(first)), labels[first])):
        fold_of_group[held_out] = fold
    return fold_of_group[inverse]


def usable_folds(labels: np.ndarray, groups: np.ndarray, wanted: int) -> int:
    """As many folds as the rarest label has images for, at most `wanted` (0: too few to fold)."""
    _, first = np.unique(groups, return_index=True)
    rarest = np.bincount(labels[first]).min()
    return min(wanted, int(rarest)) if rarest >= 2 else 0


def sample_of_groups(labels: np.ndarray, groups: np.ndarray, limit: int, seed: int) -> np.ndarray:
    """Row indices of whole groups, about `limit` rows, each label keeping its share."""
    if len(labels) <= limit:
        return np.arange(len(labels))
    unique_groups, first, inverse = np.unique(groups, return_index=True, return_inverse=True)
    rng = np.random.default_rng(seed)
    kept = np.zeros(len(unique_groups), bool)
    for label in np.unique(labels[first]):
        members = np.flatnonzero(labels[first] == label)
        share = max(2, round(len(members) * limit / len(labels)))
        kept[rng.choice(members, min(share, len(members)), replace=False)] = True
    return np.flatnonzero(kept[inverse])


def choose_strength(
    features: torch.Tensor,
    labels: torch.Tensor,
    groups: np.ndarray,
    folds: int,
    class_weights: torch.Tensor | None,
    seed: int,
) -> float:
    """The L2 strength with the lowest mean held-out log-loss over `folds` folds
    (fewer when the rarest label has fewer images; MLP_STRENGTH when it has one).

    `features` are already standardised: a tensor, or anything that row numbers index
    into one (training's `FeatureRows`, which reads only the sampled rows from the
    store). Log-loss rather than accuracy: on small folds accuracy ties across most
    strengths, log-loss does not. On a sample of a large set the choice is rescaled
    by sample size / set size: the penalty on the mean loss is a fixed prior divided
    by the number of images it is spread over.
    """
    rows = sample_of_groups(labels.numpy(), groups, MAX_CV_ROWS, seed)
    folds = usable_folds(labels[rows].numpy(), groups[rows], folds)
    if folds < 2:
        log.warning("too few images per label to cross-validate: L2 strength %.0e", MLP_STRENGTH)
        return MLP_STRENGTH
    fold = fold_of_each_row(labels[rows].numpy(), groups[rows], folds, seed)
    strength = _strength_by_folds(features[rows], labels[rows], torch.from_numpy(fold), class_weights)
    sampled = len(rows) / len(labels)
    if sampled < 1:
        log.info(
            "chosen on %.0f %% of the training vectors: L2 strength %.1e on all of them",
            100 * sampled,
            strength * sampled,
        )
    return strength * sampled


class FoldModels:
    """One logistic model per fold, each trained on the other folds' rows, all at once
    as one (D, folds x labels) matrix (see the module's docstring)."""

    def __init__(
        self,
        features: torch.Tensor,
        labels: torch.Tensor,
        fold: torch.Tensor,
        class_weights: torch.Tensor | None,
        num_classes: int,
    ):
        self.features, self.labels, self.fold = features, labels, fold
        self.num_classes, self.folds = num_classes, int(fold.max()) + 1
        trains = torch.stack([fold != f for f in range(self.folds)], dim=1).float()  # (N, folds)
        row_weight = torch.ones(len(labels)) if class_weights is None else class_weights[labels]
        fit_weight = trains * row_weight[:, None]
        self.fit_weight = fit_weight / fit_weight.sum(dim=0)
        self.weight = torch.zeros(features.shape[1], self.folds * num_classes, requires_grad=True)
        self.bias = torch.zeros(self.folds * num_classes, requires_grad=True)

    def logits(self) -> torch.Tensor:
        """(N, folds, labels): every row under every fold's model."""
        return (self.features @ self.weight + self.bias).view(len(self.labels), self.folds, self.num_classes)

    def fit(self, strength: float, iterations: int) -> None:
        """Warm-started from the last fit: strongest strength first is cheapest."""

        def objective() -> torch.Tensor:
            losses = -self.logits().log_softmax(dim=2)
            losses = losses.gather(2, self.labels.view(-1, 1, 1).expand(-1, self.folds, 1)).squeeze(2)
            return (losses * self.fit_weight).sum() + 0.5 * strength * self.weight.square().sum()

        minimise([self.weight, self.bias], objective, iterations)

    def held_out_logits(self) -> torch.Tensor:
        """(N, labels): each row's logits under the one model that did not train on it."""
        with torch.no_grad():
            return self.logits()[torch.arange(len(self.labels)), self.fold]


def _strength_by_folds(
    features: torch.Tensor, labels: torch.Tensor, fold: torch.Tensor, class_weights: torch.Tensor | None
) -> float:
    models = FoldModels(features, labels, fold, class_weights, int(labels.max()) + 1)
    scores = {}
    for strength in STRENGTHS:
        models.fit(float(strength), ITERATIONS_PER_STRENGTH)
        scores[float(strength)] = float(nn.functional.cross_entropy(models.held_out_logits(), labels))
        if len(scores) > 2 and min(scores, key=scores.get) not in list(scores)[-2:]:
            break  # held-out loss rose twice in a row: weaker strengths only overfit more (and fit slowest)
    best = min(scores, key=scores.get)
    log.info(
        "L2 strength %.0e chosen by %d-fold cross-validation (held-out log-loss %s)",
        best,
        models.folds,
        ", ".join(f"{s:.0e}: {v:.3f}" for s, v in scores.items()),
    )
    return best
