"""MLflow: one run per trained model, which evaluate and convert add to
(docs/comparing-runs.md).

A run is open while a stage works in it, so a stage that fails leaves it FAILED
(MLflow's own context manager), and one that was killed leaves it RUNNING with the
process id of its stage, which the next stage that starts marks KILLED: no broken
run is ever shown FINISHED.
"""

import hashlib
import logging
import os
import socket
import subprocess
from contextlib import contextmanager
from pathlib import Path

import mlflow
import psutil
from omegaconf import DictConfig, OmegaConf

from pipeline.data.images import DataError, SettingError
from pipeline.project.params_file import leaves

log = logging.getLogger(__name__)

# MLflow retries an unreachable server 7 times with backoff (4.6 minutes here before a
# traceback); a stage should say in seconds that the server does not answer. The
# user's own settings of these variables win.
HTTP_PATIENCE = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "5",
}


def store_uri(cfg: DictConfig) -> tuple[str, str]:
    """The store's URI, and the setting that chose it: the local SQLite store by
    default; MLFLOW_TRACKING_URI, when set, wins. Its HTTP patience set too."""
    for name, value in HTTP_PATIENCE.items():
        os.environ.setdefault(name, value)
    # which setting chose the store, asked before MLflow, which may set the variable itself
    where = "MLFLOW_TRACKING_URI" if os.environ.get("MLFLOW_TRACKING_URI") else "mlflow.tracking_uri"
    return os.environ.get("MLFLOW_TRACKING_URI") or cfg.mlflow.tracking_uri, where


def use_store(cfg: DictConfig) -> None:
    """The store (`store_uri`) and its experiment, made if new, for the runs of this process.
    SettingError naming the store when it does not answer or is damaged."""
    uri, where = store_uri(cfg)
    mlflow.set_tracking_uri(uri)
    try:
        mlflow.set_experiment(cfg.mlflow.experiment)
    except Exception as error:  # requests, SQLAlchemy and MLflow raise many types for a broken store
        reason = str(error).splitlines()[0][:200]
        raise SettingError(f"the MLflow store {uri} ({where}) cannot be used: {reason}") from None


# The alias `mlflow models serve -m models:/<name>@champion` serves; retrain moves it.
CHAMPION = "champion"


def crown_first_version(name: str, version: str) -> None:
    """A model with no champion yet gets this version as its champion, so the first
    `dvc repro` leaves one to serve (docs/preview-and-serving.md); from then on only
    `python -m pipeline.retrain` moves it, to a version that beats it."""
    client = mlflow.MlflowClient()
    if CHAMPION not in client.get_registered_model(name).aliases:
        client.set_registered_model_alias(name, CHAMPION, version)
        log.info("%s version %s is the first: it is the %s that serving uses", name, version, CHAMPION)


def git_commit() -> str:
    result = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=False)
    return result.stdout.strip() if result.returncode == 0 else "unknown"


def flat_params(cfg: DictConfig) -> dict[str, str]:
    """Comparable parameter keys for `mlflow ui`: extractor, head, train and split."""
    resolved = OmegaConf.to_container(cfg, resolve=True)
    sections = ("extractor", "extract", "augment", "head", "train", "split", "data")
    return {
        key: str(value) for section in sections for key, value in leaves(resolved[section], section).items()
    }


def process_alive(pid: int) -> bool:
    """A killed stage whose parent (DVC) was killed too may stay a zombie for good
    where the init process does not reap orphans (some containers): that is gone."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:  # someone else's process: alive
        return True


# Per-image files grow with the data (predictions.csv is about 87 MB at a million
# images); every run would store another copy. DVC keeps them; MLflow gets the
# metrics and the files up to this size.
MAX_LOGGED_BYTES = 10 * 2**20


def log_capped_artifact(path: str) -> None:
    size = Path(path).stat().st_size
    if size <= MAX_LOGGED_BYTES:
        mlflow.log_artifact(path)
    else:
        log.info("not logged to MLflow: %s (%.0f MB; DVC tracks it)", path, size / 2**20)


def mark_killed_runs(experiment_id: str) -> None:
    """Runs left RUNNING by a stage process on this machine that is gone: KILLED."""
    client = mlflow.MlflowClient()
    for run in client.search_runs([experiment_id], "attributes.status = 'RUNNING'"):
        tags = run.data.tags
        if tags.get("pipeline.host") == socket.gethostname() and not process_alive(int(tags["pipeline.pid"])):
            client.set_terminated(run.info.run_id, "KILLED")


def this_process() -> dict[str, str]:
    """Tags that say this process works in a run now: whoever finds the run RUNNING
    and this process gone knows the stage was killed."""
    return {"pipeline.host": socket.gethostname(), "pipeline.pid": str(os.getpid())}


@contextmanager
def new_run(cfg: DictConfig, data_fingerprint: str):
    """A run for the model `train` is about to make; yields its id."""
    use_store(cfg)
    mark_killed_runs(mlflow.get_experiment_by_name(cfg.mlflow.experiment).experiment_id)
    name = f"{cfg.extractor.name}-{cfg.head.type}-{cfg.extract.crop_and_scale}"
    # tagged as it is created: a kill between creating and tagging would leave it unowned
    with mlflow.start_run(run_name=name, tags=this_process()) as run:
        mlflow.log_params(flat_params(cfg))
        mlflow.log_dict(OmegaConf.to_container(cfg, resolve=True), "config.yaml")
        mlflow.set_tags(
            {
                "mlflow.source.git.commit": git_commit(),
                "data_fingerprint": data_fingerprint,
                "extractor": cfg.extractor.name,
            }
        )
        yield run.info.run_id


# The checkpoint holds no run id (its bytes depend on the data and settings alone,
# pipeline/model/checkpoint.py): its training run carries the checkpoint's hash instead.
CHECKPOINT_TAG = "checkpoint_sha256"


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(2**20), b""):
            digest.update(block)
    return digest.hexdigest()


def tag_checkpoint(path: str | Path) -> None:
    """Mark the active run as the one that made the checkpoint at `path`."""
    mlflow.set_tag(CHECKPOINT_TAG, file_sha256(path))


def training_run_id(cfg: DictConfig, checkpoint: str | Path) -> str:
    """The run that made `checkpoint`: the newest tagged with its hash (the same data
    and settings trained twice make the same file, and either run describes it)."""
    use_store(cfg)
    experiment = mlflow.get_experiment_by_name(cfg.mlflow.experiment).experiment_id
    runs = mlflow.MlflowClient().search_runs(
        [experiment],
        f"tags.{CHECKPOINT_TAG} = '{file_sha256(checkpoint)}'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    if not runs:
        raise DataError(
            f"no run in the MLflow store {mlflow.get_tracking_uri()} made {checkpoint}: train it again"
            " (dvc repro -f -s train)"
        )
    return runs[0].info.run_id


@contextmanager
def resumed_run(cfg: DictConfig, checkpoint: str | Path):
    """Continue the run that trained `checkpoint` (evaluate and convert belong to the
    model it made)."""
    run_id = training_run_id(cfg, checkpoint)
    mark_killed_runs(mlflow.get_experiment_by_name(cfg.mlflow.experiment).experiment_id)
    with mlflow.start_run(run_id=run_id) as run:
        mlflow.set_tags(this_process())  # killed before this, it still names a process that is gone
        yield run
