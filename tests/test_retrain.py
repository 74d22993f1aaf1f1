"""Scheduled retraining: does nothing when nothing changed, promotes only better
models, never runs twice at once (docs/retraining.md)."""

import json
import os
import random
import re
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
from conftest import REPO, copy_project, project_env, run
from PIL import Image, ImageOps

from pipeline.retrain import decide

pytestmark = pytest.mark.slow
RETRAIN = [sys.executable, "-m", "pipeline.retrain"]


@pytest.fixture
def project(demo_project, tmp_path):
    """The demo project after `dvc repro`, a copy of its own for each test."""
    return copy_project(demo_project, tmp_path / "project")


def retrain(project) -> subprocess.CompletedProcess:
    return run(RETRAIN, project, check=False)


def registry(project):
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("image-classifier").experiment_id])
    versions = client.search_model_versions("name='ImageClassifier'")
    return client, len(runs), {int(v.version) for v in versions}


def champion(client) -> int:
    return int(client.get_model_version_by_alias("ImageClassifier", "champion").version)


def promote_current_version(project) -> None:
    """What a retraining that promoted the project's current model leaves behind."""
    client, _, versions = registry(project)
    (version,) = versions
    accuracy = json.loads((project / "reports/metrics.json").read_text())["test"]["accuracy"]
    client.set_model_version_tag("ImageClassifier", str(version), "retrain.test.accuracy", str(accuracy))
    client.set_registered_model_alias("ImageClassifier", "champion", str(version))


def test_unchanged_data_is_up_to_date_despite_a_stale_lock(project):
    (project / ".retrain.lock").write_text("999999\n")  # left by a run that crashed
    _, runs_before, _ = registry(project)
    result = retrain(project)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "up to date" in result.stdout
    assert registry(project)[1] == runs_before


def test_new_images_make_a_new_promoted_version(project):
    for label in ("flag", "fruit", "mammal", "vehicle"):
        for source in sorted((project / "data/demo/train" / label).glob("*.jpg"))[:2]:
            ImageOps.mirror(Image.open(source)).save(source.with_name(f"mirrored_{source.name}"))
    _, runs_before, versions_before = registry(project)
    result = retrain(project)
    assert result.returncode == 10, result.stdout + result.stderr
    client, runs_after, versions_after = registry(project)
    assert runs_after == runs_before + 1
    (new,) = versions_after - versions_before
    assert champion(client) == new
    assert (
        client.get_model_version("ImageClassifier", str(new)).tags["retrain.decision"].startswith("promoted")
    )


def test_worse_candidate_is_registered_but_not_promoted(project):
    promote_current_version(project)
    images = sorted((project / "data/demo/train").rglob("*.jpg"))
    labels = [path.parent for path in images]
    random.Random(0).shuffle(labels)  # the same label counts, the labels now meaningless
    for index, (path, label) in enumerate(zip(images, labels, strict=True)):
        path.rename(label / f"shuffled_{index}.jpg")
    client, _, versions_before = registry(project)
    before = champion(client)
    result = retrain(project)
    assert result.returncode == 11, result.stdout + result.stderr
    client, _, versions_after = registry(project)
    (new,) = versions_after - versions_before
    assert champion(client) == before
    decision = client.get_model_version("ImageClassifier", str(new)).tags["retrain.decision"]
    assert decision.startswith("kept champion")


def test_overlapping_runs_one_runs_one_exits_locked(project):
    config = project / "conf/config.yaml"
    config.write_text(config.read_text().replace("learning_rate: 0.001", "learning_rate: 0.002"))
    first = subprocess.Popen(RETRAIN, cwd=project, env=project_env(), stdout=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    lock = project / ".retrain.lock"
    while not lock.exists() or lock.read_text().strip() != str(first.pid):  # until it holds the lock
        assert time.monotonic() < deadline and first.poll() is None
        time.sleep(0.2)
    second = retrain(project)
    assert second.returncode == 75
    assert "locked" in second.stdout
    assert first.wait(timeout=600) in (10, 11)


def test_documented_cron_line_runs_the_job(project, tmp_path):
    page = (REPO / "docs/retraining.md").read_text()
    (cron_line,) = re.findall(r"^(?:\S+\s+){5}(cd .*pipeline\.retrain.*)$", page, re.MULTILINE)
    home = tmp_path / "home"
    home.mkdir()
    os.symlink(project, home / "image-classifier")
    if not (project / ".venv").exists():
        os.symlink(Path(sys.executable).parent.parent, project / ".venv")  # the clone's own venv
    env = {"HOME": str(home), "PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}  # what cron gives
    result = subprocess.run(["/bin/sh", "-c", cron_line], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr  # nothing changed since the last test
    assert "up to date" in (project / "retrain.log").read_text()


def test_a_tie_keeps_the_champion_even_with_no_margin():
    promote, why = decide(0.95, 0.95, 0.0)
    assert not promote, why
    assert decide(0.96, 0.95, 0.0)[0]
    assert not decide(0.955, 0.95, 0.01)[0]
