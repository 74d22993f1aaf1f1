"""Images, the DVC remote and MLflow's artifacts on S3 (docs/scaling-out.md), against
a real S3 endpoint: moto's server on 127.0.0.1, started and stopped by each test,
every command bounded in time."""

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, fresh_clone, make_dataset, project_env

from pipeline.data import storage
from pipeline.data.images import load_rgb
from pipeline.data.manifest import load_manifest
from pipeline.data.split_file import load_split
from pipeline.features.table import load_table
from pipeline.project.config import compose_config
from pipeline.project.settings import problems

boto3 = pytest.importorskip("boto3")
moto_server = pytest.importorskip("moto.server")

BUCKET = "pipeline-test"
COMMAND_SECONDS = 900  # any one command; a hung server fails the test instead of the run


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def listening_sockets(port: int) -> list[str]:
    """The lines of `ss -ltnp` for the sockets listening on `port`."""
    lines = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, timeout=30, check=True).stdout
    return [
        line for line in lines.splitlines() if len(line.split()) > 3 and line.split()[3].endswith(f":{port}")
    ]


def assert_loopback_only(port: int) -> None:
    if not shutil.which("ss"):
        pytest.skip("no `ss` to check the listening addresses with")
    sockets = listening_sockets(port)
    print("\n".join(sockets))  # shown with pytest -s
    addresses = [line.split()[3].rsplit(":", 1)[0] for line in sockets]
    assert addresses and set(addresses) == {"127.0.0.1"}, addresses


@dataclass
class Store:
    endpoint: str
    port: int
    client: object  # boto3's S3 client
    env: dict[str, str]  # what a shell pointed at the store has: the standard AWS variables

    def upload(self, folder: Path, prefix: str) -> str:
        """Every file under `folder` to s3://BUCKET/prefix/..., keeping the layout."""
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                self.client.upload_file(str(path), BUCKET, f"{prefix}/{path.relative_to(folder).as_posix()}")
        return f"s3://{BUCKET}/{prefix}"

    def keys(self, prefix: str = "") -> list[str]:
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
        return [item["Key"] for page in pages for item in page.get("Contents", [])]


def aws_env(endpoint: str, home: Path) -> dict[str, str]:
    """Credentials and endpoint from the standard variables only; no profile or
    config file of the machine's own can point the test elsewhere."""
    return {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": endpoint,
        "MLFLOW_S3_ENDPOINT_URL": endpoint,
        "AWS_CONFIG_FILE": str(home / "config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(home / "credentials"),
        "AWS_EC2_METADATA_DISABLED": "true",
    }


@pytest.fixture
def s3_store(tmp_path, monkeypatch):
    """moto's S3 server on a free loopback port with an empty bucket, for this test only."""
    port = free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    env = aws_env(endpoint, tmp_path / "aws")
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    storage.s3.cache_clear()  # a file system for this endpoint
    try:
        client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
        client.create_bucket(Bucket=BUCKET)
        yield Store(endpoint, port, client, env)
    finally:
        server.stop()
        storage.s3.cache_clear()


def run_with(store: Store, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """A command as a user's shell pointed at the store runs it, bounded in time."""
    env = {k: v for k, v in project_env().items() if k != "AWS_PROFILE"} | store.env
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=COMMAND_SECONDS)
    assert result.returncode == 0, f"{' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
    return result


def stage(name: str, *overrides: str) -> list[str]:
    return [sys.executable, "-m", f"pipeline.{name}", *overrides]


# -- quick: the storage helpers and settings ------------------------------------------


def test_s3_images_read_list_and_manifest_like_local_ones(s3_store, tmp_path):
    make_dataset(tmp_path / "train", per_label=3, labels=("red", "green"), size=64)
    (tmp_path / "train/red/.DS_Store").write_bytes(b"junk")
    (tmp_path / "train/red/notes.txt").write_text("not an image")
    (tmp_path / "train/loose.png").write_bytes((tmp_path / "train/red/red_0.png").read_bytes())
    folder = s3_store.upload(tmp_path / "train", "photos/train")
    assert_loopback_only(s3_store.port)

    local = tmp_path / "train/red/red_0.png"
    assert np.array_equal(np.asarray(load_rgb(f"{folder}/red/red_0.png")), np.asarray(load_rgb(local)))
    assert storage.is_folder(folder) and not storage.is_folder(f"s3://{BUCKET}/nothing")
    assert storage.label_folder_names(folder) == ["green", "red"]

    manifest = tmp_path / "manifests/train.parquet"
    first = run_with(s3_store, stage("manifest", folder, str(manifest)), REPO)
    assert "6 images, 3 skipped; 7 files read" in first.stdout
    rows = load_manifest(manifest).rows
    assert {row["path"] for row in rows} == {
        f"{folder}/{c}/{c}_{i}.png" for c in ("red", "green") for i in range(3)
    }
    by_name = {Path(row["path"]).name: row["sha256"] for row in rows}
    assert by_name["red_0.png"] == storage_sha256(local)  # the content's hash, as for a local file
    reasons = {Path(s.path).name: s.reason for s in load_manifest(manifest).skipped}
    assert reasons == {
        ".DS_Store": "hidden file",
        "loose.png": "not inside a label folder",
        # named by its path, as a local file is: the reason is the same on every run
        "notes.txt": f"not a readable image (UnidentifiedImageError: cannot identify image file "
        f"'{folder}/red/notes.txt')",
    }
    again = run_with(s3_store, stage("manifest", folder, str(manifest)), REPO)
    assert "1 files read, 8 unchanged" in again.stdout  # size and date from the listing; notes.txt again


def storage_sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_missing_s3_folder_stops_split_with_one_line(s3_store, tmp_path):
    args = stage("split", f"data.train_dir=s3://{BUCKET}/nowhere", "data.test_dir=null")
    args += [f"paths.{key}={tmp_path / value}" for key, value in compose_config().paths.items()]
    env = project_env() | s3_store.env
    result = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=COMMAND_SECONDS)
    assert result.returncode == 2
    output = result.stdout + result.stderr
    assert f"training folder not found: s3://{BUCKET}/nowhere" in output
    assert "Traceback" not in output


def test_storage_settings_are_checked():
    assert problems(compose_config()) == []
    assert compose_config().mlflow.tracking_uri == "sqlite:///mlflow.db"  # storage=local: as before
    cloud = compose_config("storage=s3", "storage.bucket=my-photos")
    assert problems(cloud) == []
    assert cloud.storage.dvc_remote == "s3://my-photos/dvcstore"
    assert cloud.mlflow.tracking_uri == "http://127.0.0.1:5000"
    assert problems(compose_config("storage=s3")) == [
        "storage.bucket = None: expected an S3 bucket name with storage=s3"
    ]
    assert problems(compose_config("storage=s3", "storage.bucket=My_Bucket")) == [
        "storage.bucket = 'My_Bucket': expected an S3 bucket name"
    ]
    assert problems(compose_config("storage=local", "storage.type=gcs")) == [
        "storage.type = 'gcs': expected one of local, s3"
    ]


# -- slow: the pipeline's own doors against the store -----------------------------------


@pytest.mark.slow
def test_the_pipeline_reads_its_images_from_s3(s3_store, tmp_path):
    """dvc repro up to extract twice: the demo folders on disk, the same files in a
    bucket. The same split per label, the same features."""
    train = s3_store.upload(REPO / "data/demo/train", "demo/train")
    test = s3_store.upload(REPO / "data/demo/test", "demo/test")
    local, cloud = fresh_clone(tmp_path / "local"), fresh_clone(tmp_path / "cloud")
    run_with(s3_store, stage("params", f"data.train_dir={train}", f"data.test_dir={test}"), cloud)
    for project in (local, cloud):
        run_with(s3_store, ["dvc", "repro", "extract"], project)
    assert_loopback_only(s3_store.port)

    splits = [load_split(p / "artifacts/split.json", p / "artifacts/split.parquet") for p in (local, cloud)]
    assert per_label(splits[1]) == per_label(splits[0])
    assert all(row["path"].startswith(f"s3://{BUCKET}/demo/") for row in splits[1]["images"])
    assert (
        json.loads((cloud / "reports/data_report.json").read_text())["images"]
        == json.loads((local / "reports/data_report.json").read_text())["images"]
    )
    features = [features_by_image(p / "artifacts/features") for p in (local, cloud)]
    assert features[1].keys() == features[0].keys()
    for key, vector in features[0].items():
        np.testing.assert_allclose(features[1][key], vector, atol=1e-4)


def per_label(split) -> dict[tuple[str, str], int]:
    counts = {}
    for row in split["images"]:
        counts[row["split"], row["label"]] = counts.get((row["split"], row["label"]), 0) + 1
    return counts


def features_by_image(path: Path) -> dict[tuple[str, str], np.ndarray]:
    """(content hash, copy) -> vector: the same image matches whatever its path."""
    table = load_table(path)
    vectors = np.asarray(table["features"])
    return {
        (sha, copy): vectors[i]
        for i, (sha, copy) in enumerate(zip(table["sha256"], table["copy"], strict=True))
    }


@pytest.mark.slow
def test_dvc_push_and_pull_through_an_s3_remote(s3_store, tmp_path):
    """The DVC remote that storage=s3 names, on the store: what `dvc push` sends,
    `dvc pull` brings back byte for byte into a project without outputs or cache."""
    project = fresh_clone(tmp_path / "project")
    small_demo(project)
    run_with(s3_store, ["dvc", "repro", "extract"], project)
    run_with(s3_store, stage("storage", "storage=s3", f"storage.bucket={BUCKET}"), project)
    run_with(s3_store, ["dvc", "remote", "modify", "storage", "endpointurl", s3_store.endpoint], project)
    remote = run_with(s3_store, ["dvc", "remote", "list"], project).stdout
    assert f"s3://{BUCKET}/dvcstore" in remote
    outputs = ["artifacts/split.parquet", "artifacts/features"]
    before = {path: file_bytes(project / path) for path in outputs}
    # the stages run here: dvc.lock from git names the later stages' outputs too
    run_with(s3_store, ["dvc", "push", "split", "extract"], project)
    assert_loopback_only(s3_store.port)
    assert any(key.startswith("dvcstore/files/md5/") for key in s3_store.keys("dvcstore/"))

    for path in outputs:
        target = project / path
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    shutil.rmtree(project / ".dvc/cache")
    run_with(s3_store, ["dvc", "pull", "split", "extract"], project)
    assert {path: file_bytes(project / path) for path in outputs} == before


def small_demo(project: Path) -> None:
    """A few generated images as the project's data: DVC's part is the point here,
    not the extraction of the whole demo."""
    make_dataset(project / "photos/train", per_label=8, labels=("red", "green"), size=64)
    make_dataset(project / "photos/test", per_label=2, labels=("red", "green"), start=8, size=64)
    subprocess.run(
        stage("params", "data.train_dir=photos/train", "data.test_dir=photos/test"),
        cwd=project,
        env=project_env(),
        check=True,
        capture_output=True,
        timeout=COMMAND_SECONDS,
    )


def file_bytes(path: Path) -> dict[str, bytes]:
    """Every file under `path` (or `path` itself) by its path below it."""
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return {str(p.relative_to(path)): p.read_bytes() for p in files}


@pytest.fixture
def mlflow_server(s3_store, tmp_path):
    """An MLflow tracking server on a free loopback port that keeps its artifacts in
    the bucket (proxied: clients send them over HTTP, only the server talks to S3)."""
    port = free_port()
    env = {k: v for k, v in project_env().items() if k != "AWS_PROFILE"} | s3_store.env
    command = ["mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    command += ["--backend-store-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"]
    command += ["--artifacts-destination", f"s3://{BUCKET}/mlartifacts"]
    with open(tmp_path / "mlflow-server.log", "w") as log:
        # a session of its own: its workers go with it in teardown
        server = subprocess.Popen(
            command, cwd=tmp_path, env=env, stdout=log, stderr=log, start_new_session=True
        )
        try:
            wait_until_up(f"http://127.0.0.1:{port}/health", server, seconds=120)
            yield port
        finally:
            stop(server)


def stop(server: subprocess.Popen) -> None:
    """The server, politely first, then whatever is left of its process group."""
    try:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
    except ProcessLookupError:
        return
    except subprocess.TimeoutExpired:
        pass
    with contextlib.suppress(ProcessLookupError):
        os.killpg(server.pid, signal.SIGKILL)
    server.wait(timeout=30)


def wait_until_up(url: str, server: subprocess.Popen, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while True:
        try:
            urllib.request.urlopen(url, timeout=5)
            return
        except OSError:
            assert time.monotonic() < deadline and server.poll() is None, "mlflow server did not start"
            time.sleep(1)


@pytest.mark.slow
def test_mlflow_artifacts_land_in_the_bucket(s3_store, mlflow_server, tmp_path):
    """train and evaluate against a tracking server: the run's artifacts are objects
    in the bucket, not files on this machine."""
    make_dataset(tmp_path / "train", per_label=8, labels=("red", "green"), size=64)
    make_dataset(tmp_path / "test", per_label=2, labels=("red", "green"), start=8, size=64)
    overrides = [f"data.train_dir={tmp_path / 'train'}", f"data.test_dir={tmp_path / 'test'}"]
    overrides += [f"paths.{key}={tmp_path / 'out' / value}" for key, value in compose_config().paths.items()]
    overrides += [
        f"hydra.run.dir={tmp_path / 'out'}",  # the stages' run folder too, not in the repository
        "storage=s3",
        f"storage.bucket={BUCKET}",
        f"storage.mlflow_tracking_uri=http://127.0.0.1:{mlflow_server}",
    ]
    for name in ("split", "extract", "train", "evaluate"):
        run_with(s3_store, stage(name, *overrides), REPO)
    assert_loopback_only(mlflow_server)
    assert_loopback_only(s3_store.port)

    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"http://127.0.0.1:{mlflow_server}")
    experiment = client.get_experiment_by_name("image-classifier")
    (latest,) = client.search_runs([experiment.experiment_id])
    logged = {artifact.path for artifact in client.list_artifacts(latest.info.run_id)}
    assert {"config.yaml", "metrics.json"} <= logged
    prefix = f"mlartifacts/{experiment.experiment_id}/{latest.info.run_id}/artifacts/"
    in_bucket = {key.removeprefix(prefix) for key in s3_store.keys(prefix)}
    assert {"config.yaml", "metrics.json"} <= in_bucket
    assert not (tmp_path / "mlartifacts").exists() and not (REPO / "mlartifacts").exists()
