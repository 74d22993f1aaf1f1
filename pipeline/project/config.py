"""Hydra entry points shared by every stage."""

import gc
import logging
import os
import sys
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import hydra
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from pipeline.data.images import DataError, SettingError
from pipeline.project.overrides import check_overrides, check_parameters
from pipeline.project.settings import check_settings

log = logging.getLogger("pipeline")

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"


def accept_plus_for_defaulted_groups(argv: list[str]) -> list[str]:
    """Read `+extractor=v2` as `extractor=v2`.

    Hydra 1.3 refuses `+group=option` when the group already has a default, yet
    users type it (docs/pipeline.md: `python -m pipeline.train +extractor=v2`). Every group
    in conf/ has a default, so the append and the override mean the same thing.
    """
    groups = {path.name for path in CONF_DIR.iterdir() if path.is_dir()}
    return [arg[1:] if arg.startswith("+") and arg[1:].split("=", 1)[0] in groups else arg for arg in argv]


def checked_overrides(arguments: list[str]) -> list[str]:
    """A door's arguments, `+group=option` read as `group=option`; a parameter or group
    option conf/ does not have exits with code 2 and one line naming it and the nearest
    valid name (pipeline/project/overrides.py), before Hydra's several lines of its own."""
    arguments = accept_plus_for_defaulted_groups(arguments)
    # Hydra's overrides: `key=value`, `~key`; its flags start with `-` (`--config-name x`)
    overrides = [arg for arg in arguments if not arg.startswith("-") and ("=" in arg or arg.startswith("~"))]
    try:
        check_overrides(overrides, CONF_DIR)
    except SettingError as error:
        for line in str(error).splitlines():
            print(f"ERROR   {line}", file=sys.stderr)
        sys.exit(2)
    return arguments


def compose_config(*overrides: str) -> DictConfig:
    """conf/ composed outside a stage's entry point: the preview, tests, benchmarks."""
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=list(overrides))


def output_overrides(root: Path) -> list[str]:
    """Overrides that put every output path under `root`, for a run beside the project's."""
    return [f"paths.{key}={root / value}" for key, value in compose_config().paths.items()]


PROGRESS_BARS: dict[str, bool | None] = {"forced": None}  # None: decide by the terminal


def show_progress() -> bool:
    """Progress bars for people at a terminal; CI logs stay quiet. The Python API
    may force them either way (a notebook's output is no terminal)."""
    if PROGRESS_BARS["forced"] is not None:
        return PROGRESS_BARS["forced"]
    return sys.stderr.isatty() and not os.environ.get("CI")


@contextmanager
def progress_bars(enabled: bool | None):
    before, PROGRESS_BARS["forced"] = PROGRESS_BARS["forced"], enabled
    try:
        yield
    finally:
        PROGRESS_BARS["forced"] = before


def stage_entry(task: Callable[[DictConfig], None]) -> Callable[[], None]:
    """`python -m pipeline.<stage> [overrides]`: compose conf/ and run `task`.

    dvc.yaml adds `--config-name dvc_stage`, so DVC-run stages read params.yaml.
    """

    def task_or_exit(cfg: DictConfig) -> None:
        try:
            check_parameters(cfg, CONF_DIR)  # params.yaml may hold what `dvc exp run -S +name=...` added
            check_settings(cfg)
            task(cfg)
        except (DataError, SettingError) as error:  # the user's data or settings: one line each, no traceback
            log.error("%s", error)
            sys.exit(2)

    def main() -> None:
        sys.argv = [sys.argv[0], *checked_overrides(sys.argv[1:])]
        hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")(task_or_exit)()
        exit_without_final_collections()

    return main


def exit_without_final_collections() -> None:
    """Spare the process the garbage collections of interpreter shutdown.

    A stage's process holds torch, Lightning, MLflow, coremltools and their module
    graphs (about 600,000 tracked objects in `convert`), which the collections at
    shutdown walk again: 1.3-1.7 s per stage on 2 cores (2.0-3.4 s under load) from its
    last line to its exit, against 0.3-0.5 s with them frozen. What is garbage now is
    collected first, so its finalisers run; the atexit handlers (logging's flush,
    MLflow's end of run, coremltools' temporary folders) run as before; only objects
    still alive at exit are left to the operating system, whose finalisers Python
    does not promise to run at exit anyway.
    """
    gc.collect()
    gc.freeze()
