import os
import shutil
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.features.backbone import export_feature_extractor
from pipeline.features.cache import FeatureCache
from pipeline.project.config import CONF_DIR, compose_config, output_overrides

REPO = CONF_DIR.parent


@pytest.fixture
def cfg_factory(tmp_path):
    """Hydra config from conf/ with every path moved under tmp_path."""

    def make(*overrides: str):
        return compose_config(*output_overrides(tmp_path / "out"), *overrides)

    return make


@pytest.fixture(scope="session")
def exported_backbone(tmp_path_factory) -> Path:
    """The default extractor exported for onnxruntime once per session: the export takes seconds."""
    path = tmp_path_factory.mktemp("onnx") / "backbone.onnx"
    export_feature_extractor(compose_config().extractor, path)
    return path


def with_exported_backbone(cfg, exported: Path):
    """`cfg`, its feature cache holding the session's exported default backbone."""
    with FeatureCache(cfg.paths.feature_cache, cfg.extractor, cfg.extract.crop_and_scale) as cache:
        shutil.copy(exported, cache.onnx_backbone)
    return cfg


def write_image(path: Path, colour: tuple[int, int, int], seed: int, size: int = 320) -> Path:
    """A distinct, classifiable image: a label's colour with per-image noise."""
    rng = np.random.default_rng(seed)
    pixels = np.clip(np.array(colour) + rng.normal(0, 25, (size, size, 3)), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return path


COLOURS = {"red": (200, 40, 40), "green": (40, 180, 60), "blue": (40, 60, 200)}


def make_dataset(
    root: Path, per_label: int, labels=tuple(COLOURS), start: int = 0, size: int = 320
) -> list[Path]:
    return [
        write_image(
            root / label / f"{label}_{i}.png",
            COLOURS[label],
            seed=zlib.crc32(f"{label}-{i}".encode()),
            size=size,
        )
        for label in labels
        for i in range(start, start + per_label)
    ]


# Headless Chromium (Debian's), for the report and the app: nothing reaches beyond this machine.
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def project_env() -> dict[str, str]:
    """The environment a user's shell would have: venv first, local MLflow store."""
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    env.update(
        GIT_AUTHOR_NAME="test",
        GIT_AUTHOR_EMAIL="test@example.com",
        GIT_COMMITTER_NAME="test",
        GIT_COMMITTER_EMAIL="test@example.com",
        TQDM_DISABLE="1",
    )
    return env


def run(args: list[str], cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(args, cwd=cwd, env=project_env(), capture_output=True, text=True)
    if check and result.returncode != 0:
        raise AssertionError(
            f"{' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
        )
    return result


def fresh_clone(target: Path) -> Path:
    """The project's files as a fresh clone has them (tracked plus new, unignored)."""
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.split("\n")
    for name in filter(None, files):
        if (REPO / name).is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, target / name)
    run(["git", "init", "-q"], target)
    run(["git", "add", "-A"], target)
    run(["git", "commit", "-qm", "fresh clone"], target)
    return target


@pytest.fixture(scope="session")
def demo_project(tmp_path_factory) -> Path:
    """A fresh clone after the README's `dvc repro` on the demo data. Read only:
    tests that change it work on a copy (`copy_project`)."""
    project = fresh_clone(tmp_path_factory.mktemp("demo"))
    project_repro_output[project] = run(["dvc", "repro"], project).stdout
    return project


project_repro_output: dict[Path, str] = {}


def copy_project(source: Path, target: Path) -> Path:
    shutil.copytree(source, target, symlinks=True)
    return target
