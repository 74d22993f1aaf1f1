"""The whole pipeline on the demo data, in a fresh copy of the project, through
the doors users use: dvc repro, python -m pipeline.<stage>, dvc exp run."""

import csv
import json
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import mlflow
import pytest
from conftest import copy_project, project_env, project_repro_output, run

from pipeline.model.checkpoint import load_checkpoint

pytestmark = pytest.mark.slow
STAGES = ["split", "extract", "train", "evaluate", "convert"]


def ran_stages(dvc_output: str) -> list[str]:
    """Stages DVC says it ran, in its own words ("Running stage 'train':")."""
    return re.findall(r"Running stage '(\w+)'", dvc_output)


def mlflow_runs(project):
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("image-classifier")
    return client, client.search_runs([experiment.experiment_id], order_by=["attributes.start_time DESC"])


def edit_conf(project, old: str, new: str) -> None:
    """Change a parameter where docs/pipeline.md says: in conf/, then compose params.yaml."""
    config = project / "conf/config.yaml"
    text = config.read_text()
    assert old in text
    config.write_text(text.replace(old, new))
    run([sys.executable, "-m", "pipeline.params"], project)


@pytest.fixture
def project(demo_project, tmp_path):
    """The demo project after its first `dvc repro`, a copy of its own for each test to change."""
    return copy_project(demo_project, tmp_path / "project")


def test_first_repro_runs_every_stage(demo_project):
    # `split` may be up to date already: its output and dvc.lock are in git
    ran = ran_stages(project_repro_output[demo_project])
    assert ran[-4:] == ["extract", "train", "evaluate", "convert"]


def test_first_repro_writes_model_metrics_and_a_finished_mlflow_run(demo_project):
    project = demo_project
    assert (project / "models/ImageClassifier.mlpackage").is_dir()
    assert (project / "models/ImageClassifier.onnx").is_file()
    metrics = json.loads((project / "reports/metrics.json").read_text())
    assert set(metrics) == {"train", "validation", "test"}
    assert set(metrics["test"]["per_class"]) == {"flag", "fruit", "mammal", "vehicle"}
    assert sum(c["count"] for c in metrics["test"]["per_class"].values()) == 60
    assert metrics["test"]["accuracy"] >= 0.8

    client, runs = mlflow_runs(project)
    latest = runs[0]
    assert latest.info.status == "FINISHED"
    assert latest.data.params["extractor.name"] == "v2"  # the default
    assert latest.data.metrics["test_accuracy"] == pytest.approx(metrics["test"]["accuracy"])
    epochs = len((project / "reports/training_curves.csv").read_text().splitlines()) - 1
    assert 2 <= epochs <= 100  # L-BFGS stops when converged, at most train.max_iterations
    for curve in ("train_accuracy", "validation_accuracy", "train_loss", "validation_loss"):
        history = client.get_metric_history(latest.info.run_id, f"epoch/{curve}")
        assert [m.step for m in history] == list(range(epochs))  # one point per epoch
    artifacts = {a.path for a in client.list_artifacts(latest.info.run_id)}
    assert {"config.yaml", "metrics.json", "coreml"} <= artifacts
    assert client.get_registered_model("ImageClassifier").latest_versions


def test_second_repro_runs_nothing(project):
    assert ran_stages(run(["dvc", "repro"], project).stdout) == []


def test_augmentations_rerun_extract_onward_and_keep_validation_accuracy(demo_project, tmp_path):
    project = copy_project(demo_project, tmp_path / "project")
    before = json.loads((project / "reports/metrics.json").read_text())
    edit_conf(project, "  flip: 1\n", "  flip: 2\n")
    for name in ("crop", "exposure"):
        edit_conf(project, f"  {name}: 0 ", f"  {name}: 1 ")
    assert ran_stages(run(["dvc", "repro"], project).stdout) == ["extract", "train", "evaluate", "convert"]
    after = json.loads((project / "reports/metrics.json").read_text())
    print("demo accuracy without augmentations:", {split: before[split]["accuracy"] for split in before})
    print("demo accuracy with flip=2, crop, exposure:", {split: after[split]["accuracy"] for split in after})
    assert after["validation"]["accuracy"] >= before["validation"]["accuracy"]
    with open(project / "reports/predictions.csv", encoding="utf-8") as file:
        paths = [row["path"] for row in csv.DictReader(file)]
    counts = json.loads((project / "artifacts/split.json").read_text())["images"]
    assert len(paths) == len(set(paths)) == sum(n for labels in counts.values() for n in labels.values())


def test_learning_rate_change_reruns_train_onward(project):
    edit_conf(project, "learning_rate: 0.001", "learning_rate: 0.01")
    assert ran_stages(run(["dvc", "repro"], project).stdout) == ["train", "evaluate", "convert"]


def test_precision_change_reruns_convert_alone(project):
    edit_conf(project, "precision: float16", "precision: int8")
    assert ran_stages(run(["dvc", "repro"], project).stdout) == ["convert"]
    sizes = json.loads((project / "reports/model.json").read_text())
    print("int8 model sizes:", sizes)
    assert sizes["precision"] == "int8"


def test_metadata_change_reruns_convert_alone(project):
    edit_conf(project, 'author: ""', 'author: "Jane Appleseed"')
    assert ran_stages(run(["dvc", "repro"], project).stdout) == ["convert"]


def test_extractor_v1_reruns_extract_onward(project):
    edit_conf(project, "- extractor: v2", "- extractor: v1")
    assert ran_stages(run(["dvc", "repro"], project).stdout) == ["extract", "train", "evaluate", "convert"]
    _, runs = mlflow_runs(project)
    assert runs[0].data.params["extractor.name"] == "v1"
    print("demo v1 metrics:", (project / "reports/metrics.json").read_text())


def test_train_plus_extractor_v1_as_typed(project):
    assert not list((project / "artifacts/feature_cache").glob("v1-*"))  # no v1 features yet
    result = run([sys.executable, "-m", "pipeline.train", "+extractor=v1"], project)
    assert "v1" in result.stdout
    _, runs = mlflow_runs(project)
    assert runs[0].data.params["extractor.name"] == "v1"
    assert runs[0].info.status == "FINISHED"


def test_a_multirun_gives_each_job_its_folder_and_run_and_leaves_dvc_outputs_alone(project):
    owned = ["models/head.ckpt", "reports/training_curves.csv"]
    before = {path: (project / path).read_bytes() for path in owned}
    status = ["git", "status", "--porcelain", "--untracked-files=all"]
    git_status = run(status, project).stdout
    run([sys.executable, "-m", "pipeline.train", "-m", "head=logistic,mlp"], project)
    assert {path: (project / path).read_bytes() for path in owned} == before
    jobs = sorted((project / "multirun").glob("*/*/[0-9]"))
    assert [load_checkpoint(job / "models/head.ckpt")[1].head["type"] for job in jobs] == ["logistic", "mlp"]
    assert all((job / "reports/training_curves.csv").is_file() for job in jobs)
    _, runs = mlflow_runs(project)
    assert [(r.data.params["head.type"], r.info.status) for r in runs[:2]] == [
        ("mlp", "FINISHED"),
        ("logistic", "FINISHED"),
    ]
    assert json.loads(run(["dvc", "status", "--json"], project).stdout) == {}
    assert run(status, project).stdout == git_status  # the job folders are ignored


def test_outputs_made_again_from_scratch_are_the_same_bytes(project):
    """A fresh clone's `dvc repro` leaves dvc.lock as committed: the feature table, the
    head, the ONNX model and the Core ML package hold no time, run id or random name."""
    lock = (project / "dvc.lock").read_text()
    for made in ("artifacts/feature_cache", "artifacts/features"):  # what a clone lacks
        shutil.rmtree(project / made)
    run(["dvc", "repro", "-f", "--no-run-cache", "--single-item", "extract", "train", "convert"], project)
    assert (project / "dvc.lock").read_text() == lock


def test_dvc_exp_run_with_override_is_listed(project):
    run(["git", "add", "-A"], project)
    run(["git", "commit", "-qm", "baseline", "--allow-empty"], project)  # clean after a repro
    run(["dvc", "exp", "run", "-n", "faster-lr", "-S", "train.learning_rate=0.03"], project)
    experiments = json.loads(run(["dvc", "exp", "show", "--json"], project).stdout)
    listed = [exp["data"] for exp in walk(experiments) if exp.get("name") == "faster-lr" and "data" in exp]
    assert listed, "dvc exp show does not list the experiment"
    for data in listed:
        assert data["params"]["params.yaml"]["data"]["train"]["learning_rate"] == 0.03
        assert "test" in data["metrics"]["reports/summary.json"]["data"]
    # what it prints: a column per figure of a split, none per label; the README's form,
    # --only-changed, only what the experiment changed
    columns = run(["dvc", "exp", "show", "--csv"], project).stdout.splitlines()[0].split(",")
    assert "test.accuracy" in columns and not [column for column in columns if "per_class" in column]
    changed = run(["dvc", "exp", "show", "--only-changed", "--csv"], project).stdout.splitlines()[0]
    assert "train.learning_rate" in changed.split(",") and len(changed.split(",")) <= 30


def walk(node):
    """Every dict in `dvc exp show --json`, however DVC nests commits and experiments."""
    if isinstance(node, dict):
        yield node
        node = list(node.values())
    if isinstance(node, list):
        for child in node:
            yield from walk(child)


def test_mlflow_server_compares_runs_across_extractors(project):
    edit_conf(project, "- extractor: v2", "- extractor: v1")  # a v1 run beside the v2 run
    run(["dvc", "repro"], project)
    with socket.socket() as probe:  # a free port on loopback
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen(
        [
            "mlflow",
            "server",
            "--backend-store-uri",
            f"sqlite:///{project / 'mlflow.db'}",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        cwd=project,
        env=project_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    api = f"http://127.0.0.1:{port}/api/2.0/mlflow"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5)
                break
            except OSError:
                assert time.monotonic() < deadline and server.poll() is None, "mlflow server did not start"
                time.sleep(1)
        with urllib.request.urlopen(
            f"{api}/experiments/get-by-name?experiment_name=image-classifier"
        ) as reply:
            experiment_id = json.load(reply)["experiment"]["experiment_id"]
        request = urllib.request.Request(
            f"{api}/runs/search",
            data=json.dumps({"experiment_ids": [experiment_id], "max_results": 500}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request) as reply:
            runs = json.load(reply)["runs"]
    finally:
        server.terminate()
        server.wait(timeout=30)
    evaluated = {}
    for found in runs:
        params = {p["key"]: p["value"] for p in found["data"]["params"]}
        metrics = {m["key"]: m["value"] for m in found["data"].get("metrics", [])}
        if "test_accuracy" in metrics:
            evaluated.setdefault(params["extractor.name"], []).append((set(params), metrics))
    assert {"v1", "v2"} <= set(evaluated)
    (v1_keys, v1_metrics), (v2_keys, v2_metrics) = evaluated["v1"][0], evaluated["v2"][0]
    assert v1_keys == v2_keys  # the same parameter columns side by side
    assert {"test_accuracy", "validation_accuracy", "test_flag_recall"} <= set(v1_metrics) & set(v2_metrics)


# What the libraries printed on a first run, read as "the model may be broken"
LIBRARY_NOISE = (
    "has not been tested with coremltools",  # coremltools' tested torch version
    "Failed to load _ML",  # coremltools' macOS-only part, eight lines
    "scikit-learn version",  # coremltools' tested scikit-learn version
    "💡 Tip",  # Lightning's advertisements
    "TPU available",
    "is deprecated",  # Lightning calling what torch deprecated
    "An input example was not provided",  # MLflow, where the signature is stated
    "Creating initial MLflow database tables",
    "Running MIL",  # coremltools' progress bars between the log lines
)


def test_a_first_run_prints_our_lines_not_the_libraries_noise(demo_project, tmp_path):
    project = copy_project(demo_project, tmp_path / "project")
    (project / "mlflow.db").unlink()  # MLflow's first-run lines too
    env = {key: value for key, value in project_env().items() if key != "TQDM_DISABLE"}
    result = subprocess.run(
        ["dvc", "repro", "--force"], cwd=project, env=env, capture_output=True, text=True, timeout=600
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert ran_stages(output) == STAGES
    assert [noise for noise in LIBRARY_NOISE if noise in output] == []
    if sys.platform != "darwin":
        assert "Core ML runs only on macOS" in output  # what the eight lines meant, once
