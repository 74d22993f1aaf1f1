"""Hydra entry points shared by every stage."""

import gc
import json
import logging
import os
import re
import shutil
import sys
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import hydra
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from pipeline.data.images import DataError, SettingError
from pipeline.project.overrides import check_overrides, check_parameters
from pipeline.project.settings import check_settings

log = logging.getLogger("pipeline")

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
DVC_FILE = CONF_DIR.parent / "dvc.yaml"


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
    """Overrides that put every output path, and a stage's Hydra run folder, under `root`,
    for a run beside the project's."""
    paths = [f"paths.{key}={root / value}" for key, value in compose_config().paths.items()]
    return [*paths, f"hydra.run.dir={root}"]


def stage_outputs(stage: str) -> list[str]:
    """The `paths.*` keys that dvc.yaml declares `stage` writes (outs, metrics, plots)."""
    declared = yaml.safe_load(DVC_FILE.read_text(encoding="utf-8"))["stages"][stage]
    entries = json.dumps([declared.get(kind, []) for kind in ("outs", "metrics", "plots")])
    return sorted(set(re.findall(r"\$\{paths\.(\w+)\}", entries)))


def outputs_to_run_folder(cfg: DictConfig, stage: str) -> Path | None:
    """Outside `dvc repro`, a stage writes its outputs into Hydra's run folder
    (`outputs/<date>/<time>/`, a multirun's `multirun/<date>/<time>/<job>/`), where
    `dvc repro` owns the paths in params.yaml: a stage tried by hand, or a sweep's
    jobs, must not replace the pipeline's model (docs/pipeline.md). dvc.yaml's
    commands set the run folder to the project (conf/dvc_stage.yaml), as can a user
    with `hydra.run.dir=.`; absolute paths stay where they are. Returns the folder
    the outputs moved to, None where they stay."""
    folder = Path(HydraConfig.get().runtime.output_dir)
    if folder.resolve() == Path.cwd().resolve():
        return None
    for key in stage_outputs(stage):
        cfg.paths[key] = str(folder / cfg.paths[key])
    return folder


def drop_unused_run_folder() -> None:
    """Bad settings or data write nothing (docs/pipeline.md), yet Hydra makes the
    run folder before a stage starts: it goes again, with its date folder when empty,
    if it holds nothing but Hydra's record of the run (`.hydra/`)."""
    folder, here = Path(HydraConfig.get().runtime.output_dir).resolve(), Path.cwd().resolve()
    if folder == here or any(path.name != ".hydra" for path in folder.iterdir()):
        return
    shutil.rmtree(folder)
    for parent in folder.parents:
        if parent == here or here not in parent.parents or any(parent.iterdir()):
            break
        parent.rmdir()


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


def stage_entry(task: Callable[[DictConfig], None], stage: str | None = None) -> Callable[[], None]:
    """`python -m pipeline.<stage> [overrides]`: compose conf/ and run `task`.

    dvc.yaml adds `--config-name dvc_stage`, so DVC-run stages read params.yaml and
    write where dvc.yaml says; run otherwise, the dvc.yaml `stage` writes into its
    Hydra run folder. A door that is no stage (`stage` None) gets no run folder.
    """

    def task_or_exit(cfg: DictConfig) -> None:
        try:
            check_parameters(cfg, CONF_DIR)  # params.yaml may hold what `dvc exp run -S +name=...` added
            check_settings(cfg)
            folder = outputs_to_run_folder(cfg, stage) if stage is not None else None
            task(cfg)
        except (DataError, SettingError) as error:  # the user's data or settings: one line each, no traceback
            log.error("%s", error)
            drop_unused_run_folder()
            sys.exit(2)
        if folder is not None:
            log.info(
                "outside dvc repro: wrote into %s/ (hydra.run.dir=. writes the pipeline's own)",
                os.path.relpath(folder),
            )

    def main() -> None:
        sys.argv = [sys.argv[0], *checked_overrides(sys.argv[1:])]
        if stage is None:  # nothing of its own to write: no run folder
            sys.argv += ["hydra.run.dir=.", "hydra.output_subdir=null"]
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
