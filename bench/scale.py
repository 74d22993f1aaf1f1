"""Growth with the number of images: time and peak memory of `split`, `train` and
`evaluate`, and of a `dvc status` with nothing to do, at N images, for several N,
with the growth ratios between consecutive sizes. Run from the project root:

    python bench/scale.py                                # N = 10,000 and 100,000 (a few minutes)
    python bench/scale.py --sizes 10000 100000 1000000   # the million takes long, and memory

No image is decoded: for each N the bench writes, into a fresh clone of the
project under bench/.data/scale/N, what extraction would have produced:
- manifests (`python -m pipeline.manifest`'s format) of N training images and N/10
  test images in 10 labels, every row pointing at one small real image per label
  (the report's thumbnails need files) with its own made-up content hash;
- then runs `split` on them, and writes the feature store (`artifacts/features/`)
  that the split implies: 1280-wide float32 vectors, each label's a noisy copy of
  its own centre, so that training has something to learn (no augmented copies);
- then runs `train` and `evaluate` as the stages run, each in its own process, and
  `dvc status`. Peak memory is each process's maximum resident set (GNU time).
"""

import argparse
import hashlib
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path[0:1] = [str(ROOT), str(ROOT / "tests")]  # the project root instead of bench/; tests/ for fresh_clone

from conftest import fresh_clone, project_env  # noqa: E402

from pipeline.data.manifest import Manifest, save_manifest  # noqa: E402
from pipeline.data.split_file import load_split, split_digest  # noqa: E402
from pipeline.features.cache import describe  # noqa: E402
from pipeline.features.table import FeatureTable, TableMeta, save_table  # noqa: E402
from pipeline.project.config import compose_config  # noqa: E402

LABELS = [f"label{i}" for i in range(10)]
DIM = 1280
STAGES = ("split", "train", "evaluate")


def write_manifests(project: Path, n: int) -> None:
    data = project / "data/scale"
    for i, label in enumerate(LABELS):
        image = data / "images" / f"{label}.png"
        image.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (320, 320), (25 * i, 255 - 25 * i, 128)).save(image)
    for name, count in (("train", n), ("test", max(n // 10, len(LABELS)))):
        rows = [
            {
                "path": f"data/scale/images/{LABELS[i % len(LABELS)]}.png",
                "label": LABELS[i % len(LABELS)],
                "sha256": hashlib.sha256(f"{name}-{i}".encode()).hexdigest(),
                "size": 1000,
                "mtime_ns": 0,
                "width": 320,
                "height": 320,
            }
            for i in range(count)
        ]
        save_manifest(data / f"{name}.parquet", Manifest(str(data / name), rows, []))


def write_store(project: Path) -> None:
    """The feature store `extract` would have written for the project's split."""
    cfg = compose_config(f"data.train_dir={project}/data/scale/train.parquet")
    split = load_split(project / cfg.paths.split, project / cfg.paths.split_table)
    rows = split["images"]
    labels = np.array([split["labels"].index(row["label"]) for row in rows])
    centres = np.random.default_rng(0).normal(0, 1, (len(split["labels"]), DIM)).astype(np.float32)
    features = np.empty((len(rows), DIM), np.float32)
    rng = np.random.default_rng(1)
    for start in range(0, len(rows), 50_000):  # in chunks: the noise alone would double the memory
        part = slice(start, start + 50_000)
        features[part] = centres[labels[part]] + rng.normal(0, 4, (len(labels[part]), DIM)).astype(np.float32)
    table = FeatureTable(
        features=np.maximum(features, 0),  # EfficientNet's pooled features are not negative
        label_index=labels,
        split=np.array([row["split"] for row in rows]),
        path=np.array([row["path"] for row in rows]),
        sha256=np.array([row["sha256"] for row in rows]),
        copy=np.array([""] * len(rows)),
        meta=TableMeta(
            extractor={**describe(cfg.extractor, cfg.extract.crop_and_scale), "dim": DIM},
            labels=split["labels"],
            split_sha256=split_digest(split),
            copies=[],
            skipped=[],
        ),
    )
    save_table(project / cfg.paths.features, table)


def timed(command: list[str], project: Path) -> tuple[float, float]:
    """Wall seconds and peak resident MB of `command` (GNU time's %M)."""
    start = time.perf_counter()
    result = subprocess.run(
        ["/usr/bin/time", "-f", "peak-kb %M", *command],
        cwd=project,
        env=project_env(),
        capture_output=True,
        text=True,
    )
    seconds = time.perf_counter() - start
    if result.returncode != 0 and command[0] != "dvc":
        raise SystemExit(f"{' '.join(command)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    peak_kb = int(re.findall(r"peak-kb (\d+)", result.stderr)[-1])
    return seconds, peak_kb / 1024


def measure(n: int, workdir: Path) -> dict[str, tuple[float, float]]:
    project = workdir / str(n)
    shutil.rmtree(project, ignore_errors=True)
    project.parent.mkdir(parents=True, exist_ok=True)
    fresh_clone(project)
    write_manifests(project, n)
    overrides = [
        "data.train_dir=data/scale/train.parquet",
        "data.test_dir=data/scale/test.parquet",
        "augment.flip=0",
    ]
    subprocess.run(
        [sys.executable, "-m", "pipeline.params", *overrides], cwd=project, env=project_env(), check=True
    )
    here = [*overrides, "hydra.run.dir=."]  # the pipeline's own paths, as dvc repro writes them
    figures = {"split": timed([sys.executable, "-m", "pipeline.split", *here], project)}
    write_store(project)
    for stage in ("train", "evaluate"):
        figures[stage] = timed([sys.executable, "-m", f"pipeline.{stage}", *here], project)
    figures["dvc status"] = timed(["dvc", "status"], project)
    store = project / "artifacts/features"
    figures["feature store"] = (0.0, sum(f.stat().st_size for f in store.rglob("*") if f.is_file()) / 2**20)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--workdir", type=Path, default=ROOT / "bench/.data/scale")
    args = parser.parse_args()
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    results = {}
    for n in args.sizes:
        print(f"N = {n:,} ...", flush=True)
        results[n] = measure(n, args.workdir)
    print(f"\n{'':14}" + "".join(f"{f'N = {n:,}':>26}" for n in args.sizes) + "   growth (last / first)")
    for name in results[args.sizes[0]]:
        cells = "".join(f"{results[n][name][0]:>10.1f} s {results[n][name][1]:>9.0f} MB" for n in args.sizes)
        first, last = results[args.sizes[0]][name], results[args.sizes[-1]][name]
        growth = f"time x{last[0] / max(first[0], 1e-9):.1f}, " if first[0] else ""
        print(f"{name:<14}{cells}   {growth}MB x{last[1] / max(first[1], 1e-9):.1f}")
    print("(feature store: its size on disk; peak memory: each process's maximum resident set, GNU time)")
    if len(args.sizes) > 1:
        print_growth_against_one_batch(results, *args.sizes[-2:])


def print_growth_against_one_batch(results: dict, smaller: int, larger: int) -> None:
    """The bar: from one size to the next, no stage's peak memory grows by more than
    the feature vectors it holds in one batch (`train.feature_batch_rows` of them)."""
    batch = compose_config().train.feature_batch_rows * DIM * 4 / 2**20
    print(f"\npeak memory growth, N = {smaller:,} -> {larger:,}, against one feature batch ({batch:.0f} MB)")
    for stage in STAGES:
        growth = results[larger][stage][1] - results[smaller][stage][1]
        verdict = "ok" if growth <= batch else "OVER"
        print(f"  {stage:<10}{growth:>+8.0f} MB  {growth / batch:5.2f} of a batch  {verdict}")


if __name__ == "__main__":
    main()
