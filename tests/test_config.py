import shutil
import subprocess
import sys

import pytest
import yaml
from conftest import REPO, fresh_clone, project_env, run
from dvc.utils.hydra import compose_and_dump
from omegaconf import OmegaConf

from pipeline.project.config import accept_plus_for_defaulted_groups, compose_config


def test_params_yaml_is_conf_composed():
    """DVC tracks params.yaml; it must say what conf/ says."""
    composed = OmegaConf.to_container(compose_config(), resolve=True)
    assert yaml.safe_load((REPO / "params.yaml").read_text()) == composed


def test_plus_group_selects_the_option():
    assert accept_plus_for_defaulted_groups(["+extractor=v2", "+train.extra=1", "head=mlp"]) == [
        "extractor=v2",
        "+train.extra=1",
        "head=mlp",
    ]
    assert compose_config(*accept_plus_for_defaulted_groups(["+extractor=v2"])).extractor.name == "v2"


def test_dvc_stages_read_params_yaml():
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    assert list(stages) == ["split", "extract", "train", "evaluate", "convert"]
    for name, stage in stages.items():
        assert stage["cmd"] == f"python -m pipeline.{name} --config-name dvc_stage"


TYPOS = {  # each once exited 1 with Hydra's internals, or (with +) trained without the parameter
    "trian.learning_rate=0.1": "no such parameter in conf/ (did you mean train.learning_rate?)",
    "+trian.learning_rate=0.1": "no such parameter in conf/ (did you mean train.learning_rate?)",
    "head=mpl": "head has no option mpl (did you mean mlp?); its options: logistic, mlp",
}


def door_in_a_copy(project, *arguments: str) -> subprocess.CompletedProcess:
    """`python -m <door> ...` in a project of its own: a door that went on would write there."""
    for folder in ("pipeline", "conf"):
        shutil.copytree(REPO / folder, project / folder)
    if not (project / "params.yaml").exists():
        shutil.copy(REPO / "params.yaml", project / "params.yaml")
    return subprocess.run(
        [sys.executable, "-m", *arguments],
        cwd=project,  # `python -m` imports the copy
        env=project_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize("door", ["pipeline.train", "pipeline.params"])
@pytest.mark.parametrize(("override", "message"), TYPOS.items())
def test_a_misspelt_name_stops_each_door_with_one_line(tmp_path, door, override, message):
    result = door_in_a_copy(tmp_path, door, override)
    assert result.returncode == 2
    assert (result.stdout + result.stderr).splitlines() == [f"ERROR   {override}: {message}"]
    assert (tmp_path / "params.yaml").read_bytes() == (REPO / "params.yaml").read_bytes()
    assert not (tmp_path / "models").exists()


def test_a_stage_refuses_a_parameter_that_dvc_added_to_params_yaml(tmp_path):
    """`dvc exp run -S +trian.learning_rate=0.1` composes it into params.yaml itself."""
    params = yaml.safe_load((REPO / "params.yaml").read_text()) | {"trian": {"learning_rate": 0.1}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    result = door_in_a_copy(tmp_path, "pipeline.train", "--config-name", "dvc_stage")
    assert result.returncode == 2
    assert (result.stdout + result.stderr).splitlines() == [
        "ERROR   trian.learning_rate: no such parameter in conf/ (did you mean train.learning_rate?)"
    ]
    assert not (tmp_path / "models").exists()


def exp_run_writes(project, *overrides: str) -> None:
    """params.yaml as `dvc exp run -S` leaves it (DVC's own composition), conf/ untouched."""
    compose_and_dump(
        project / "params.yaml", str(project / "conf"), None, "config", str(project), list(overrides)
    )


def test_recomposing_params_refuses_to_drop_a_dvc_exp_choice(tmp_path):
    """`dvc exp run -S head=mlp`, applied: neither `pipeline.params` nor `retrain` reverts it unsaid."""
    project = fresh_clone(tmp_path)
    exp_run_writes(project, "head=mlp")
    chosen = (project / "params.yaml").read_text()
    for door in ("pipeline.params", "pipeline.retrain"):
        result = run([sys.executable, "-m", door], project, check=False)
        lines = (result.stdout + result.stderr).strip().splitlines()
        assert result.returncode == 2, lines
        assert len(lines) == 1 and 'head.type = "mlp" (conf/: "logistic")' in lines[0]
        assert (project / "params.yaml").read_text() == chosen


def test_a_failed_exp_run_leaves_a_value_that_is_named_then_discarded(tmp_path):
    project = fresh_clone(tmp_path)
    exp_run_writes(project, "data.train_dir=missing")
    result = run([sys.executable, "-m", "pipeline.params"], project, check=False)
    assert result.returncode == 2 and 'data.train_dir = "missing" (conf/: "data/demo/train")' in result.stderr
    run([sys.executable, "-m", "pipeline.params", "--discard"], project)
    assert yaml.safe_load((project / "params.yaml").read_text())["data"]["train_dir"] == "data/demo/train"


def test_params_takes_an_edit_of_conf(tmp_path):
    """The README's way to change a parameter: edit conf/, then `python -m pipeline.params`."""
    project = fresh_clone(tmp_path)
    config = project / "conf/config.yaml"
    config.write_text(config.read_text().replace("learning_rate: 0.001", "learning_rate: 0.01"))
    run([sys.executable, "-m", "pipeline.params"], project)
    assert yaml.safe_load((project / "params.yaml").read_text())["train"]["learning_rate"] == 0.01
