"""The install commands (README's opening commands; docs/getting-started.md's "No NVIDIA
GPU"): one environment; the CPU build of PyTorch before the project, from its index."""

import re

from conftest import REPO

README = (REPO / "README.md").read_text(encoding="utf-8")
GETTING_STARTED = (REPO / "docs/getting-started.md").read_text(encoding="utf-8")


def shell_blocks(page: str = README) -> list[list[str]]:
    """Each ```sh block's commands, comments and blank lines left out."""
    blocks = re.findall(r"```sh\n(.*?)```", page, flags=re.DOTALL)
    return [
        [
            line.split("  #")[0].strip()
            for line in block.splitlines()
            if line.strip() and not line.startswith("#")
        ]
        for block in blocks
    ]


def test_the_opening_commands_share_one_environment():
    """Each works on a fresh machine alone; after the first, the second finds its .venv
    and every package installed (pip installs nothing again)."""
    repro, tests = shell_blocks()[0]
    assert repro.startswith("python3 -m venv .venv &&") and repro.endswith(
        ' && pip install -e ".[dev]" && dvc repro'
    )
    assert tests == repro.removesuffix("dvc repro") + "pytest"


def test_the_cpu_install_takes_torch_and_torchvision_from_pytorchs_cpu_index_first():
    (block,) = [
        block
        for block in shell_blocks(GETTING_STARTED)
        if any("download.pytorch.org/whl/cpu" in line for line in block)
    ]
    cpu = next(i for i, line in enumerate(block) if "download.pytorch.org/whl/cpu" in line)
    project = next(i for i, line in enumerate(block) if 'pip install -e ".[dev]"' in line)
    assert block[0].startswith("python3 -m venv .venv") and cpu < project  # else pip takes CUDA torch first
    assert re.search(
        r"pip install torch torchvision --index-url https://download\.pytorch\.org/whl/cpu", block[cpu]
    )
