"""The trained head's file, `models/head.ckpt`: its typed schema, save and load.

Readers (evaluate, convert, predict, retrain, the Python API) get the head and
everything needed to use it without importing Lightning or MLflow.

The same data and settings make the same bytes, so a fresh clone's `dvc repro`
reproduces dvc.lock exactly: no time, MLflow run id or file name is inside (the
run that made a checkpoint is found by its hash, pipeline/project/tracking.py).
"""

from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from pipeline.data.images import DataError
from pipeline.model.head import ClassifierHead
from pipeline.project.files import write_atomically


@dataclass
class Checkpoint:
    labels: list[str]
    in_features: int
    head: dict  # type, hidden_sizes, dropout
    extractor: dict  # the feature cache's description: name, fingerprint, input_size, crop_and_scale, ...
    input_size: int
    data_fingerprint: str
    regularization: float  # the L2 strength the head was trained with (chosen by cross-validation or set)
    calibration: dict  # temperature, rejection_threshold, keep, fitted_on (pipeline/model/calibration.py)
    state_dict: dict = field(repr=False)
    # The logistic head's out-of-fold logits (HeldOut.saved in pipeline/model/calibration.py),
    # which evaluate's audit reuses; None for an MLP or a checkpoint written before them.
    held_out: dict | None = field(default=None, repr=False)

    @property
    def crop_and_scale(self) -> str:
        """Vision's imageCropAndScaleOption the features were made with."""
        return self.extractor["crop_and_scale"]

    @property
    def rejection_threshold(self) -> float:
        """Below this calibrated confidence the answer is "unknown" (0: never)."""
        return self.calibration["rejection_threshold"]

    def build_head(self) -> ClassifierHead:
        head = ClassifierHead(
            self.in_features, len(self.labels), self.head["hidden_sizes"], self.head["dropout"]
        )
        head.load_state_dict(self.state_dict)
        return head.eval()


def save_checkpoint(path: str | Path, checkpoint: Checkpoint) -> None:
    def write(temporary: Path) -> None:
        # to an open file, not a path: torch names the zip's folder after the file,
        # and the temporary file's name holds the process id
        with temporary.open("wb") as file:
            torch.save(asdict(checkpoint), file)

    write_atomically(path, write)


def load_checkpoint(path: str | Path) -> tuple[ClassifierHead, Checkpoint]:
    """The head and its description; a DataError naming the file when it is missing,
    damaged or not a checkpoint of this pipeline."""
    try:
        checkpoint = Checkpoint(**torch.load(path, map_location="cpu", weights_only=True))
        return checkpoint.build_head(), checkpoint
    except FileNotFoundError:
        raise DataError(f"{path} not found: run the train stage first (dvc repro)") from None
    except Exception as error:  # torch, pickle and zipfile raise many types for a damaged file
        reason = type(error).__name__ + (f": {str(error).splitlines()[0][:120]}" if str(error) else "")
        raise DataError(f"{path} is damaged ({reason}): delete it and run dvc repro") from None
