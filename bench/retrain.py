"""Retraining cost: `dvc repro` after adding 20 images to 2,000, against the full run,
both in one fresh copy of the project, in one run. Run from the project root:

    apt-get download openclipart-png && dpkg -x openclipart-png_*.deb /tmp/oc
    python bench/retrain.py                 # 2-4 minutes on 2 CPU cores (1 more the first time)
    python bench/retrain.py --quick         # 500 images: a rough look (the bars are for 2,000)
    python bench/retrain.py --clipart DIR   # openclipart's png folder elsewhere

1. the wall time of each stage, of DVC itself and of the whole `dvc repro`, in the
   full run and after adding 20 images to existing labels, with the bars: the second
   run at most 25 % of the full one and at most 60 s, and `convert` at most 10 s
   when only the head changed; and, to see where the time goes, how long a process
   that only imports each stage's module takes, and how long each stage's process
   takes to exit after its last line (plus DVC hashing its outputs);
2. the head's training (`pipeline.train.fit_head`, the cross-validated choice of
   L2 strength included) against scikit-learn's `LogisticRegression()` with its
   defaults, on the project's training features, with both test accuracies.

The images are openclipart drawings (Debian's openclipart-png, 1:0.18+dfsg-19 when
this was written), 10 categories, each image one drawing placed at a seeded random
size and position on a white 320x320 canvas, saved as JPEG: ~90 % train, ~10 %
test, no drawing in both. The set is built once under --workdir and reused. The
fresh project is made as tests/conftest.py's `fresh_clone` makes it, its
conf/config.yaml pointed at the set, then `python -m pipeline.params` and `dvc repro`;
stage times come from the moments DVC's own lines arrive ("Running stage ...",
"Updating lock file"), each `dvc repro`'s log keeping them under --workdir.
"""

import argparse
import io
import os
import random
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
# The project root instead of bench/: bench/datasets.py must not shadow a library called datasets.
# tests/ after it: a fresh project is made the way the tests make theirs.
sys.path[0:1] = [str(ROOT), str(ROOT / "tests")]

from conftest import fresh_clone, project_env  # noqa: E402
from import_graph import imported_modules  # noqa: E402

CLIPART_CANDIDATES = (
    Path("/tmp/oc/usr/share/openclipart/png"),  # where the docstring's dpkg -x puts it
    Path("/tmp/bench-sources/usr/share/openclipart/png"),  # bench/datasets.py's --sources
)

# label -> openclipart folder (every drawing under it, subfolders included)
LABELS = {
    "animal": "animals",
    "building": "buildings",
    "flag": "signs_and_symbols/flags",
    "food": "food",
    "game": "recreation/games",
    "office": "office",
    "person": "people",
    "star": "shapes/stars",
    "tool": "tools",
    "vehicle": "transportation",
}
CANVAS = 320  # px; above Create ML's 299 px warning, and the backbone takes 224
MIN_SIDE = 64  # a drawing smaller than this is a toolbar icon
MAX_PIXELS = 25_000_000  # openclipart has 168-megapixel drawings: seconds each to decode, skipped
TEST_FRACTION = 0.1
STAGES = ("split", "extract", "train", "evaluate", "convert")
NEW_IMAGES = 20


# --- openclipart drawings on white (bench/head.py uses these too) -----------------------


def clipart_root(given: Path | None) -> Path:
    """The unpacked openclipart PNG folder, or exit with one line saying how to get it."""
    for candidate in [given] if given else CLIPART_CANDIDATES:
        if candidate.is_dir():
            return candidate
    where = given or CLIPART_CANDIDATES[0]
    sys.exit(
        f"openclipart not found at {where}: apt-get download openclipart-png && "
        f"dpkg -x openclipart-png_*.deb /tmp/oc (or pass --clipart DIR)"
    )


def usable_drawings(folder: Path) -> list[Path]:
    """Colour drawings under `folder` that are neither icons nor giant (header read only)."""
    Image.MAX_IMAGE_PIXELS = None  # our own trusted source; the size check is below
    kept = []
    for path in sorted(folder.rglob("*.png")):
        if "_bw" in path.name:  # black-and-white twins of colour drawings
            continue
        with Image.open(path) as image:
            width, height = image.size
        if max(width, height) >= MIN_SIDE and width * height <= MAX_PIXELS:
            kept.append(path)
    return kept


def drawing_rgba(path: Path, longest: int) -> Image.Image:
    """The drawing as RGBA, its longer side at most `longest`."""
    with Image.open(path) as image:
        image = image.convert("RGBA")
    image.thumbnail((longest, longest), Image.LANCZOS)
    return image


def on_white(drawing: Image.Image, rng: random.Random, canvas: int) -> Image.Image:
    """`drawing` at a random 60-95 % of the canvas, at a random spot on white: every
    placement is a distinct image, so a few hundred drawings make thousands of images."""
    scale = rng.uniform(0.6, 0.95) * canvas / max(drawing.size)
    size = (max(1, round(drawing.width * scale)), max(1, round(drawing.height * scale)))
    placed = drawing.resize(size, Image.BILINEAR)
    flat = Image.new("RGB", (canvas, canvas), (255, 255, 255))
    left, top = rng.randint(0, canvas - size[0]), rng.randint(0, canvas - size[1])
    flat.paste(placed, (left, top), mask=placed.getchannel("A"))
    return flat


def jpeg_bytes(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=85)
    return out.getvalue()


# --- the labelled set -------------------------------------------------------------------


@dataclass(frozen=True)
class ImageSet:
    train: Path
    test: Path
    new: Path  # images for existing labels, added before the second `dvc repro`


def build_label(drawings: list[Path], label: str, counts: dict[str, int], target: Path, seed: int) -> None:
    """`counts[part]` images of one label per part; test images come from their own drawings."""
    rng = random.Random(f"{seed}-{label}")
    order = drawings[:]
    rng.shuffle(order)
    held_out = max(1, round(TEST_FRACTION * len(order)))
    pools = {"test": order[:held_out], "train": order[held_out:], "new": order[held_out:]}
    offset = {"train": 0, "test": 0, "new": counts["train"]}  # new images continue train's sequence
    for part, count in counts.items():
        folder = target / part / label
        folder.mkdir(parents=True, exist_ok=True)
        pool = pools[part]
        loaded = {}
        for index in range(offset[part], offset[part] + count):
            path = pool[index % len(pool)]
            if path not in loaded:
                loaded[path] = drawing_rgba(path, CANVAS)
            placement = random.Random(f"{seed}-{label}-{part}-{index}")
            (folder / f"{label}_{index:04d}.jpg").write_bytes(
                jpeg_bytes(on_white(loaded[path], placement, CANVAS))
            )


def build_set(clipart: Path, total: int, seed: int, workdir: Path) -> ImageSet:
    """`total` images over LABELS (about 10 % test) plus NEW_IMAGES more, built once."""
    target = workdir / f"set-{total}-seed{seed}"
    if not (target / "complete").exists():
        shutil.rmtree(target, ignore_errors=True)
        per_label = total // len(LABELS)
        test = round(TEST_FRACTION * per_label)
        counts = {"train": per_label - test, "test": test, "new": NEW_IMAGES // len(LABELS)}
        for label, folder in LABELS.items():
            build_label(usable_drawings(clipart / folder), label, counts, target, seed)
        (target / "complete").touch()
    return ImageSet(target / "train", target / "test", target / "new")


# --- a fresh project and `dvc repro` in it ------------------------------------------------


def bench_env() -> dict[str, str]:
    """A user's shell as the tests make it, with unbuffered output so that DVC's lines
    arrive when they are printed (their arrival times are the stage timings)."""
    return {**project_env(), "PYTHONUNBUFFERED": "1"}


def run(args: list[str], cwd: Path) -> str:
    result = subprocess.run(args, cwd=cwd, env=bench_env(), capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"{' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result.stdout


def stamped_lines(command: list[str], cwd: Path) -> tuple[float, list[tuple[float, str]]]:
    """Run `command`; its wall time and each output line with the second it arrived."""
    started = time.perf_counter()
    process = subprocess.Popen(
        command, cwd=cwd, env=bench_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    lines = [(time.perf_counter() - started, line) for line in process.stdout]
    seconds = time.perf_counter() - started
    if process.wait() != 0:
        sys.exit(f"{' '.join(command)} failed in {cwd}:\n{''.join(line for _, line in lines)[-3000:]}")
    return seconds, lines


def link_images(source: Path, target: Path) -> None:
    """`source/<label>/*` into `target/<label>/` as hard links: no copies of the pixels."""
    for path in sorted(source.rglob("*.jpg")):
        link = target / path.relative_to(source)
        link.parent.mkdir(parents=True, exist_ok=True)
        os.link(path, link)


def point_config_at(project: Path, train: str, test: str) -> None:
    """`data.train_dir` and `data.test_dir` in conf/config.yaml, as docs/your-images.md says to."""
    config = project / "conf/config.yaml"
    text = config.read_text()
    for key, value in (("train_dir", train), ("test_dir", test)):
        text, found = re.subn(rf"^(  {key}:) \S+", rf"\1 {value}", text, count=1, flags=re.M)
        assert found, f"no data.{key} line in {config}"
    config.write_text(text)


@dataclass
class StageTime:
    seconds: float  # DVC's "Running stage" line to its "lock file" line
    tail: float  # the stage's last output line to that lock line: its exit, then DVC hashing outputs


@dataclass
class Repro:
    """One `dvc repro`: its wall time and that of each stage it ran."""

    seconds: float
    stages: dict[str, StageTime]

    @property
    def dvc_itself(self) -> float:
        """Start-up, checking what changed, and anything between stages."""
        return self.seconds - sum(stage.seconds for stage in self.stages.values())


def timed_repro(project: Path, log_file: Path) -> Repro:
    """`dvc repro`, each output line stamped as it arrives (the log keeps the stamps)."""
    seconds, stamped = stamped_lines(["dvc", "repro"], project)
    log_file.write_text("".join(f"{at:7.2f} {line}" for at, line in stamped))
    return Repro(seconds, stage_times(stamped, seconds))


def stage_times(stamped: list[tuple[float, str]], end: float) -> dict[str, StageTime]:
    times, current, since, last = {}, None, 0.0, 0.0
    for at, line in stamped:
        if current and ("lock file" in line or line.startswith("Running stage")):
            times[current], current = StageTime(at - since, at - last), None
        if match := re.match(r"Running stage '(\w+)'", line):
            current, since, last = match.group(1), at, at
        elif current and line.strip():
            last = at  # the stage's own output (and DVC's echo of its command)
    if current:
        times[current] = StageTime(end - since, end - last)
    return times


def import_seconds(project: Path, stage: str) -> float:
    """Wall time of a Python process that only imports what the stage imports, its
    door's function-level imports included (tests/import_graph.py): the part of the
    stage that does not depend on the data."""
    modules = sorted(imported_modules(f"pipeline.{stage}"))
    command = [sys.executable, "-c", f"import {', '.join(modules)}"]
    started = time.perf_counter()
    run(command, project)
    return time.perf_counter() - started


# --- the head against scikit-learn ----------------------------------------------------------


def head_against_sklearn(features_file: Path, threads: int) -> None:
    """fit_head and LogisticRegression() on the project's training rows, once each."""
    from bench.head import compare  # torch, Lightning and sklearn: only now
    from pipeline.features.table import load_table
    from pipeline.project.config import compose_config

    compare(compose_config(), load_table(features_file), repeats=1, threads=threads)


# --- the report ---------------------------------------------------------------------------


def bar(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def print_stage_table(first: Repro, second: Repro, imports: dict[str, float]) -> None:
    print("   imports: a process that imports the stage's module and exits; exit+hash: the stage's")
    print(
        f"   last output line to DVC's next line, in the +{NEW_IMAGES} run (the process exiting, DVC hashing)"
    )
    print(
        f"   {'stage':10s} {'full run':>9s} {f'+{NEW_IMAGES} images':>11s} {'imports':>8s} {'exit+hash':>10s}"
    )
    for stage in STAGES:
        cells = [
            f"{run.stages[stage].seconds:8.1f}s" if stage in run.stages else f"{'skipped':>9s}"
            for run in (first, second)
        ]
        tail = f"{second.stages[stage].tail:9.1f}s" if stage in second.stages else f"{'-':>10s}"
        print(f"   {stage:10s} {cells[0]:>9s} {cells[1]:>11s} {imports[stage]:7.1f}s {tail}")
    print(f"   {'dvc itself':10s} {first.dvc_itself:8.1f}s {second.dvc_itself:10.1f}s")
    print(f"   {'dvc repro':10s} {first.seconds:8.1f}s {second.seconds:10.1f}s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clipart", type=Path, help="openclipart's png folder (see above)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/bench-retrain"))
    parser.add_argument("--quick", action="store_true", help="500 images: rough figures")
    parser.add_argument("--seed", type=int, default=0, help="which drawings and placements")
    parser.add_argument("--threads", type=int, default=0, help="threads for 2. (0: library defaults)")
    args = parser.parse_args()
    total = 500 if args.quick else 2000
    clipart = clipart_root(args.clipart)

    print(f"building {total} + {NEW_IMAGES} images from {clipart} (first run only) ...", flush=True)
    images = build_set(clipart, total, args.seed, args.workdir)
    print("making a fresh clone of the project ...", flush=True)
    shutil.rmtree(args.workdir / "project", ignore_errors=True)
    project = fresh_clone(args.workdir / "project")
    link_images(images.train, project / "images/train")
    link_images(images.test, project / "images/test")
    point_config_at(project, "images/train", "images/test")
    run([sys.executable, "-m", "pipeline.params"], project)

    print("dvc repro, full run ...", flush=True)
    first = timed_repro(project, args.workdir / "repro-full.log")
    link_images(images.new, project / "images/train")
    print(f"dvc repro after adding {NEW_IMAGES} images to existing labels ...", flush=True)
    second = timed_repro(project, args.workdir / "repro-added.log")
    imports = {stage: import_seconds(project, stage) for stage in STAGES}

    print(
        f"\n1. dvc repro on {total} images (~10 % test), then again after adding {NEW_IMAGES} "
        f"(logs in {args.workdir})"
    )
    print_stage_table(first, second, imports)
    ratio = second.seconds / first.seconds
    convert = second.stages["convert"].seconds if "convert" in second.stages else 0.0
    print(f"   second / full: {ratio:.0%} (bar 25 %: {bar(ratio <= 0.25)})")
    print(f"   second run: {second.seconds:.1f} s (bar 60 s: {bar(second.seconds <= 60)})")
    print(f"   convert with only the head changed: {convert:.1f} s (bar 10 s: {bar(convert <= 10)})")
    if args.quick:
        print("   (--quick: the bars are meant for the 2000-image set)")

    print("\n2. the head's training on the project's features, against scikit-learn, in this process")
    head_against_sklearn(project / "artifacts/features", args.threads)


if __name__ == "__main__":
    main()
