"""The registered model answers images over HTTP, as `mlflow models serve` gives it
(docs/preview-and-serving.md): the champion's label and confidence are the pipeline's."""

import base64
import contextlib
import csv
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request

import mlflow
import pytest
from conftest import copy_project, project_env

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def listeners(port: int) -> list[str]:
    """Local addresses listening on `port` (`ss` columns: State Recv-Q Send-Q Local Peer)."""
    lines = subprocess.run(["ss", "-ltn"], capture_output=True, text=True, timeout=10).stdout.splitlines()
    rows = [line.split() for line in lines[1:]]
    return [row[3] for row in rows if len(row) > 3 and row[3].endswith(f":{port}")]


def stop_group(server: subprocess.Popen) -> None:
    """End the server and its workers, by force if they linger."""
    os.killpg(server.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        server.wait(timeout=30)
    with contextlib.suppress(ProcessLookupError):  # none left: all ended on SIGTERM
        os.killpg(server.pid, signal.SIGKILL)  # a worker outliving its parent
    server.wait(timeout=30)


def test_the_first_registered_version_is_the_champion(demo_project):
    """The README's first command, then its serving command: the alias must be there."""
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{demo_project / 'mlflow.db'}")
    (version,) = client.search_model_versions("name='ImageClassifier'")  # the one convert registered
    assert client.get_model_version_by_alias("ImageClassifier", "champion").version == version.version


def test_champion_served_over_http_answers_each_image(demo_project, tmp_path):
    project = copy_project(demo_project, tmp_path / "project")
    store = f"sqlite:///{project / 'mlflow.db'}"
    with (project / "reports/predictions.csv").open() as file:
        row = next(row for row in csv.DictReader(file) if row["split"] == "test")
    image = base64.b64encode((project / row["path"]).read_bytes()).decode("ascii")
    not_an_image = base64.b64encode(b"no picture here").decode("ascii")

    port, log = free_port(), tmp_path / "serve.log"
    with log.open("wb") as output:  # the child keeps its own copy of the file
        server = subprocess.Popen(
            ["mlflow", "models", "serve", "-m", "models:/ImageClassifier@champion"]
            + ["--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)],
            cwd=project,
            env={**project_env(), "MLFLOW_TRACKING_URI": store},
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: the uvicorn workers end with it
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(f"{url}/ping", timeout=5):
                    break
            except OSError:
                started = time.monotonic() < deadline and server.poll() is None
                assert started, f"model server did not start:\n{log.read_text(errors='replace')[-3000:]}"
                time.sleep(1)
        request = urllib.request.Request(
            f"{url}/invocations",
            data=json.dumps(
                {"dataframe_split": {"columns": ["image"], "data": [[image], [not_an_image]]}}
            ).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=60) as reply:
            prediction, refusal = json.load(reply)["predictions"]
        if shutil.which("ss"):
            bound = listeners(port)
            assert bound and all(address.startswith("127.0.0.1:") for address in bound), bound
    finally:
        stop_group(server)
    assert prediction["label"] == row["answer"]  # "unknown" under the threshold, as evaluate answered
    assert abs(prediction["confidence"] - float(row["confidence"])) < 1e-4
    assert set(prediction["probabilities"]) == {"flag", "fruit", "mammal", "vehicle"}
    assert abs(sum(prediction["probabilities"].values()) - 1) < 1e-4
    assert prediction["error"] is None
    # the bad image gets its own answer; the good one's is not lost with it
    assert refusal["label"] is None and refusal["probabilities"] is None
    assert refusal["error"].startswith("not an image")
