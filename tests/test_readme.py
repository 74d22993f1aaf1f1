"""The README's install commands (README, the opening commands and "No NVIDIA GPU"):
one environment, made once; the CPU build of PyTorch before the project, from its index."""

import re

from conftest import REPO

README = (REPO / "README.md").read_text(encoding="utf-8")


def shell_blocks() -> list[list[str]]:
    """Each ```sh block's commands, comments and blank lines left out."""
    blocks = re.findall(r"```sh\n(.*?)```", README, flags=re.DOTALL)
    return [
        [
            line.split("  #")[0].strip()
            for line in block.splitlines()
            if line.strip() and not line.startswith("#")
        ]
        for block in blocks
    ]


def test_the_opening_commands_make_the_environment_once_and_test_in_it():
    repro, tests = shell_blocks()[0]
    assert (
        "python3 -m venv .venv" in repro
        and 'pip install -e ".[dev]"' in repro
        and repro.endswith("dvc repro")
    )
    assert tests == ". .venv/bin/activate && pytest"  # no second venv, no second install


def test_the_cpu_install_takes_torch_and_torchvision_from_pytorchs_cpu_index_first():
    (block,) = [
        block for block in shell_blocks() if any("download.pytorch.org/whl/cpu" in line for line in block)
    ]
    cpu = next(i for i, line in enumerate(block) if "download.pytorch.org/whl/cpu" in line)
    project = next(i for i, line in enumerate(block) if 'pip install -e ".[dev]"' in line)
    assert block[0].startswith("python3 -m venv .venv") and cpu < project  # else pip takes CUDA torch first
    assert re.search(
        r"pip install torch torchvision --index-url https://download\.pytorch\.org/whl/cpu", block[cpu]
    )
