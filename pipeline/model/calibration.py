"""Calibrated confidence and "none of these" (docs/trust.md).

A head's softmax is not a probability one can act on: an L2-penalised logistic
head is under-confident, an MLP over-confident. Temperature scaling (Guo et al.,
2017) divides the logits by the one number that best fits held-out images, which
leaves every prediction's label as it was. The same held-out images then give the
confidence under which a photo is answered "unknown": the threshold that keeps
`calibrate.keep` of them. Held out means out-of-fold: k logistic models at the
head's L2 strength, each trained on the other folds' images (and their augmented
copies) and scored on its own fold, so every training and validation image gets
probabilities from a model that never saw it. Those also feed the data audit.
"""

import hashlib
import json
import logging
from dataclasses import dataclass

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from pipeline.features.table import FeatureTable, in_image_order
from pipeline.model.head import ClassifierHead
from pipeline.model.regularization import (
    FoldModels,
    balanced_class_weights,
    choose_strength,
    fold_of_each_row,
    minimise,
    sample_of_groups,
    usable_folds,
)

log = logging.getLogger(__name__)

HELD_OUT_SPLITS = ("train", "validation")
# Past this many images (augmented copies included) the out-of-fold models train
# on a stratified sample of whole images: a temperature is one number, and five
# models over a million feature vectors would cost minutes where 20,000 cost seconds.
MAX_HELD_OUT_ROWS = 20_000
DIGEST_ROWS = 65_536  # rows of the out-of-fold inputs hashed at a time


@dataclass
class HeldOut:
    rows: np.ndarray  # (N,) rows of the feature table: the train and validation images, no copies
    logits: torch.Tensor  # (N, labels) from the fold model that did not see the image; not calibrated
    labels: torch.Tensor  # (N,)

    def saved(self, cfg: DictConfig, table: FeatureTable) -> dict:
        """What the checkpoint keeps of them, with a digest of what they were made from:
        `evaluate`'s audit stands on the same logits and need not fit the fold models
        again (see `reused`)."""
        return {
            "inputs": out_of_fold_inputs(cfg, table),
            "rows": torch.from_numpy(self.rows),
            "logits": self.logits,
            "labels": self.labels,
        }

    @classmethod
    def reused(cls, saved: dict | None, cfg: DictConfig, table: FeatureTable) -> "HeldOut | None":
        """The checkpoint's out-of-fold logits when they were made from this table and
        these settings, else None. Fitting the fold models again, and importing torch's
        compiler that its optimiser pulls in, took 2-3 s of a 2,000-image `evaluate`."""
        if saved is None or saved["inputs"] != out_of_fold_inputs(cfg, table):
            return None
        rows, logits, labels = saved["rows"].numpy(), saved["logits"], saved["labels"]
        width = (len(table["meta"]["labels"]),)
        if not (len(rows) == len(logits) == len(labels)) or tuple(logits.shape[1:]) != width:
            return None  # not what `saved` writes: fitted again
        return cls(rows, logits, labels)


def out_of_fold_inputs(cfg: DictConfig, table: FeatureTable) -> str:
    """A digest of all that out_of_fold reads besides the head (which the checkpoint
    holds): the train and validation rows with their copies and labels, the features'
    extractor, and the head and training settings."""
    rows = np.flatnonzero(np.isin(table["split"], HELD_OUT_SPLITS))
    settings = OmegaConf.to_container(cfg.head, resolve=True), OmegaConf.to_container(cfg.train, resolve=True)
    digest = hashlib.sha256(json.dumps([table["meta"]["extractor"], *settings], sort_keys=True).encode())
    for column in ("sha256", "copy", "label_index"):
        values = table[column][rows]
        # a slice at a time: a million hashes as Python strings, joined, took about 0.2 GB
        for start in range(0, len(values), DIGEST_ROWS):
            digest.update("\n".join(map(str, values[start : start + DIGEST_ROWS])).encode())
    return digest.hexdigest()


def out_of_fold(
    cfg: DictConfig, table: FeatureTable, head: ClassifierHead, strength: float
) -> HeldOut | None:
    """Out-of-fold logits of every train and validation image, or of a sample of
    MAX_HELD_OUT_ROWS of them in a larger set (None when a label has fewer than two
    images to fold). `strength` is the logistic L2 strength: the head's own for a
    logistic head; an MLP's is no logistic one, so it is chosen here."""
    # as training orders them; an image and its augmented copies share a fold
    rows, groups = in_image_order(table, np.flatnonzero(np.isin(table["split"], HELD_OUT_SPLITS)))
    sample = sample_of_groups(table["label_index"][rows], groups, MAX_HELD_OUT_ROWS, cfg.train.seed)
    # the penalty is on the mean loss: the same prior over fewer images is a larger strength
    strength, rows, groups = strength * len(rows) / len(sample), rows[sample], groups[sample]
    labels = torch.from_numpy(table["label_index"][rows])
    folds = usable_folds(labels.numpy(), groups, cfg.train.cv_folds)
    if folds < 2:
        return None
    num_classes = len(table["meta"]["labels"])
    weights = balanced_class_weights(labels.numpy(), num_classes) if cfg.train.class_weighting else None
    with torch.no_grad():
        features = head.standardise(torch.from_numpy(table["features"][rows]))
    if cfg.head.hidden_sizes:
        strength = choose_strength(features, labels, groups, cfg.train.cv_folds, weights, cfg.train.seed)
    fold = torch.from_numpy(fold_of_each_row(labels.numpy(), groups, folds, cfg.train.seed))
    models = FoldModels(features, labels, fold, weights, num_classes)
    models.fit(strength, cfg.train.max_iterations)
    originals = table["copy"][rows] == ""
    return HeldOut(rows[originals], models.held_out_logits()[originals], labels[originals])


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The T that minimises the log-loss of softmax(logits / T) on held-out images."""
    log_temperature = torch.zeros((), requires_grad=True)  # T = e^x stays positive

    def loss() -> torch.Tensor:
        return torch.nn.functional.cross_entropy(logits / log_temperature.exp(), labels)

    minimise([log_temperature], loss, 50)
    return float(log_temperature.detach().exp())


def can_fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> bool:
    """Whether held-out images can choose a temperature: when every one is answered
    right, the log-loss only falls as T shrinks to 0, with no minimum to find. The
    demo's MLP, fitted on 16 such validation images, got T = 0.11, every answer
    near-certain, and a test calibration error of 0.061 against 0.042 unscaled."""
    return bool((logits.argmax(dim=1) != labels).any())


def rejection_threshold(confidences: np.ndarray, keep: float) -> float:
    """The confidence that `keep` of the held-out images reach (0 when keep is 1: none rejected)."""
    if keep >= 1 or len(confidences) == 0:
        return 0.0
    return float(np.quantile(confidences, 1 - keep, method="lower"))


def held_out_for_calibration(
    cfg: DictConfig, table: FeatureTable, head: ClassifierHead, logistic_out_of_fold: HeldOut | None
) -> tuple[torch.Tensor, torch.Tensor, str] | None:
    """Uncalibrated logits of held-out images, their labels and what they are.

    The logistic head's out-of-fold models are the head itself trained on less; an
    MLP's are not, so an MLP is calibrated on its own logits of the validation images."""
    if not cfg.head.hidden_sizes:
        if logistic_out_of_fold is None:
            return None
        return (
            logistic_out_of_fold.logits,
            logistic_out_of_fold.labels,
            f"{len(logistic_out_of_fold.rows)} training and validation images, out of fold",
        )
    rows = np.flatnonzero((table["split"] == "validation") & (table["copy"] == ""))
    if len(rows) == 0:
        return None
    with torch.no_grad():
        logits = head(torch.from_numpy(table["features"][rows]))  # temperature still 1
    return logits, torch.from_numpy(table["label_index"][rows]), f"{len(rows)} validation images"


def calibrate(
    cfg: DictConfig, table: FeatureTable, head: ClassifierHead, strength: float
) -> tuple[dict, HeldOut | None]:
    """Set the head's temperature and return the calibration the checkpoint keeps
    (temperature, rejection_threshold, keep, fitted_on), and the logistic head's
    out-of-fold logits it stands on (None for an MLP, or too few images to fold)."""
    logistic_out_of_fold = None if cfg.head.hidden_sizes else out_of_fold(cfg, table, head, strength)
    held_out = held_out_for_calibration(cfg, table, head, logistic_out_of_fold)
    if held_out is None:
        log.warning("no held-out images to calibrate on: temperature 1, no rejection threshold")
        return {
            "temperature": 1.0,
            "rejection_threshold": 0.0,
            "keep": 1.0,
            "fitted_on": "nothing",
        }, logistic_out_of_fold
    logits, labels, fitted_on = held_out
    setting, kept = cfg.calibrate.temperature, ""
    if setting != "auto":
        temperature = float(setting)
    elif can_fit_temperature(logits, labels):
        temperature = fit_temperature(logits, labels)
    else:
        temperature, kept = 1.0, " (temperature not fitted: all of them answered right, nothing to fit it on)"
    head.temperature.fill_(temperature)
    confidences = (logits / temperature).softmax(dim=1).max(dim=1).values.numpy()
    threshold = rejection_threshold(confidences, cfg.calibrate.keep)
    fitted_on += kept
    log.info(
        "temperature %.3f and rejection threshold %.3f (keeps %.0f %%) from %s",
        temperature,
        threshold,
        100 * cfg.calibrate.keep,
        fitted_on,
    )
    return {
        "temperature": temperature,
        "rejection_threshold": threshold,
        "keep": float(cfg.calibrate.keep),
        "fitted_on": fitted_on,
    }, logistic_out_of_fold
