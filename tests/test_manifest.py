"""A manifest as the data source (docs/your-images.md): the same split
as the folder it lists, updated by reading only what changed, one file for DVC."""

import json
import shutil
import subprocess
import sys

import pytest
from conftest import REPO, copy_project, make_dataset, project_env, run, write_image

from pipeline import split
from pipeline.data.manifest import build_manifest, load_manifest, save_manifest
from pipeline.data.split_file import load_split


def manifest_command(folder, manifest, cwd=REPO) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pipeline.manifest", str(folder), str(manifest)],
        cwd=cwd,
        env=project_env(),
        capture_output=True,
        text=True,
    )


def test_a_manifest_gives_the_split_its_folder_gives(cfg_factory, tmp_path):
    make_dataset(tmp_path / "train", per_label=30)
    (tmp_path / "train/red/notes.txt").write_text("not an image")
    assert manifest_command(tmp_path / "train", tmp_path / "train.parquet").returncode == 0
    splits = []
    for source in (tmp_path / "train", tmp_path / "train.parquet"):
        cfg = cfg_factory(f"data.train_dir={source}", "data.test_dir=null")
        split.run(cfg)
        splits.append(load_split(cfg.paths.split, cfg.paths.split_table))
    assert splits[0]["images"] == splits[1]["images"]
    assert splits[0]["skipped"] == splits[1]["skipped"] != []


def test_updating_a_manifest_reads_only_new_and_changed_files(tmp_path):
    make_dataset(tmp_path / "train", per_label=20)
    first, read = build_manifest(tmp_path / "train", 10**8)
    assert read == 60
    save_manifest(tmp_path / "m.parquet", first)
    make_dataset(tmp_path / "train", per_label=2, start=20)  # 6 new images
    write_image(tmp_path / "train/red/red_0.png", (250, 0, 0), seed=7)  # one changed
    (tmp_path / "train/green/green_0.png").unlink()  # one gone
    second, read = build_manifest(tmp_path / "train", 10**8, load_manifest(tmp_path / "m.parquet"))
    assert read == 7
    assert len(second.rows) == 65
    changed = next(row for row in second.rows if row["path"].endswith("red/red_0.png"))
    assert changed["sha256"] != next(r for r in first.rows if r["path"] == changed["path"])["sha256"]


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["missing", "m.parquet"], "error: data folder not found: missing"),
        ([".", "m.csv"], "error: a manifest's name ends in .parquet: m.csv"),
        ([".", "m.parquet"], "error: the manifest would be written inside the data folder: m.parquet"),
    ],
)
def test_bad_manifest_arguments_are_one_line(tmp_path, arguments, message):
    result = manifest_command(*arguments, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip() == message


@pytest.mark.slow
def test_dvc_repro_on_a_manifest_reaches_the_folders_metrics(demo_project, tmp_path):
    project = copy_project(demo_project, tmp_path / "project")
    for name in ("train", "test"):
        result = manifest_command(f"data/demo/{name}", f"data/demo/{name}.parquet", cwd=project)
        assert result.returncode == 0, result.stderr
    conf = project / "conf/config.yaml"
    text = conf.read_text().replace("train_dir: data/demo/train", "train_dir: data/demo/train.parquet")
    conf.write_text(text.replace("test_dir: data/demo/test", "test_dir: data/demo/test.parquet"))
    run([sys.executable, "-m", "pipeline.params"], project)
    run(["dvc", "repro"], project)
    lock = (project / "dvc.lock").read_text()
    assert "data/demo/train.parquet" in lock and "path: data/demo/train\n" not in lock  # one file for DVC
    metrics = json.loads((project / "reports/metrics.json").read_text())
    assert metrics == json.loads((demo_project / "reports/metrics.json").read_text())
    shutil.rmtree(project / "data/demo/train/flag")  # the manifest, not the folder, is the source now
    assert "split" not in json.loads(run(["dvc", "status", "--json"], project).stdout)
