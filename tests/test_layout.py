"""The layout docs/contributing.md "Layout" promises: stages are doors over one library,
none imports another, and dvc.yaml's code deps cover every module a stage runs."""

import pytest
import yaml
from conftest import REPO, copy_project
from import_graph import DOORS, STAGES, imported_files, imported_modules


def covered(path: str, deps: list[str]) -> bool:
    return any(path == dep or path.startswith(dep.rstrip("/") + "/") for dep in deps)


def stage_deps() -> dict[str, list[str]]:
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text(encoding="utf-8"))["stages"]
    return {stage: stages[stage]["deps"] for stage in STAGES}


@pytest.mark.parametrize("door", DOORS)
def test_no_door_imports_another(door):
    others = {f"pipeline.{other}" for other in DOORS if other != door}
    assert not imported_modules(f"pipeline.{door}") & others


@pytest.mark.parametrize("stage", STAGES)
def test_dvc_deps_cover_every_module_the_stage_imports(stage):
    deps = stage_deps()[stage]
    assert [path for path in sorted(imported_files(stage)) if not covered(path, deps)] == []


def changed_stages(project) -> set[str]:
    """Stages `dvc status` reports as changed, by name."""
    from dvc.repo import Repo

    with Repo(str(project)) as repo:
        return {name.rsplit(":", 1)[-1] for name in repo.status()}


@pytest.mark.slow
def test_editing_a_module_a_stage_imports_makes_the_stage_changed(demo_project, tmp_path):
    """docs/pipeline.md promises exact deps: an edit to any code a stage runs must rerun it."""
    project = copy_project(demo_project, tmp_path / "project")
    assert changed_stages(project) == set()
    importers: dict[str, set[str]] = {}
    for stage in STAGES:
        for path in imported_files(stage):
            importers.setdefault(path, set()).add(stage)
    for path, stages in sorted(importers.items()):
        module = project / path
        original = module.read_bytes()
        module.write_bytes(original + b"\n# an edit\n")
        try:
            assert stages <= changed_stages(project), path
        finally:
            module.write_bytes(original)
