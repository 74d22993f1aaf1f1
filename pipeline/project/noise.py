"""What the libraries print that says nothing about this project's model, quieted
where it comes from, once, for every door (docs/pipeline.md). Each line below
read to a user as "the model may be broken"; every other warning still shows.

Set when the `pipeline.project` package is first imported, before the libraries
are (the stages import them after the settings are checked), so that MLflow, which
sets its loggers up as it is imported, reads its level here.
"""

import logging
import os
import re
import warnings

# coremltools on Linux: its native part, which runs Core ML models, exists only on
# macOS (one "Failed to load ..." per proxy class, eight of them); its tested
# version ceilings lag the releases of torch and scikit-learn, whose parts it uses
# here (graph conversion) work. The `convert` stage says in one line of its own
# what Linux cannot do (pipeline/model/model_files.py).
COREMLTOOLS_NOISE = re.compile(
    r"Failed to load _ML\w+Proxy"
    r"|version \S+ has not been tested with coremltools"
    r"|scikit-learn version \S+ is not supported"
)

# (message start, category): Lightning calling a torch class that torch deprecated,
# and MLflow asking for an input example where the model's signature is stated
# (pipeline/model/serving.py says why).
WARNINGS = (
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning),
    (r".*An input example was not provided when logging the model", UserWarning),
)

# Lightning's INFO lines (hardware found, tips for its cloud services, why `fit`
# stopped): `train` says in its own line what it trained and for how many epochs.
LIGHTNING_LOGGERS = ("pytorch_lightning.utilities.rank_zero", "lightning_fabric.utilities.rank_zero")


class Drop(logging.Filter):
    """Drops a logger's records below `level`, or whose message matches `pattern`."""

    def __init__(self, level: int = logging.NOTSET, pattern: re.Pattern | None = None):
        super().__init__()
        self.level, self.pattern = level, pattern

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < self.level:
            return False
        return self.pattern is None or not self.pattern.search(record.getMessage())


def quiet_known_noise() -> None:
    # A user's own settings of these variables win.
    level = os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # "Creating initial database tables..."
    logging.getLogger("mlflow").setLevel(level)  # where MLflow was imported first
    # other libraries' progress bars (coremltools' passes, MLflow's downloads), each
    # under a second, between the log lines; ours say so explicitly (show_progress)
    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    logging.getLogger("coremltools").addFilter(Drop(pattern=COREMLTOOLS_NOISE))
    for name in LIGHTNING_LOGGERS:
        logging.getLogger(name).addFilter(Drop(level=logging.WARNING))
    for message, category in WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
