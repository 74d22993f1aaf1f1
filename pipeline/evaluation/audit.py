"""The data audit (docs/trust.md): label issues, near-duplicates (within
a label, across labels, across train and test) and outliers, all from the cached
features and out-of-fold probabilities, in seconds.

Near-duplicates and outliers compare every image with every other: past
MAX_COMPARED images (about 20 s on 2 cores), on a sample of them, test images first.

Near-duplicates are judged on the features less the training mean (the head's
standardisation shift, pipeline/evaluation/similarity.py): every clip-art image
shares a large common component that makes raw cosine similarity near 1 for
unrelated pairs. Measured on the demo: distinct images reach 0.90 at most (apart
from one real duplicate at 0.985), copies resized to 75-80 % and re-encoded as JPEG
0.90-0.99; hence the default 0.93.
"""

import logging
from dataclasses import dataclass

import numpy as np
from cleanlab.filter import find_label_issues
from cleanlab.outlier import OutOfDistribution
from cleanlab.rank import get_label_quality_scores
from omegaconf import DictConfig
from sklearn.neighbors import NearestNeighbors

from pipeline.evaluation.similarity import centred_unit
from pipeline.features.table import FeatureTable
from pipeline.model.calibration import HeldOut, out_of_fold
from pipeline.model.checkpoint import Checkpoint
from pipeline.model.head import ClassifierHead

log = logging.getLogger(__name__)

MAX_COMPARED = 20_000
LABEL_ISSUE_COLUMNS = ["path", "split", "given_label", "suggested_label", "label_quality", "flagged"]
DUPLICATE_COLUMNS = [
    "kind",
    "similarity",
    "path",
    "split",
    "label",
    "other_path",
    "other_split",
    "other_label",
]
OUTLIER_COLUMNS = ["path", "split", "label", "typicality"]


def label_issues(table: FeatureTable, rows: np.ndarray, probabilities: np.ndarray, listed: int) -> list[dict]:
    """The images least likely to carry their given label, by their out-of-fold
    probabilities (cleanlab's label quality), lowest first: the `listed` lowest and
    every one cleanlab's confident learning flags as an issue (`flagged`).
    `rows`: the table rows `probabilities` are of."""
    given = table["label_index"][rows]
    quality = get_label_quality_scores(given, probabilities)
    flagged = np.zeros(len(rows), bool)
    flagged[find_label_issues(given, probabilities)] = True
    order = np.argsort(quality, kind="stable")
    names = table["meta"]["labels"]
    return [
        {
            "path": table["path"][rows[i]],
            "split": table["split"][rows[i]],
            "given_label": names[given[i]],
            "suggested_label": names[int(probabilities[i].argmax())],
            "label_quality": round(float(quality[i]), 6),
            "flagged": bool(flagged[i]),
        }
        for rank, i in enumerate(order)
        if rank < listed or flagged[i]
    ]


def compared(rows: np.ndarray, splits: np.ndarray) -> np.ndarray:
    """`rows`, or MAX_COMPARED of them: the test images first (leakage is what makes a
    number lie), then a fixed random sample of the rest."""
    if len(rows) <= MAX_COMPARED:
        return rows
    test, other = rows[splits[rows] == "test"], rows[splits[rows] != "test"]
    room = max(MAX_COMPARED - len(test), 0)
    sample = np.random.default_rng(0).choice(other, min(room, len(other)), replace=False)
    log.warning("near-duplicates and outliers: comparing %d of %d images", MAX_COMPARED, len(rows))
    return np.sort(np.concatenate([test[:MAX_COMPARED], sample]))


def pair_kind(split: str, other_split: str, label: str, other_label: str) -> str:
    if (split == "test") != (other_split == "test"):
        return "leakage"  # the test score is measured on an image the model trained on
    return "duplicate" if label == other_label else "conflict"


def near_duplicates(table: FeatureTable, shift: np.ndarray, similarity: float) -> list[dict]:
    """Pairs of different files (by content) whose features are at least `similarity`
    alike: leakage between train and test first, then conflicting labels, then duplicates."""
    originals = compared(np.flatnonzero(table["copy"] == ""), table["split"])
    vectors = centred_unit(table["features"][originals], shift)
    search = NearestNeighbors(radius=1 - similarity, metric="cosine").fit(vectors)
    distances, neighbours = search.radius_neighbors(vectors, sort_results=True)
    names = table["meta"]["labels"]
    pairs = []
    for i, (near, distance) in enumerate(zip(neighbours, distances, strict=True)):
        for j, d in zip(near, distance, strict=True):
            a, b = originals[i], originals[j]
            if j <= i or table["sha256"][a] == table["sha256"][b]:
                continue  # each pair once; identical files are the split's own warning
            if table["split"][a] == "test":
                a, b = b, a  # the training image first
            label, other = names[table["label_index"][a]], names[table["label_index"][b]]
            pairs.append(
                {
                    "kind": pair_kind(table["split"][a], table["split"][b], label, other),
                    "similarity": round(1 - float(d), 4),
                    "path": table["path"][a],
                    "split": table["split"][a],
                    "label": label,
                    "other_path": table["path"][b],
                    "other_split": table["split"][b],
                    "other_label": other,
                }
            )
    order = {"leakage": 0, "conflict": 1, "duplicate": 2}
    return sorted(pairs, key=lambda p: (order[p["kind"]], -p["similarity"]))


def outliers(table: FeatureTable, shift: np.ndarray, count: int) -> list[dict]:
    """The `count` training and validation images least like the others (cleanlab's
    nearest-neighbour typicality: 1 typical, towards 0 unlike any other image)."""
    rows = compared(np.flatnonzero((table["copy"] == "") & (table["split"] != "test")), table["split"])
    neighbours = min(10, len(rows) - 1)
    if neighbours < 1 or count == 0:
        return []
    detector = OutOfDistribution({"k": neighbours})
    typicality = detector.fit_score(features=centred_unit(table["features"][rows], shift), verbose=False)
    names = table["meta"]["labels"]
    return [
        {
            "path": table["path"][rows[i]],
            "split": table["split"][rows[i]],
            "label": names[table["label_index"][rows[i]]],
            "typicality": round(float(typicality[i]), 6),
        }
        for i in np.argsort(typicality, kind="stable")[:count]
    ]


@dataclass
class Findings:
    label_issues: list[dict]
    near_duplicates: list[dict]
    outliers: list[dict]

    def flagged(self) -> list[dict]:
        """The label issues cleanlab is confident of."""
        return [row for row in self.label_issues if row["flagged"]]

    def counts(self) -> dict[str, int]:
        """For MLflow: how many of each finding."""
        kinds = [p["kind"] for p in self.near_duplicates]
        return {
            "audit_label_issues": len(self.flagged()),
            **{f"audit_{kind}": kinds.count(kind) for kind in ("leakage", "conflict", "duplicate")},
        }

    def warnings(self) -> list[str]:
        """What the log and the report's top say: the findings that make a number lie."""
        kinds = [p["kind"] for p in self.near_duplicates]
        said = []
        if kinds.count("leakage"):
            said.append(
                f"{kinds.count('leakage')} test images have a near-duplicate among the training images "
                "(leakage): the test accuracy is optimistic (reports/near_duplicates.csv)"
            )
        if kinds.count("conflict"):
            said.append(
                f"{kinds.count('conflict')} near-duplicate pairs carry different labels "
                "(reports/near_duplicates.csv)"
            )
        if self.flagged():
            said.append(f"{len(self.flagged())} images may be mislabelled (reports/label_issues.csv)")
        return said


def audit(cfg: DictConfig, table: FeatureTable, head: ClassifierHead, checkpoint: Checkpoint) -> Findings:
    """The whole audit of a feature table (with its augmented copies) and the head trained on it."""
    shift = head.shift.numpy()
    held_out = HeldOut.reused(checkpoint.held_out, cfg, table)
    if held_out is None:
        held_out = out_of_fold(cfg, table, head, checkpoint.regularization)
    issues = []
    if held_out is not None:
        temperature = checkpoint.calibration["temperature"]
        probabilities = (held_out.logits / temperature).softmax(dim=1).numpy()
        issues = label_issues(table, held_out.rows, probabilities, cfg.audit.label_issues_listed)
    return Findings(
        label_issues=issues,
        near_duplicates=near_duplicates(table, shift, cfg.audit.near_duplicate_similarity),
        outliers=outliers(table, shift, cfg.audit.outliers),
    )
