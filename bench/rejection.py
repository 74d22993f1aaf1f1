""" "None of these" on the demo: how many images of categories the model never saw
(data/unseen, clip art of six other openclipart categories) are answered "unknown",
and how many demo test images keep their label, for the default `calibrate.keep`
and two other targets. Run from the project root:

    python bench/rejection.py
    python bench/rejection.py extractor=v1    # Hydra overrides: another print, say

Two scores, each thresholded to keep the target share of held-out (out-of-fold)
training images:
- calibrated confidence: what the exported models and `predict` apply;
- feature-space typicality: the cosine similarity (features less the training mean)
  to the 3rd most similar training image, a nearest-neighbour score (Sun et al.,
  2022) that the models do not carry, printed to show what it would change.
The demo's own split, features and head are trained in bench/.data/rejection/.
"""

import os
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path[0] = str(ROOT)  # the project root instead of bench/
os.environ.pop("MLFLOW_TRACKING_URI", None)
os.environ["CI"] = "1"  # no progress bars

import torch  # noqa: E402

from pipeline import extract, split  # noqa: E402
from pipeline.api import sha256_of  # noqa: E402
from pipeline.data.split_file import SplitRow  # noqa: E402
from pipeline.evaluation.similarity import centred_unit  # noqa: E402
from pipeline.features.extraction import cached_features  # noqa: E402
from pipeline.features.table import load_table, originals  # noqa: E402
from pipeline.model.calibration import calibrate, out_of_fold, rejection_threshold  # noqa: E402
from pipeline.model.training import fit_head  # noqa: E402
from pipeline.project.config import compose_config, output_overrides  # noqa: E402

TARGETS = (0.90, 0.95, 0.99)
NEIGHBOUR = 3


def features_of(cfg, folder: Path) -> np.ndarray:
    rows = [
        (SplitRow(path=str(p), label="", sha256=sha256_of(str(p)), width=0, height=0, split="test"), None)
        for p in sorted(folder.rglob("*.jpg"))
    ]
    features, _, failed, _ = cached_features(cfg, rows)
    assert not failed, failed
    return features


def typicality(
    reference: np.ndarray, queries: np.ndarray, shift: np.ndarray, leave_out_self: bool
) -> np.ndarray:
    similarity = centred_unit(queries, shift) @ centred_unit(reference, shift).T
    if leave_out_self:
        np.fill_diagonal(similarity, -1)
    return np.sort(similarity, axis=1)[:, -NEIGHBOUR]


def main() -> None:
    cfg = compose_config(
        *output_overrides(ROOT / "bench/.data/rejection"),
        "paths.feature_cache=artifacts/feature_cache",
        *sys.argv[1:],
    )
    print(f"extractor {cfg.extractor.name}")
    split.run(cfg)
    extract.run(cfg)
    table = load_table(cfg.paths.features)
    head, strength = fit_head(cfg, table, [])
    calibrate(cfg, table, head, strength)
    temperature = float(head.temperature)
    held_out = out_of_fold(cfg, table, head, strength)
    held_out_confidence = (held_out.logits / temperature).softmax(dim=1).max(dim=1).values.numpy()

    known = originals(table)
    test = known["features"][known["split"] == "test"]
    unseen = features_of(cfg, ROOT / "data/unseen")
    with torch.no_grad():
        confidence = {
            name: head(torch.from_numpy(x)).softmax(dim=1).max(dim=1).values.numpy()
            for name, x in (("test", test), ("unseen", unseen))
        }
    shift = head.shift.numpy()
    training = known["features"][np.isin(known["split"], ("train", "validation"))]
    near = {
        "held_out": typicality(training, training, shift, leave_out_self=True),
        "test": typicality(training, test, shift, False),
        "unseen": typicality(training, unseen, shift, False),
    }
    print(f"demo: {len(test)} test images; data/unseen: {len(unseen)} images of 6 other categories")
    print(f"temperature {temperature:.3f}; default calibrate.keep {cfg.calibrate.keep}")
    print(
        f"{'keep target':>12} | {'confidence: test kept':>22} {'unseen rejected':>16} | "
        f"{'typicality: test kept':>22} {'unseen rejected':>16}"
    )
    for keep in TARGETS:
        by_confidence = rejection_threshold(held_out_confidence, keep)
        by_typicality = rejection_threshold(near["held_out"], keep)
        print(
            f"{keep:>12.2f} | {np.mean(confidence['test'] >= by_confidence):>22.1%} "
            f"{np.mean(confidence['unseen'] < by_confidence):>16.1%} | "
            f"{np.mean(near['test'] >= by_typicality):>22.1%} "
            f"{np.mean(near['unseen'] < by_typicality):>16.1%}"
        )


if __name__ == "__main__":
    main()
