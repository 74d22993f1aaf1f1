"""Faults and hostile input (docs/your-images.md, docs/parameters.md,
docs/retraining.md): each case ends in one line naming the file or setting, the exit
code the docs give, nothing the user had lost or changed, and nothing silently wrong."""

import fcntl
import json
import os
import random
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import numpy as np
import pytest
from conftest import REPO, copy_project, make_dataset, project_env, run, with_exported_backbone, write_image
from PIL import Image, ImageOps

from pipeline import extract, split
from pipeline.data.images import DataError, SettingError
from pipeline.evaluation.metrics import mlflow_metric_name
from pipeline.features.cache import FeatureCache
from pipeline.features.table import FeatureTable, TableMeta, load_table, save_table
from pipeline.model.checkpoint import load_checkpoint
from pipeline.project import tracking
from pipeline.project.config import compose_config, output_overrides
from pipeline.project.settings import problems

BAD_SETTINGS = {  # each once accepted: a useless model, a crash late, or files outside the project
    "train.learning_rate=0": "train.learning_rate = 0: expected a number > 0",
    "head.hidden_sizes=[0]": "head.hidden_sizes = [0]: expected a list of layer sizes >= 1",
    "train.max_iterations=0": "train.max_iterations = 0: expected a whole number >= 1",
    "model.name=../../x": "model.name = '../../x': expected a Swift identifier",
    "extract.workers=0": "extract.workers = 0: expected auto or a whole number >= 1",
    "extract.batch_size=-1": "extract.batch_size = -1: expected a whole number >= 1",
    "model.precision=int4": "model.precision = 'int4': expected one of float32, float16, int8",
    "augment.flip=-1": "augment.flip = -1: expected a whole number >= 0",
}


@pytest.mark.parametrize(("override", "message"), BAD_SETTINGS.items())
def test_each_bad_setting_is_named(override, message):
    assert problems(compose_config(override)) == [message]


def test_conf_defaults_are_all_valid():
    assert problems(compose_config()) == []


def test_bad_settings_stop_a_stage_with_one_line_each_and_write_nothing(tmp_path):
    before = sorted(p.name for p in tmp_path.parent.iterdir())
    result = subprocess.run(
        [sys.executable, "-m", "pipeline.convert", *output_overrides(tmp_path / "out"), *BAD_SETTINGS],
        cwd=REPO,
        env=project_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 2
    assert "Traceback" not in output
    for message in BAD_SETTINGS.values():
        assert message in output
    assert not (tmp_path / "out").exists()  # nothing written, here or beside it
    assert sorted(p.name for p in tmp_path.parent.iterdir()) == before


BAD_SETTING_PROBE = """
import sys
from pipeline.{stage} import main
sys.argv = ["{stage}", "train.learning_rate=0"]
try:
    main()
except SystemExit as exit:
    heavy = sorted(m for m in ("torch", "pytorch_lightning", "mlflow", "coremltools") if m in sys.modules)
    print("exit", exit.code, "heavy", heavy)
"""


@pytest.mark.parametrize("stage", ["split", "extract", "train", "evaluate", "convert"])
def test_a_bad_setting_fails_before_the_seconds_of_heavy_imports(stage):
    result = subprocess.run(
        [sys.executable, "-c", BAD_SETTING_PROBE.format(stage=stage)],
        cwd=REPO,
        env=project_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "exit 2 heavy []" in result.stdout, result.stdout + result.stderr


@pytest.fixture
def extracted(tmp_path, exported_backbone):
    """A small project after split and extract: its config."""
    make_dataset(tmp_path / "data/train", per_label=6)
    cfg = compose_config(
        *output_overrides(tmp_path / "out"),
        f"data.train_dir={tmp_path / 'data/train'}",
        "data.test_dir=null",
        "augment.flip=0",
    )
    with_exported_backbone(cfg, exported_backbone)
    split.run(cfg)
    extract.run(cfg)
    return cfg


def cache_database(cfg) -> Path:
    with FeatureCache(cfg.paths.feature_cache, cfg.extractor, cfg.extract.crop_and_scale) as cache:
        return cache.dir / "features.sqlite"


def empty_cache(cfg) -> None:
    """The feature cache's vectors deleted (its exported backbone kept): all is extracted again."""
    for database in cache_database(cfg).parent.glob("features.sqlite*"):
        database.unlink()


def same_features(cfg, clean) -> bool:
    return np.abs(np.asarray(load_table(cfg.paths.features)["features"]) - clean["features"]).max() < 1e-5


def test_image_replaced_after_split_is_not_cached_under_the_old_hash(extracted, tmp_path):
    cfg = extracted
    original = tmp_path / "data/train/red/red_0.png"
    kept = original.read_bytes()
    clean = load_table(cfg.paths.features)
    empty_cache(cfg)
    ImageOps.mirror(Image.open(original)).save(original)  # new pixels, same name, after split
    with pytest.raises(DataError, match=f"{original}: changed since split: rerun split"):
        extract.run(cfg)
    original.write_bytes(kept)  # put back: the features must be the original's, not the mirror's
    extract.run(cfg)
    assert same_features(cfg, clean)


def test_overwritten_cache_bytes_are_found_and_extracted_again(extracted, caplog):
    cfg = extracted
    clean = load_table(cfg.paths.features)
    with sqlite3.connect(cache_database(cfg)) as db:  # the file stays valid; one vector's bytes do not
        key, vector = db.execute("SELECT key, vector FROM vectors LIMIT 1").fetchone()
        damaged = np.frombuffer(vector, np.float32) * 0.5  # finite, plausible, wrong
        db.execute("UPDATE vectors SET vector = ? WHERE key = ?", (damaged.tobytes(), key))
    extract.run(cfg)
    assert "1 damaged entries" in caplog.text
    assert same_features(cfg, clean)


def test_a_cache_file_that_is_not_sqlite_is_set_aside_and_rebuilt(extracted, caplog):
    cfg = extracted
    clean = load_table(cfg.paths.features)
    database = cache_database(cfg)
    for sidecar in ("features.sqlite-wal", "features.sqlite-shm"):
        (database.parent / sidecar).unlink(missing_ok=True)
    database.write_bytes(b"this is not a database" * 100)
    extract.run(cfg)
    assert f"feature cache {database} is damaged" in caplog.text
    assert list(database.parent.glob("features.sqlite.damaged-*"))  # kept for a look, not deleted
    assert same_features(cfg, clean)


def test_a_non_finite_vector_in_the_store_stops_whoever_reads_it(tmp_path):
    """NaN features would train a NaN head without a word; the store is named instead."""
    features = np.ones((3, 4), np.float32)
    features[1, 2] = np.nan
    table = FeatureTable(
        features=features,
        label_index=np.array([0, 1, 0]),
        split=np.array(["train"] * 3),
        path=np.array(["a.png", "b.png", "c.png"]),
        sha256=np.array(["1", "2", "3"]),
        copy=np.array([""] * 3),
        meta=TableMeta(extractor={"dim": 4}, labels=["x", "y"], split_sha256="", copies=[], skipped=[]),
    )
    save_table(tmp_path / "features", table)
    stored = load_table(tmp_path / "features")["features"]
    assert np.array_equal(stored[[0, 2]], features[[0, 2]])  # the rows beside it read as they are
    with pytest.raises(DataError, match=f"{tmp_path / 'features'} is damaged .non-finite features"):
        stored[[1]]


@pytest.mark.parametrize("part", ["index.parquet", "shards"])
def test_damaged_feature_table_names_the_file(extracted, part):
    cfg = extracted
    store = Path(cfg.paths.features)
    damaged = store / part if part == "index.parquet" else next((store / part).iterdir())
    with open(damaged, "r+b") as file:
        file.truncate(100)
    with pytest.raises(DataError, match=f"{store} is damaged .*: delete it and run dvc repro"):
        load_table(store)


def test_unanswering_tracking_server_fails_the_stage_in_seconds(extracted, tmp_path):
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**project_env(), "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{port}"}
    overrides = [*output_overrides(tmp_path / "out"), f"data.train_dir={tmp_path / 'data/train'}"]
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "pipeline.train", *overrides, "data.test_dir=null", "augment.flip=0"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    assert f"the MLflow store http://127.0.0.1:{port} (MLFLOW_TRACKING_URI) cannot be used" in output
    assert "Traceback" not in output
    assert time.monotonic() - started < 60  # imports included; MLflow alone would retry for minutes


def test_a_killed_stage_left_a_zombie_counts_as_gone():
    """Where init reaps no orphans, a stage killed with DVC stays a zombie."""
    stage = subprocess.Popen([sys.executable, "-c", "pass"])
    deadline = time.monotonic() + 30
    while tracking.process_alive(stage.pid):  # exited, not yet reaped: a zombie
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert stage.poll() == 0  # it was still there to reap: the check saw a zombie as gone
    assert tracking.process_alive(os.getpid())


def test_runs_of_killed_stages_are_marked_killed(tmp_path):
    cfg = compose_config(f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}")
    gone = subprocess.Popen(["true"])
    gone.wait()
    tracking.use_store(cfg)
    experiment = mlflow.get_experiment_by_name(cfg.mlflow.experiment).experiment_id
    client = mlflow.MlflowClient()
    killed = client.create_run(
        experiment, tags={"pipeline.host": socket.gethostname(), "pipeline.pid": str(gone.pid)}
    )
    alive = client.create_run(experiment, tags={"pipeline.host": socket.gethostname(), "pipeline.pid": "1"})
    tracking.mark_killed_runs(experiment)
    assert client.get_run(killed.info.run_id).info.status == "KILLED"
    assert client.get_run(alive.info.run_id).info.status == "RUNNING"


RETRAIN = [sys.executable, "-m", "pipeline.retrain"]


def registry(project):
    return mlflow.MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")


def add_mirrored_images(project) -> None:
    for label in ("flag", "fruit", "mammal", "vehicle"):
        for source in sorted((project / "data/demo/train" / label).glob("*.jpg"))[:2]:
            ImageOps.mirror(Image.open(source)).save(source.with_name(f"mirrored_{source.name}"))


@pytest.mark.slow
def test_retrain_treats_a_champion_without_its_score_as_no_comparable_champion(demo_project, tmp_path):
    project = copy_project(demo_project, tmp_path / "project")
    client = registry(project)
    client.set_registered_model_alias("ImageClassifier", "champion", "1")  # set by hand: no retrain tag
    add_mirrored_images(project)
    result = run(RETRAIN, project, check=False)
    assert result.returncode == 10, result.stdout + result.stderr
    assert "no comparable champion" in result.stdout + result.stderr
    assert int(client.get_model_version_by_alias("ImageClassifier", "champion").version) == 2


@pytest.mark.slow
def test_retrain_that_registers_no_new_version_keeps_the_champion(demo_project, tmp_path):
    project = copy_project(demo_project, tmp_path / "project")
    client = registry(project)
    client.set_model_version_tag("ImageClassifier", "1", "retrain.test.accuracy", "0.95")
    client.set_registered_model_alias("ImageClassifier", "champion", "1")
    config = project / "conf/config.yaml"  # a change that reruns `evaluate` alone
    config.write_text(config.read_text().replace("min_images_to_judge: 10", "min_images_to_judge: 12"))
    result = run(RETRAIN, project, check=False)
    assert result.returncode == 11, result.stdout + result.stderr
    assert "this run registered none" in result.stdout + result.stderr
    assert [int(v.version) for v in client.search_model_versions("name='ImageClassifier'")] == [1]


@pytest.mark.slow
def test_retrain_while_dvc_is_busy_exits_75(demo_project, tmp_path):
    project = copy_project(demo_project, tmp_path / "project")
    add_mirrored_images(project)
    lock = project / ".dvc/tmp/lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    with lock.open("a+") as held:  # what a `dvc repro` started by hand holds
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        result = run(RETRAIN, project, check=False)
    output = result.stdout + result.stderr
    assert result.returncode == 75, output
    assert "another DVC command is running" in output
    assert "Traceback" not in output


def test_a_failed_write_leaves_the_previous_split_whole(extracted, tmp_path, monkeypatch):
    """A truncated split.json once broke every later run, even after the cause was gone."""
    cfg = extracted
    kept = Path(cfg.paths.split).read_bytes(), Path(cfg.paths.split_table).read_bytes()
    write_image(tmp_path / "data/train/red/late.png", (200, 40, 40), seed=99)

    def no_rename(self, target):
        raise OSError("killed before the rename")

    monkeypatch.setattr(Path, "replace", no_rename)
    with pytest.raises(OSError):
        split.run(cfg)
    monkeypatch.undo()
    assert (Path(cfg.paths.split).read_bytes(), Path(cfg.paths.split_table).read_bytes()) == kept
    assert not list(Path(cfg.paths.split).parent.glob(".*.tmp"))  # no half-written file left behind


def test_a_damaged_last_split_means_a_split_from_scratch(extracted, caplog):
    cfg = extracted
    kept = Path(cfg.paths.split_table).read_bytes()
    Path(cfg.paths.split_table).write_bytes(kept[: len(kept) // 2])
    split.run(cfg)
    assert "cannot be read: splitting from scratch" in caplog.text
    assert Path(cfg.paths.split_table).read_bytes() == kept  # the same split, made again


def test_a_file_name_that_is_not_utf8_is_skipped_and_named(tmp_path):
    make_dataset(tmp_path / "data/train", per_label=4)
    odd = os.fsdecode(b"caf\xe9.png")  # Latin-1 bytes, as an old camera or zip tool writes them
    write_image(tmp_path / "data/train/red" / odd, (200, 40, 40), seed=50)
    cfg = compose_config(
        *output_overrides(tmp_path / "out"), f"data.train_dir={tmp_path / 'data/train'}", "data.test_dir=null"
    )
    split.run(cfg)
    report = json.loads(Path(cfg.paths.data_report).read_text(encoding="utf-8"))
    (skipped,) = report["skipped"]
    assert skipped == {
        "path": f"{tmp_path}/data/train/red/caf\\xe9.png",
        "reason": "file name is not valid UTF-8: rename it",
    }
    assert sum(report["images"]["train"].values()) == 12  # the others all used


@pytest.mark.slow
def test_dvc_repro_runs_past_a_file_name_that_is_not_utf8(demo_project, tmp_path):
    project = copy_project(demo_project, tmp_path / "project")
    label = next(p for p in sorted((project / "data/demo/train").iterdir()) if p.is_dir())
    image = next(label.iterdir()).read_bytes()
    # DVC ignores the odd name (.dvcignore), so it comes in a batch with a new image
    (label / os.fsdecode(b"caf\xe9.png")).write_bytes(image)
    ImageOps.mirror(Image.open(next(label.iterdir()))).save(label / "new.png")
    result = run(["dvc", "repro", "split"], project, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads((project / "reports/data_report.json").read_text(encoding="utf-8"))
    assert {
        "path": f"data/demo/train/{label.name}/caf\\xe9.png",
        "reason": "file name is not valid UTF-8: rename it",
    } in report["skipped"]
    assert "split" not in json.loads(run(["dvc", "status", "--json"], project).stdout)


def test_labels_longer_than_mlflow_allows_stay_distinct_metrics():
    long_a, long_b = "a" * 254 + "1", "a" * 254 + "2"
    names = {mlflow_metric_name("validation", label, "precision") for label in (long_a, long_b)}
    assert len(names) == 2
    assert all(len(name) <= 250 and name.endswith("_precision") for name in names)


@pytest.mark.parametrize(
    ("arguments", "message"), [([""], "an empty image argument"), (["EMPTY"], "no image files in")]
)
def test_predict_without_images_says_so(tmp_path, arguments, message):
    (tmp_path / "EMPTY").mkdir()
    arguments = [str(tmp_path / "EMPTY") if a == "EMPTY" else a for a in arguments]
    result = subprocess.run(
        [sys.executable, "-m", "pipeline.predict", *arguments, "--model", str(tmp_path / "model.onnx")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert message in result.stderr


# A stage's usual length on the demo here (seconds), to kill it somewhere inside.
STAGE_SECONDS = {"split": 2, "extract": 10, "train": 8, "evaluate": 6, "convert": 8}


def start_repro_until(project, stage: str) -> subprocess.Popen:
    """`dvc repro --force` in its own process group, returned once `stage` has started."""
    repro = subprocess.Popen(
        ["dvc", "repro", "--force"],
        cwd=project,
        env=project_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    deadline = time.monotonic() + 300
    for line in repro.stdout:
        if line.startswith(f"Running stage '{stage}'"):
            return repro
        assert time.monotonic() < deadline, f"stage {stage} did not start"
    raise AssertionError(f"dvc repro ended before stage {stage} started")


# What DVC says when a kill landed while it rewrote one of its own files in place (it
# writes neither dvc.lock nor .dvc/tmp/rwlock atomically), and the file to delete.
DVC_OWN_FILE_DAMAGED = {
    "'./dvc.lock' validation failed": "dvc.lock",
    "'./dvc.lock' is invalid": "dvc.lock",
    "Unable to read RWLock-file": ".dvc/tmp/rwlock",
}


def repro_after_a_kill(project: Path) -> subprocess.CompletedProcess:
    """`dvc repro`; if DVC's own file was damaged by the kill, the recovery docs/pipeline.md
    gives (delete the file DVC names, `dvc repro` again) and that second run's result."""
    result = run(["dvc", "repro"], project, check=False)
    damaged = next((file for message, file in DVC_OWN_FILE_DAMAGED.items() if message in result.stderr), None)
    if result.returncode != 0 and damaged:
        (project / damaged).unlink()
        result = run(["dvc", "repro"], project, check=False)
    return result


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("stage", list(STAGE_SECONDS))
def test_sigkill_in_any_stage_then_repro_reaches_the_clean_metrics(demo_project, tmp_path, stage, seed):
    project = copy_project(demo_project, tmp_path / "project")
    clean = json.loads((project / "reports/metrics.json").read_text())
    repro = start_repro_until(project, stage)
    time.sleep(random.Random(seed).uniform(0, STAGE_SECONDS[stage]))
    os.killpg(repro.pid, signal.SIGKILL)  # DVC and the stage's process, at once
    repro.wait(timeout=30)

    result = repro_after_a_kill(project)
    assert result.returncode == 0, result.stdout + result.stderr
    assert json.loads((project / "reports/metrics.json").read_text()) == clean
    assert run(["dvc", "status", "--json"], project).stdout.strip() in ("{}", "")
    client = registry(project)
    experiment = client.get_experiment_by_name("image-classifier").experiment_id
    # A run its killed stage left RUNNING is marked KILLED by the next stage that starts
    # (none may have: DVC can restore outputs from its run cache); never FINISHED.
    mlflow.set_tracking_uri(f"sqlite:///{project / 'mlflow.db'}")
    tracking.mark_killed_runs(experiment)
    assert {r.info.status for r in client.search_runs([experiment])} <= {"FINISHED", "KILLED", "FAILED"}
    # the runs behind the model in place, newest first (DVC's run cache may have put back an
    # earlier one). The newest evaluated one: a train killed after its run finished leaves a
    # twin run that no evaluate followed, DVC finding the same bytes already in place.
    made_it = f"tags.{tracking.CHECKPOINT_TAG} = '{tracking.file_sha256(project / 'models/head.ckpt')}'"
    behind = client.search_runs([experiment], made_it, order_by=["attributes.start_time DESC"])
    evaluated = [run for run in behind if "test_accuracy" in run.data.metrics]
    assert evaluated, f"no run of {len(behind)} behind the model has its evaluation"
    # FINISHED; or KILLED when the killed stage was convert, which had resumed it, and DVC's
    # run cache then put convert's outputs back (the same head makes the same bytes)
    # without running convert again to finish it
    status = evaluated[0].info.status
    assert status == "FINISHED" or (stage == "convert" and status == "KILLED")
    assert evaluated[0].data.metrics["test_accuracy"] == pytest.approx(clean["test"]["accuracy"])


@pytest.mark.slow
@pytest.mark.parametrize(("file", "cut_short"), [("dvc.lock", ""), (".dvc/tmp/rwlock", '{"read": {"da')])
def test_dvc_own_file_cut_short_by_a_kill_recovers_as_documented(demo_project, tmp_path, file, cut_short):
    project = copy_project(demo_project, tmp_path / "project")
    clean = json.loads((project / "reports/metrics.json").read_text())
    lock = (project / "dvc.lock").read_text()
    (project / file).write_text(cut_short)
    assert run(["dvc", "repro"], project, check=False).returncode != 0

    result = repro_after_a_kill(project)
    assert result.returncode == 0, result.stdout + result.stderr
    assert json.loads((project / "reports/metrics.json").read_text()) == clean
    assert (project / "dvc.lock").read_text() == lock


def test_damaged_checkpoint_names_the_file(tmp_path):
    checkpoint = tmp_path / "head.ckpt"
    checkpoint.write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(DataError, match=f"{checkpoint} is damaged .*: delete it and run dvc repro"):
        load_checkpoint(checkpoint)


def test_max_image_pixels_above_pillows_own_limit_is_obeyed(tmp_path):
    """Pillow refuses images over twice its limit (179 Mpx) whatever the setting said."""
    make_dataset(tmp_path / "data/train", per_label=3)
    big = tmp_path / "data/train/red/big.png"
    Image.new("RGB", (15000, 12500), (200, 40, 40)).save(big)  # 187.5 Mpx
    cfg = compose_config(
        *output_overrides(tmp_path / "out"),
        f"data.train_dir={tmp_path / 'data/train'}",
        "data.test_dir=null",
        "data.max_image_pixels=200000000",
    )
    split.run(cfg)
    report = json.loads(Path(cfg.paths.data_report).read_text(encoding="utf-8"))
    assert report["skipped"] == []
    assert report["images"]["train"]["red"] == 4


def test_symlinks_inside_the_data_folder_are_followed_and_others_listed(tmp_path):
    train = tmp_path / "data/train"
    make_dataset(train, per_label=3)
    make_dataset(tmp_path / "elsewhere", per_label=2, labels=("red",))
    (train / "red/more").symlink_to(tmp_path / "elsewhere/red")  # leaves the data folder
    (train / "green/again").symlink_to(train / "green")  # a loop
    (train / "blue/nested").mkdir()
    write_image(train / "blue/nested/deep.png", (40, 60, 200), seed=70)
    (train / "blue/latest").symlink_to(train / "blue/nested")  # a second way into a folder read anyway
    (train / "blue/alias.png").symlink_to(train / "blue/blue_0.png")  # inside: followed
    cfg = compose_config(*output_overrides(tmp_path / "out"), f"data.train_dir={train}", "data.test_dir=null")
    split.run(cfg)
    report = json.loads(Path(cfg.paths.data_report).read_text(encoding="utf-8"))
    reasons = {item["path"]: item["reason"] for item in report["skipped"]}
    assert reasons == {
        str(train / "red/more"): "link leaving the data folder: not followed",
        str(train / "green/again"): "link to a folder already read: not followed",
        str(train / "blue/latest"): "link to a folder already read: not followed",
    }
    assert report["images"]["train"] == {"blue": 5, "green": 3, "red": 3}


def truncated_store(store: Path) -> None:
    """A real MLflow store with a run, cut in half as a full disk or a kill leaves it."""
    client = mlflow.MlflowClient(f"sqlite:///{store}")  # no global tracking state
    run_id = client.create_run(client.create_experiment("damaged")).info.run_id
    client.log_metric(run_id, "accuracy", 1.0)
    client.set_terminated(run_id)
    with open(store, "r+b") as file:
        file.truncate(store.stat().st_size // 2)


@pytest.mark.parametrize("damage", ["overwritten", "truncated"])
def test_damaged_mlflow_store_is_named(tmp_path, monkeypatch, damage):
    store = tmp_path / "mlflow.db"
    if damage == "overwritten":
        store.write_bytes(b"not a database" * 100)
    else:
        truncated_store(store)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = compose_config(f"mlflow.tracking_uri=sqlite:///{store}")
    named = f"the MLflow store sqlite:///{store} \\(mlflow.tracking_uri\\) cannot be used"
    with pytest.raises(SettingError, match=named):
        tracking.use_store(cfg)
