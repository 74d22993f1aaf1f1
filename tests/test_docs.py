"""The documentation site (docs/, mkdocs.yml) says what the code does: every setting in
conf/ has its line on the Parameters page, every page the code cites exists, and the
examples of the Python API and getting-started pages run as written."""

import importlib.util
import re
import shutil
import subprocess
import sys

import pytest
import yaml
from conftest import REPO, copy_project, project_env, run
from omegaconf import OmegaConf

from pipeline.project.config import compose_config

DOCS = REPO / "docs"


def load_parameters_hook():
    """docs/hooks/parameters.py, the MkDocs hook that writes the Parameters page."""
    spec = importlib.util.spec_from_file_location("parameters_hook", DOCS / "hooks" / "parameters.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def leaf_keys(node, prefix: str = "") -> set[str]:
    if not isinstance(node, dict):
        return {prefix}
    return set().union(*(leaf_keys(value, f"{prefix}{key}.") for key, value in node.items())) or {prefix}


def code_blocks(page: str, language: str) -> list[str]:
    text = (DOCS / page).read_text(encoding="utf-8")
    return re.findall(rf"^```{language}\n(.*?)^```", text, re.MULTILINE | re.DOTALL)


CHOICES = [(), ("extractor=v2",), ("head=mlp",), ("storage=s3", "storage.bucket=my-bucket")]


@pytest.mark.parametrize("choices", CHOICES, ids=lambda c: " ".join(c) or "defaults")
def test_every_composed_setting_has_its_line_on_the_parameters_page(choices):
    page = load_parameters_hook().parameters_markdown()
    documented = set(re.findall(r"^\| `([\w.]+)` \|", page, re.MULTILINE))
    composed = OmegaConf.to_container(compose_config(*choices), resolve=False)
    assert {key.rstrip(".") for key in leaf_keys(composed)} - documented == set()


def test_a_setting_added_without_a_comment_fails_the_page(tmp_path):
    hook = load_parameters_hook()
    conf = shutil.copytree(REPO / "conf", tmp_path / "conf")
    config = conf / "config.yaml"
    config.write_text(config.read_text().replace("train:\n", "train:\n  warmup: 0\n"))
    with pytest.raises(ValueError, match=r"conf/config.yaml: `train.warmup` has no comment"):
        hook.parameters_markdown(conf)
    config.write_text(config.read_text().replace("  warmup: 0\n", "  warmup: 0   # epochs of warm-up\n"))
    assert "| `train.warmup` | `0` | epochs of warm-up |" in hook.parameters_markdown(conf)
    (conf / "head" / "mlp.yaml").write_text((conf / "head" / "mlp.yaml").read_text() + "activation: gelu\n")
    with pytest.raises(ValueError, match=r"conf/head: `head.activation` has no comment"):
        hook.parameters_markdown(conf)


CITING = ["pipeline", "bench", "tests", "conf", "examples", "docs/hooks", "dvc.yaml", "pyproject.toml", ".ci"]
CITATION = re.compile(r'docs/([\w-]+\.md)(?: "([^"]+)")?')


def code_and_config() -> dict[str, str]:
    """The text of every file of code and configuration, its line breaks as spaces
    (a citation may be wrapped), by name."""
    names = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", *CITING],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    texts = {}
    for name in names:
        path = REPO / name
        if path.suffix in {".py", ".yaml", ".yml", ".toml", ""} and path.is_file():
            texts[name] = re.sub(r"\s+", " ", path.read_text(encoding="utf-8", errors="replace"))
    return texts


def test_every_docs_page_and_section_the_code_cites_exists():
    texts = code_and_config()
    citations = [(name, *cited) for name, text in texts.items() for cited in CITATION.findall(text)]
    assert len(citations) > 30  # the code does cite them
    for name, page, section in citations:
        assert (DOCS / page).is_file(), f"{name} cites docs/{page}, which does not exist"
        if section:
            headings = re.findall(r"^#+ (.+)$", (DOCS / page).read_text(encoding="utf-8"), re.MULTILINE)
            assert section in headings, f'{name} cites docs/{page} "{section}", not a heading there'


def test_no_code_cites_a_readme_section():
    """The README is a front page; what it used to hold lives on the docs pages."""
    assert [name for name, text in code_and_config().items() if re.search(r'README ["]', text)] == []


def test_every_page_is_in_the_navigation():
    nav = yaml.safe_load((REPO / "mkdocs.yml").read_text())["nav"]
    listed = set(re.findall(r"[\w-]+\.md", str(nav)))
    assert listed == {page.name for page in DOCS.glob("*.md")}


def test_the_readme_keeps_the_getting_started_commands():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    commands = code_blocks("getting-started.md", "sh")[0]  # the first block: the two commands
    assert f"```sh\n{commands}```" in readme
    assert len(readme.splitlines()) <= 150


@pytest.mark.slow
def test_the_python_api_pages_example_runs(demo_project, tmp_path):
    project = copy_project(demo_project, tmp_path / "project")
    (example,) = code_blocks("api.md", "python")
    (project / "example.py").write_text(example)
    result = run([sys.executable, "example.py"], project)
    assert "fruit" in result.stdout  # the apple's top labels
    assert (project / "models/Fruit.mlpackage").is_dir() and (project / "models/Fruit.onnx").is_file()
    assert (project / "models/fruit.ckpt").is_file()


def stages_run(output: str) -> set[str]:
    return set(re.findall(r"Running stage '(\w+)'", output))


@pytest.mark.slow
def test_the_getting_started_commands_run_as_the_page_says(demo_project, tmp_path):
    """Every command of the page after the install, in order, in the demo project; a
    `dvc repro` whose comment says what reruns must rerun exactly that."""
    project = copy_project(demo_project, tmp_path / "project")
    blocks = [block for block in code_blocks("getting-started.md", "sh") if "pip install" not in block]
    lines = [line for block in blocks for line in block.splitlines() if line.strip()]
    assert any("dvc repro" in line for line in lines)
    for line in lines:
        command, _, comment = line.partition("#")
        result = subprocess.run(
            ["bash", "-c", command], cwd=project, env=project_env(), capture_output=True, text=True
        )
        assert result.returncode == 0, f"{command}:\n{result.stdout}\n{result.stderr}"
        if rerun := re.search(r"reruns (\w+) only", comment):
            assert stages_run(result.stdout) == {rerun[1]}, command
        if "nothing runs" in comment:
            assert stages_run(result.stdout) == set(), command
