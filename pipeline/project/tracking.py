"""MLflow: one run per trained model, which evaluate and convert add to
(README "Experiments and comparing runs")."""

import os
import subprocess
from contextlib import contextmanager

import mlflow
from omegaconf import DictConfig, OmegaConf


def use_store(cfg: DictConfig) -> None:
    """The local SQLite store by default; MLFLOW_TRACKING_URI, when set, wins."""
    mlflow.set_tracking_uri(os.environ.get("MLFLOW_TRACKING_URI") or cfg.mlflow.tracking_uri)
    mlflow.set_experiment(cfg.mlflow.experiment)


def git_commit() -> str:
    result = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=False)
    return result.stdout.strip() if result.returncode == 0 else "unknown"


def flat_params(cfg: DictConfig) -> dict[str, str]:
    """Comparable parameter keys for `mlflow ui`: extractor, head, train and split."""
    resolved = OmegaConf.to_container(cfg, resolve=True)
    params = {}

    def walk(prefix: str, node) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(f"{prefix}.{key}" if prefix else key, value)
        else:
            params[prefix] = str(node)

    for section in ("extractor", "extract", "augment", "head", "train", "split", "data"):
        walk(section, resolved[section])
    return params


def start_run(cfg: DictConfig, data_fingerprint: str) -> str:
    use_store(cfg)
    name = f"{cfg.extractor.name}-{cfg.head.type}-{cfg.extract.crop_and_scale}"
    with mlflow.start_run(run_name=name) as run:
        mlflow.log_params(flat_params(cfg))
        mlflow.log_dict(OmegaConf.to_container(cfg, resolve=True), "config.yaml")
        mlflow.set_tags(
            {
                "mlflow.source.git.commit": git_commit(),
                "data_fingerprint": data_fingerprint,
                "extractor": cfg.extractor.name,
            }
        )
        return run.info.run_id


@contextmanager
def resumed_run(cfg: DictConfig, run_id: str):
    """Continue the training run (evaluate and convert belong to the model it made)."""
    use_store(cfg)
    with mlflow.start_run(run_id=run_id) as run:
        yield run
