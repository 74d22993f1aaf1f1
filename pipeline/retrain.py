"""`python -m pipeline.retrain [overrides]`: retraining that is safe to schedule.

Retrains only when the images, the parameters (conf/) or the code changed since
the last run; promotes the new model version (MLflow alias `champion`) only when
it beats the champion on the chosen metric by the configured margin; never runs
twice at once. The exit code tells the scheduler what happened.
"""

import fcntl
import json
import logging
import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import mlflow
from omegaconf import DictConfig

from pipeline.project import tracking
from pipeline.project.config import CONF_DIR, stage_entry

log = logging.getLogger(__name__)

UP_TO_DATE, FAILED, SETTINGS, PROMOTED, KEPT = 0, 1, 2, 10, 11
LOCKED = 75  # EX_TEMPFAIL, "try again later"


@contextmanager
def exclusive_lock(path: Path):
    """Yields whether this process holds the lock. The kernel drops a flock when its
    holder dies, so a crashed run never leaves a lock that blocks the next one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a+") as file:
        try:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        file.truncate(0)
        file.write(f"{os.getpid()}\n")
        file.flush()
        try:
            yield True
        finally:
            fcntl.flock(file, fcntl.LOCK_UN)


class DvcBusy(Exception):
    """Another DVC command (a `dvc repro` started by hand) holds the project's lock."""


def dvc(root: Path, *args: str, capture: bool = True) -> subprocess.CompletedProcess:
    """A DVC command; DvcBusy when another one holds the project's lock."""
    result = subprocess.run(["dvc", *args], cwd=root, capture_output=capture, text=True)
    if result.returncode != 0 and "Unable to acquire lock" in f"{result.stdout}{result.stderr}":
        raise DvcBusy(f"another DVC command is running in {root}")
    return result


def pipeline_is_up_to_date(root: Path) -> bool:
    status = dvc(root, "status", "--json")
    if status.returncode != 0:
        raise RuntimeError(f"dvc status failed: {status.stderr.strip().splitlines()[-1:]}")
    return json.loads(status.stdout or "{}") == {}


def chosen_metric(setting: str, metrics: dict) -> str:
    """'auto': test accuracy when there is a test set, else validation accuracy."""
    if setting == "auto":
        return "test.accuracy" if "test" in metrics else "validation.accuracy"
    return setting


def metric_value(metrics: dict, dotted: str) -> float:
    value = metrics
    for key in dotted.split("."):
        value = value[key]
    return float(value)


def decide(candidate: float, champion: float | None, margin: float) -> tuple[bool, str]:
    if champion is None:
        return True, f"first model: {candidate:.4f}"
    # A tie keeps the champion: with margin 0, an equal score is no reason to swap the served model.
    if candidate > champion and candidate >= champion + margin:
        return True, f"{candidate:.4f} beats the champion's {champion:.4f} by at least {margin}"
    return False, f"{candidate:.4f} does not beat the champion's {champion:.4f} by {margin}"


def latest_version(client: mlflow.MlflowClient, name: str) -> int:
    """The newest registered version of model `name`; 0 when there is none."""
    return max((int(v.version) for v in client.search_model_versions(f"name='{name}'")), default=0)


def champion_score(
    client: mlflow.MlflowClient, name: str, metric: str, candidate: str
) -> tuple[object | None, float | None]:
    """The champion version and its recorded metric; (None, None) when there is no
    champion other than the candidate (`convert` makes the first version champion),
    and (champion, None) when it has no score to compare with."""
    try:
        champion = client.get_model_version_by_alias(name, tracking.CHAMPION)
    except mlflow.exceptions.MlflowException:
        return None, None
    if champion.version == candidate:
        return None, None
    recorded = champion.tags.get(f"retrain.{metric}")
    if recorded is None:
        log.warning(
            "champion %s version %s has no retrain.%s tag: no comparable champion",
            name,
            champion.version,
            metric,
        )
        return champion, None
    return champion, float(recorded)


def promote_or_keep(cfg: DictConfig, metrics: dict, registered_before: int) -> int:
    """Compare the version this run registered with the champion; record why."""
    client = mlflow.MlflowClient()
    run = client.get_run(tracking.training_run_id(cfg, cfg.paths.checkpoint))
    name, version = cfg.model.name, run.data.tags.get("model_version", "0")
    if int(version) <= registered_before:  # e.g. only `evaluate` reran: the model is the one before
        log.info("no new model version: this run registered none; the champion stays")
        return KEPT
    metric = chosen_metric(cfg.retrain.metric, metrics)
    candidate = metric_value(metrics, metric)
    champion, champion_value = champion_score(client, name, metric, version)
    promote, why = decide(candidate, champion_value, cfg.retrain.margin)
    if champion is not None and champion_value is None:
        untagged = f"version {champion.version} has no retrain.{metric} tag"
        why = f"no comparable champion ({untagged}): {candidate:.4f}"
    client.set_model_version_tag(name, version, f"retrain.{metric}", str(candidate))
    client.set_model_version_tag(
        name, version, "retrain.decision", ("promoted: " if promote else "kept champion: ") + why
    )
    if promote:
        client.set_registered_model_alias(name, tracking.CHAMPION, version)
        log.info("promoted %s version %s to %s: %s %s", name, version, tracking.CHAMPION, metric, why)
        return PROMOTED
    log.info(
        "kept %s version %s as %s; version %s: %s %s",
        name,
        champion.version,
        tracking.CHAMPION,
        version,
        metric,
        why,
    )
    return KEPT


def retrain(cfg: DictConfig) -> int:
    root = CONF_DIR.parent
    with exclusive_lock(Path(cfg.retrain.lock_file)) as held:
        if not held:
            log.warning("locked: another retraining holds %s", cfg.retrain.lock_file)
            return LOCKED
        # conf/ is what a scheduled run trains with (in a process of its own: this
        # one's Hydra is already initialised); it refuses to drop a value params.yaml
        # holds that conf/ does not give (a `dvc exp apply`), and says which
        params = subprocess.run(
            [sys.executable, "-m", "pipeline.params"], cwd=root, capture_output=True, text=True
        )
        if params.returncode != 0:
            log.error("%s", params.stderr.strip().splitlines()[-1].removeprefix("error: "))
            return SETTINGS
        try:
            if pipeline_is_up_to_date(root):
                log.info("up to date: no change in images, parameters or code since the last run")
                return UP_TO_DATE
            tracking.use_store(cfg)
            registered_before = latest_version(mlflow.MlflowClient(), cfg.model.name)
            if dvc(root, "repro", capture=False).returncode != 0:
                log.error("failed: dvc repro did not finish; the champion is unchanged")
                return FAILED
        except DvcBusy as busy:
            log.warning("locked: %s; try again later", busy)
            return LOCKED
        metrics = json.loads(Path(cfg.paths.metrics).read_text(encoding="utf-8"))
        return promote_or_keep(cfg, metrics, registered_before)


def run(cfg: DictConfig) -> None:
    sys.exit(retrain(cfg))


main = stage_entry(run)

if __name__ == "__main__":
    main()
