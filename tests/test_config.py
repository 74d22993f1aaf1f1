import yaml
from conftest import REPO
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
