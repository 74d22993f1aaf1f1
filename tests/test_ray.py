"""extract.engine = ray (docs/scaling-out.md) on a real two-node Ray cluster started
on this machine, every port of it on loopback: the same features and metrics as the
local engine, through `dvc repro`, and a node lost mid-extraction costs no feature."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import copy_project, project_env
from ray_cluster import Cluster, free_port, loopback_env, on_loopback, two_node_cluster

from pipeline.data.images import SettingError
from pipeline.features.table import load_table
from pipeline.project.config import compose_config
from pipeline.project.settings import problems

RUN_TIMEOUT_S = 600


def cluster_env() -> dict[str, str]:
    return loopback_env(project_env())


@pytest.fixture
def ray_cluster():
    """A head node and a second node, one CPU each, every port on 127.0.0.1."""
    with two_node_cluster() as cluster:
        print(f"two-node cluster up in {cluster.startup_s:.1f} s")
        listening = cluster.listening()
        assert len(cluster.raylets()) == 2
        assert cluster.address.rsplit(":", 1)[1] in {s.rsplit(":", 1)[1] for s in listening}
        assert [s for s in listening if not on_loopback(s)] == []
        yield cluster


def ray_project(demo_project, tmp_path, cluster: Cluster) -> Path:
    """A copy of the demo project set to extract on `cluster`, its feature cache emptied
    (the exported backbone kept) so that every vector comes from the cluster."""
    project = copy_project(demo_project, tmp_path / "project")
    for database in (project / "artifacts/feature_cache").glob("*/features.sqlite*"):
        database.unlink()
    settings = ["extract.engine=ray", f"extract.ray_address={cluster.address}"]
    run_here([sys.executable, "-m", "pipeline.params", *settings], project)
    return project


def run_here(args: list[str], project: Path, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(
        args, cwd=project, env=cluster_env(), capture_output=True, text=True, timeout=RUN_TIMEOUT_S
    )
    if check:
        assert result.returncode == 0, f"{' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
    return result


def by_entry(project: Path) -> dict[tuple[str, str], np.ndarray]:
    table = load_table(project / "artifacts/features")
    features = np.asarray(table["features"])
    keys = zip(table["sha256"], table["copy"], strict=True)
    return {(sha, copy): features[i] for i, (sha, copy) in enumerate(keys)}


def assert_same_features(project: Path, reference: Path) -> None:
    ours, theirs = by_entry(project), by_entry(reference)
    assert ours.keys() == theirs.keys()
    assert max(float(np.abs(ours[key] - theirs[key]).max()) for key in ours) <= 1e-4


def cached_count(project: Path) -> int:
    import sqlite3

    (database,) = (project / "artifacts/feature_cache").glob("*/features.sqlite")
    with sqlite3.connect(database, timeout=30) as db:
        return db.execute("SELECT count(*) FROM vectors").fetchone()[0]


@pytest.mark.slow
def test_dvc_repro_on_ray_gives_the_local_features_and_metrics(demo_project, tmp_path, ray_cluster):
    project = ray_project(demo_project, tmp_path, ray_cluster)
    # extract, and the stages after it even though its output is byte-for-byte the same
    result = run_here(["dvc", "repro", "--force", "--downstream", "extract"], project)
    output = result.stdout + result.stderr
    assert "connected to the Ray cluster at 127.0.0.1" in output
    assert "Running stage 'evaluate'" in output
    assert_same_features(project, demo_project)
    assert cached_count(project) == len(by_entry(project))  # every vector came from the cluster
    metrics = json.loads((project / "reports/metrics.json").read_text())
    assert metrics == json.loads((demo_project / "reports/metrics.json").read_text())
    # the actors' sockets too, now that the job has run
    assert [s for s in ray_cluster.listening() if not on_loopback(s)] == []


@pytest.mark.slow
def test_a_node_killed_mid_extraction_costs_no_feature(demo_project, tmp_path, ray_cluster):
    project = ray_project(demo_project, tmp_path, ray_cluster)
    total = len(by_entry(demo_project))
    stage = subprocess.Popen(
        [sys.executable, "-m", "pipeline.extract", "--config-name", "dvc_stage"],
        cwd=project,
        env=cluster_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        raylet, deadline = ray_cluster.raylets()[1], time.monotonic() + RUN_TIMEOUT_S
        # mid-extraction: the second node runs an extractor and some vectors are cached, not all
        while not (
            any("BatchExtractor" in " ".join(child.cmdline()) for child in raylet.children())
            and 0 < cached_count_or_zero(project) < total
        ):
            assert stage.poll() is None and time.monotonic() < deadline, "extraction ended before the kill"
            time.sleep(0.2)
        raylet.send_signal(signal.SIGKILL)
        killed_at = cached_count(project)
        output, _ = stage.communicate(timeout=RUN_TIMEOUT_S)
    finally:
        if stage.poll() is None:
            stage.kill()
            stage.wait()
    print(f"second node killed with {killed_at} of {total} vectors cached; stage exit {stage.returncode}")
    if stage.returncode != 0:  # it may stop, with one line saying why, and a rerun finish on the head
        errors = [line for line in output.splitlines() if line.startswith("ERROR")]
        assert len(errors) == 1 and "extract.ray_address" in errors[0], output
        run_here([sys.executable, "-m", "pipeline.extract", "--config-name", "dvc_stage"], project)
    assert_same_features(project, demo_project)
    assert cached_count(project) == total  # whole entries only: each one read back equals the local one


def cached_count_or_zero(project: Path) -> int:
    """The cache's size, 0 before the stage has created it."""
    try:
        return cached_count(project)
    except ValueError:  # no database yet
        return 0


def test_engine_and_address_settings_are_checked():
    cfg = compose_config("extract.engine=spark", "extract.ray_address=5")
    assert problems(cfg) == [
        "extract.engine = 'spark': expected one of local, ray",
        "extract.ray_address = 5: expected null or an address (text)",
    ]
    assert problems(compose_config("extract.engine=ray", "extract.ray_address=10.0.0.1:6379")) == []


def test_ray_engine_without_a_cluster_stops_with_one_line(monkeypatch):
    from pipeline.features.ray_engine import cluster_address, connected

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with pytest.raises(SettingError, match=r"^extract.ray_address = None: .*RAY_ADDRESS"):
        cluster_address(compose_config("extract.engine=ray"))
    started = time.monotonic()
    nothing_there = f"127.0.0.1:{free_port()}"
    with (
        pytest.raises(SettingError, match=r"^extract.ray_address = '127.0.0.1:\d+': no Ray cluster answers"),
        connected(nothing_there),
    ):
        pass
    assert time.monotonic() - started < 15


def test_cluster_jobs_name_local_images_absolutely_and_s3_ones_as_they_are():
    """Actors run in another folder, maybe on another machine: a relative path would
    miss, and an s3:// URI made absolute would become a local path that is nowhere."""
    from pipeline.features.extraction import Job
    from pipeline.features.ray_engine import job_rows

    rows = job_rows([Job("a", "s3://bucket/train/cat/1.jpg", (("a", None),)), Job("b", "data/x.jpg", ())])
    assert rows[0]["path"] == "s3://bucket/train/cat/1.jpg"
    assert rows[1]["path"] == str(Path("data/x.jpg").absolute())
