"""Test accuracy of the pipeline under each option set, against the reference linear
probe (bench/probe.py) measured in the same run, on the benchmark sets of
bench/datasets.py. Run from the project root:

    python bench/datasets.py                      # once: builds the sets (see its docstring)
    python bench/accuracy.py                      # every set, every option set
    python bench/accuracy.py --quick              # 2 sets, 4 option sets: a rough look
    python bench/accuracy.py --datasets objects,emoji
    python bench/accuracy.py --reshuffles 3       # and on 3 other train/test draws of each set

The pipeline runs in this process, stage by stage (split, extract, train, evaluate),
exactly as `python -m pipeline.<stage>` would with the same overrides, its outputs
under --workdir. One feature cache serves every run, so each image is extracted once
per extractor and preprocessing. An option the configuration does not know (yet) is
skipped with a note. Figures are accuracies on each set's test folder and their
difference to the probe, in points; wall times only compare sets within one run. The
probe with C chosen by cross-validation is printed too (bench/probe.py says why it is
not the yardstick).

One test image is 0.4 to 1.7 points of a set's figure, so a difference of a point or
two on the test folders can be one lucky draw. `--reshuffles N` measures everything
again on N reshuffled splits of each set (its images dealt into train and test again,
as many test images per label as its test folder has, numbered variants of one
drawing kept together as bench/datasets.py keeps them) and prints their mean as a
second table: an option that wins on both is worth a default. Features are cached by
content, the probe's too, so the draws only train the heads again. Each set's line
"probe's errors" then tells a lucky test folder from an easy one: the probe's error
rate on the test folder, and in the draws on the images from each folder.
"""

import argparse
import json
import logging
import os
import random
import re
import shutil
import sys
import time
from collections import defaultdict
from pathlib import Path

import mlflow
import numpy as np

# The project root instead of bench/: bench/datasets.py must not shadow a library called datasets.
sys.path[0] = str(Path(__file__).resolve().parent.parent)
os.environ.pop(
    "MLFLOW_TRACKING_URI", None
)  # it would beat our per-bench store (pipeline/project/tracking.py)
os.environ["CI"] = "1"  # pipeline.project.config.show_progress: no progress bars between the table's lines

from bench import datasets  # noqa: E402
from bench.probe import Probe  # noqa: E402
from pipeline import evaluate, extract, split, train  # noqa: E402
from pipeline.project.config import compose_config, output_overrides  # noqa: E402

STAGES = (split, extract, train, evaluate)  # convert adds nothing to accuracy

# name -> Hydra overrides. Each changes one thing against the defaults, except the last, which changes two.
OPTIONS = {
    "default": [],  # scaleFill, mirrored copies, the cross-validated logistic head, v2
    "centerCrop": ["extract.crop_and_scale=centerCrop"],
    "scaleFit": ["extract.crop_and_scale=scaleFit"],
    "head=mlp": ["head=mlp"],
    "flip=0": ["augment.flip=0"],
    "crop=1": ["augment.crop=1"],
    "exposure=1": ["augment.exposure=1"],
    "rotate=1": ["augment.rotate=1"],
    "extractor=v1": ["extractor=v1"],
    "scaleFit+mlp": ["extract.crop_and_scale=scaleFit", "head=mlp"],  # the two that won the draws
}
QUICK_OPTIONS = ["default", "centerCrop", "scaleFit", "flip=0"]
QUICK_DATASETS = ["demo", "objects"]
PROBE = "probe (lite0)"
PROBE_CV = "probe, CV'd C"  # the same, C by 5-fold cross-validation: shown, not the yardstick


def store_uri(workdir: Path) -> str:
    """One MLflow store for the whole bench: each new SQLite store costs seconds of migrations."""
    return f"sqlite:///{workdir / 'mlflow.db'}"


def keep_artifacts_in(workdir: Path) -> None:
    """Create the experiment with its artifacts under `workdir`: left to itself, MLflow puts
    a new SQLite store's artifacts in ./mlruns of the current folder (the project's)."""
    experiment = compose_config().mlflow.experiment
    mlflow.set_tracking_uri(store_uri(workdir))
    if mlflow.get_experiment_by_name(experiment) is None:
        mlflow.create_experiment(experiment, artifact_location=(workdir / "mlruns").as_uri())


def configure(outdir: Path, dataset: Path, workdir: Path, overrides: list[str]):
    """The composed config of one run: outputs under `outdir`, the shared cache and store."""
    return compose_config(
        *output_overrides(outdir),
        f"data.train_dir={dataset / 'train'}",
        f"data.test_dir={dataset / 'test'}",
        f"paths.feature_cache={workdir / 'feature_cache'}",
        f"mlflow.tracking_uri={store_uri(workdir)}",
        *overrides,
    )


def rejected(overrides: list[str]) -> str | None:
    """Why conf/ refuses these overrides (an option not added yet), or None."""
    try:
        compose_config(*overrides)
    except Exception as error:  # Hydra raises several types for unknown keys and groups
        return str(error).splitlines()[0]
    return None


def run_pipeline(cfg, log_file: Path) -> float:
    """Test accuracy after split, extract, train, evaluate; their logs go to `log_file`."""
    handler = logging.FileHandler(log_file)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        for stage in STAGES:
            stage.run(cfg)
    finally:
        root.removeHandler(handler)
        handler.close()
    return json.loads(Path(cfg.paths.metrics).read_text())["test"]["accuracy"]


def quiet_logging() -> None:
    """Everything the stages and libraries log goes to each run's log file, not the terminal."""
    logging.captureWarnings(True)  # Lightning's and sklearn's warnings too
    logging.getLogger().setLevel(logging.INFO)
    for name in logging.root.manager.loggerDict:
        logger = logging.getLogger(name)
        logger.handlers = [h for h in logger.handlers if not isinstance(h, logging.StreamHandler)]
        logger.propagate = True
    logging.lastResort = None  # a warning with no handler would otherwise reach stderr


def slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-")


def bench_dataset(
    name: str, folder: Path, options: list[str], workdir: Path, probe: Probe
) -> tuple[dict[str, float], dict[Path, bool]]:
    """{row name: test accuracy} for the probe and each available option set, and
    which test images the probe got right."""
    answers, cv_answers = probe.answers(folder, choices=(False, True))
    results = {}
    for row, found in ((PROBE, answers), (PROBE_CV, cv_answers)):
        results[row] = float(np.mean(list(found.values())))
        print(f"  {row:14s} {100 * results[row]:5.1f}", flush=True)
    for option in options:
        outdir = workdir / name / slug(option)
        shutil.rmtree(outdir, ignore_errors=True)
        outdir.mkdir(parents=True)
        started = time.perf_counter()
        try:
            results[option] = run_pipeline(
                configure(outdir, folder, workdir, OPTIONS[option]), outdir / "run.log"
            )
        except Exception as error:  # one broken option must not lose the others' figures
            print(
                f"  {option:14s} FAILED: {type(error).__name__}: {str(error).splitlines()[0]} (see {outdir})"
            )
            continue
        print(
            f"  {option:14s} {100 * results[option]:5.1f}  ({time.perf_counter() - started:.0f} s)",
            flush=True,
        )
    return results, answers


def probe_errors_by_origin(folder_answers: dict[Path, bool], draw_answers: list[dict[Path, bool]]) -> str:
    """Is the test folder lucky, or are its images easier? The probe's error rate on
    the test folder, and in the draws on the images that came from each folder (a
    draw's link is named after its image's folder: `test-...`, `train-...`)."""
    wrong, tested = defaultdict(int), defaultdict(int)
    for answers in draw_answers:
        for link, right in answers.items():
            origin = link.name.split("-", 1)[0]
            wrong[origin] += not right
            tested[origin] += 1
    in_draws = ", ".join(
        f"{100 * wrong[origin] / tested[origin]:.1f} % of the {origin} folder's ({tested[origin]} tested)"
        for origin in ("test", "train")
        if tested[origin]
    )
    on_folder = 100 * (1 - np.mean(list(folder_answers.values())))
    return f"  probe's errors: {on_folder:.1f} % on the test folder; in the draws' tests, {in_draws}"


def reshuffled(name: str, folder: Path, seed: int, workdir: Path) -> Path:
    """`folder`'s images dealt into train and test again as bench/datasets.py dealt
    them, each label's test as large as its test folder, a drawing's variants on one
    side; hard links where the disk allows (the pipeline takes no symbolic links to
    files elsewhere)."""
    target = workdir / "reshuffled" / f"{name}-{seed}"
    shutil.rmtree(target, ignore_errors=True)
    rng = random.Random(seed)
    for label, count in datasets.counts(folder).items():
        groups = defaultdict(list)
        for part in ("train", "test"):
            for path in sorted((folder / part / label).rglob("*")):
                if path.is_file():
                    groups[datasets.drawing_group(path)].append((part, path))
        train, test = datasets.deal(groups, count["test"], rng)
        for side, dealt in (("train", train), ("test", test)):
            for part, path in dealt:
                link = target / side / label / f"{part}-{path.name}"  # a name from each folder may repeat
                link.parent.mkdir(parents=True, exist_ok=True)
                try:
                    link.hardlink_to(path)
                except OSError:  # another file system
                    shutil.copy2(path, link)
    return target


def cell(accuracy: float | None, probe: float | None) -> str:
    """A table cell: the accuracy, and its difference to the probe's unless it is the probe's."""
    if accuracy is None:
        return f"{'-':>16s}"
    if probe is None:
        return f"{100 * accuracy:16.1f}"
    return f"{100 * accuracy:8.1f} ({100 * (accuracy - probe):+5.1f})"


def print_table(results: dict[str, dict[str, float]], rows: list[str], title: str) -> None:
    names = list(results)
    print(f"\n{title}, %  (difference to the probe in points)\n{'':16s}", end="")
    print("".join(f"{name:>16s}" for name in names) + f"{'mean':>16s}")
    for row in [PROBE, PROBE_CV, *rows]:
        cells = [
            cell(results[name].get(row), None if row == PROBE else results[name][PROBE]) for name in names
        ]
        if all(row in results[name] for name in names):  # a mean only over the same sets as the probe's
            mean = np.mean([results[name][row] for name in names])
            probe_mean = np.mean([results[name][PROBE] for name in names])
            cells.append(cell(mean, None if row == PROBE else probe_mean))
        print(f"{row:16s}" + "".join(cells))


def mean_of(draws: list[dict[str, float]]) -> dict[str, float]:
    """{row: mean accuracy over the draws}, for the rows every draw has."""
    return {row: float(np.mean([d[row] for d in draws])) for row in draws[0] if all(row in d for d in draws)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help=f"sets {QUICK_DATASETS}, options {QUICK_OPTIONS}"
    )
    parser.add_argument("--datasets", help=f"comma-separated, from {', '.join(datasets.NAMES)}")
    parser.add_argument("--options", help=f"comma-separated, from {', '.join(OPTIONS)}")
    parser.add_argument("--root", type=Path, default=datasets.DEFAULT_ROOT, help="where the sets are built")
    parser.add_argument("--sources", type=Path, default=datasets.DEFAULT_SOURCES, help="the unpacked .debs")
    parser.add_argument(
        "--workdir", type=Path, default=datasets.DEFAULT_ROOT / "accuracy", help="runs, cache"
    )
    parser.add_argument("--fresh", action="store_true", help="empty the feature cache first")
    parser.add_argument("--reshuffles", type=int, default=0, help="reshuffled train/test draws per set, too")
    args = parser.parse_args()
    names = (args.datasets or ",".join(QUICK_DATASETS if args.quick else datasets.NAMES)).split(",")
    wanted = args.options.split(",") if args.options else QUICK_OPTIONS if args.quick else list(OPTIONS)
    if unknown := [name for name in [*names, *wanted] if name not in [*datasets.NAMES, *OPTIONS]]:
        sys.exit(f"unknown set or option {', '.join(unknown)}: see --help")
    workdir = args.workdir.resolve()
    if args.fresh:
        shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        folders = {name: datasets.ensure(name, args.root, args.sources).resolve() for name in names}
    except datasets.MissingSource as error:
        sys.exit(str(error))

    options = []
    for option in wanted:
        if reason := rejected(OPTIONS[option]):
            print(f"note: option {option} skipped, the configuration rejects it: {reason}")
        else:
            options.append(option)
    quiet_logging()
    keep_artifacts_in(workdir)
    probe = Probe("lite0")
    results, seconds, draws = {}, {}, {name: [] for name in names}
    for name, folder in folders.items():
        print(f"\n{datasets.describe(name, folder)}", flush=True)
        started = time.perf_counter()
        results[name], folder_answers = bench_dataset(name, folder, options, workdir, probe)
        draw_answers = []
        for seed in range(1, args.reshuffles + 1):
            print(f"  reshuffled, draw {seed}:", flush=True)
            draw = reshuffled(name, folder, seed, workdir)
            draw_results, answers = bench_dataset(f"{name}-draw{seed}", draw, options, workdir, probe)
            draws[name].append(draw_results)
            draw_answers.append(answers)
        if draw_answers:
            print(probe_errors_by_origin(folder_answers, draw_answers), flush=True)
        seconds[name] = time.perf_counter() - started
    print_table(results, options, "test accuracy on the test folders")
    if args.reshuffles:
        title = f"test accuracy, mean of {args.reshuffles} reshuffled splits"
        print_table({name: mean_of(draws[name]) for name in names}, options, title)
    times = ", ".join(f"{name} {seconds[name]:.0f} s" for name in names)
    print(f"\nwall time per set (the probe and every option set, this run): {times}")
    print(
        f"probe: lite0, the whole image squashed to 224x224, LogisticRegression(max_iter=1000) "
        f"(bench/probe.py); {PROBE_CV}: LogisticRegressionCV(Cs=10, cv=5); runs and their logs: {workdir}"
    )


if __name__ == "__main__":
    main()
