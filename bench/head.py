"""The head on 20,000 cached feature vectors: the default head's whole training
(`pipeline.train.fit_head`, its cross-validated choice of L2 strength included)
against ONE scikit-learn `LogisticRegression()` fit with its defaults, on the same
vectors, in one run. Run from the project root:

    apt-get download openclipart-png && dpkg -x openclipart-png_*.deb /tmp/oc
    python bench/head.py            # first run: builds, extracts ~21,000 vectors (4-6 minutes); later 1-2
    python bench/head.py --quick    # 5,000 vectors, one timing each
    python bench/head.py --clipart /tmp/oc/usr/share/openclipart/png --threads 1

The bar: ours takes no longer than scikit-learn (medians of 3 timings each, taken
alternately) and its test accuracy is not lower.

The features are real: the default extractor's (v2, 2,848 wide) features of openclipart
drawings, 34 categories, each drawing composited on white; 15 % of each category's
drawings (whole drawings, their numbered variants together) are the test set, the
rest train, with augmented copies (`augment.flip=3`, `augment.crop=2`,
`augment.exposure=1`, `augment.rotate=1`, made by the
pipeline's own `split` and `extract`, run in this process) to reach 20,000 training
vectors. Images, feature cache and the pipeline's outputs stay in bench/.data/head/,
so a second run extracts nothing. `--v1` times both on v1's 1,280 features instead,
which are the last columns of the default's (tests/test_extract.py checks it), so
nothing more is extracted.

Both sides run with the same threads (--threads; default: the libraries' own, one
per core). On a busy machine threads wait on descheduled siblings far longer than
they compute (100x on small problems), so the bench says when the load is high:
then --threads 1 gives the figures that mean something.
"""

import argparse
import hashlib
import logging
import os
import random
import re
import shutil
import statistics
import sys
import time
import warnings
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
# The project root instead of bench/: bench/datasets.py must not shadow a library called datasets.
sys.path[0] = str(ROOT)
os.environ.pop("MLFLOW_TRACKING_URI", None)
os.environ["CI"] = "1"  # pipeline.project.config.show_progress: no progress bars
os.environ["TQDM_DISABLE"] = "1"

import torch  # noqa: E402
from PIL import Image  # noqa: E402
from sklearn.exceptions import ConvergenceWarning  # noqa: E402
from sklearn.linear_model import LogisticRegression  # noqa: E402
from threadpoolctl import threadpool_limits  # noqa: E402

from bench.retrain import clipart_root, drawing_rgba, usable_drawings  # noqa: E402
from pipeline import extract, split  # noqa: E402
from pipeline.features.table import load_table  # noqa: E402
from pipeline.model.training import fit_head  # noqa: E402
from pipeline.project.config import compose_config, output_overrides  # noqa: E402

DATA = ROOT / "bench" / ".data" / "head"
# label -> (openclipart folder, its subfolders too): categories with at least 30
# distinct colour drawings that are not toolbar icons. Left out: people/stickmen,
# people/smilies and shapes/jigsaw (mostly one series each), special/gradients
# (palette files that render fully transparent).
LABELS = {
    "mammal": ("animals/mammals", True),
    "bird": ("animals/birds", True),
    "insect": ("animals/bugs", True),
    "animal": ("animals", False),
    "fruit": ("food/fruit", True),
    "dessert": ("food/desserts", True),
    "beverage": ("food/beverages", True),
    "food": ("food", False),
    "vehicle": ("transportation/vehicles", True),
    "transport": ("transportation", False),
    "pictogram": ("transportation/aiga-symbols", True),
    "road-sign": ("transportation/roadsigns", True),
    "music": ("recreation/music", True),
    "sport": ("recreation/sports", True),
    "party": ("recreation/party", True),
    "card": ("recreation/games/cards/simple", True),
    "person": ("people", False),
    "star": ("shapes/stars", True),
    "arrow": ("shapes/arrows", True),
    "shape": ("shapes", False),
    "flag": ("signs_and_symbols/flags", True),
    "map-symbol": ("signs_and_symbols/map_symbols", True),
    "sign": ("signs_and_symbols", False),
    "computer": ("computer", False),
    "hardware": ("computer/hardware", True),
    "button": ("computer/buttons", True),
    "icon": ("computer/icons", False),
    "action-icon": ("computer/icons/lemon-theme/actions", True),
    "app-icon": ("computer/icons/lemon-theme/apps", True),
    "file-icon": ("computer/icons/lemon-theme/mimetypes", True),
    "folder-icon": ("computer/icons/lemon-theme/filesystems", True),
    "office": ("office", True),
    "tool": ("tools", False),
    "map": ("geography", True),
}
MAX_PER_LABEL = 400  # shapes/stars alone has 1,378
MAX_PER_GROUP = 4  # a numbered series (`blueman_01` .. `_28`) would fill a label with one drawing
TEST_FRACTION = 0.15
SIDE = 320  # px, the longer side of each image written
# 7 copies of each of the ~2,600 training images: over 20,000 training vectors
AUGMENT = ["augment.flip=3", "augment.crop=2", "augment.exposure=1", "augment.rotate=1"]
QUICK_AUGMENT = ["augment.flip=1"]  # fewer vectors to extract the first time
SEED = 0
V1_DIM = 1280  # v1's features: the last layer's, the default's last columns


# --- the image set ----------------------------------------------------------------------


def drawings_of(clipart: Path, folder: str, recursive: bool) -> list[Path]:
    found = usable_drawings(clipart / folder)
    return found if recursive else [path for path in found if path.parent == clipart / folder]


def drawing_group(path: Path) -> str:
    """`eagle_01.png`, `eagle_02.png` -> `eagle`: variants of one drawing share a split."""
    return re.sub(r"[_\-\s\d]+$", "", path.stem.lower()) or path.stem


def on_white_jpeg(path: Path, target: Path) -> bytes:
    """The drawing composited on white, longer side SIDE, as a JPEG at `target`; its bytes."""
    image = drawing_rgba(path, SIDE)
    flat = Image.new("RGB", image.size, (255, 255, 255))
    flat.paste(image, mask=image.getchannel("A"))
    target.parent.mkdir(parents=True, exist_ok=True)
    flat.save(target, quality=90)
    return target.read_bytes()


def split_groups(paths: list[Path], rng: random.Random) -> dict[str, list[Path]]:
    """Whole drawing groups (at most MAX_PER_GROUP of each) in random order, into test
    until it holds TEST_FRACTION of the label, then into train, MAX_PER_LABEL in all."""
    groups = defaultdict(list)
    for path in sorted(paths):
        if len(groups[drawing_group(path)]) < MAX_PER_GROUP:
            groups[drawing_group(path)].append(path)
    order = sorted(groups)
    rng.shuffle(order)
    total = min(MAX_PER_LABEL, sum(len(members) for members in groups.values()))
    parts = {"test": [], "train": []}
    for group in order:
        part = "test" if len(parts["test"]) < TEST_FRACTION * total else "train"
        parts[part] += groups[group]
        if len(parts["test"]) + len(parts["train"]) >= total:
            break
    return parts


def build_images(clipart: Path, target: Path) -> Path:
    """`target/{train,test}/<label>/*.jpg`, built once. A drawing whose image is
    already in the set (the same file under two folders) is left out."""
    if (target / "complete").exists():
        return target
    shutil.rmtree(target, ignore_errors=True)
    rng, seen = random.Random(SEED), set()
    for label, (folder, recursive) in LABELS.items():
        for part, chosen in split_groups(drawings_of(clipart, folder, recursive), rng).items():
            for path in chosen:
                written = target / part / label / f"{path.stem}.jpg"
                while written.exists():  # one name in two subfolders
                    written = written.with_stem(written.stem + "_")
                digest = hashlib.sha256(on_white_jpeg(path, written)).hexdigest()
                if digest in seen:
                    written.unlink()
                seen.add(digest)
    (target / "complete").touch()
    return target


# --- the feature table ---------------------------------------------------------------------


def feature_table(images: Path, augment: list[str]) -> tuple[dict, object]:
    """The pipeline's own split and extract, in this process; the feature cache under
    DATA keeps every vector, so only the first run extracts."""
    cfg = compose_config(
        *output_overrides(DATA / "run"),
        f"data.train_dir={images / 'train'}",
        f"data.test_dir={images / 'test'}",
        *augment,
    )
    split.run(cfg)
    extract.run(cfg)
    return load_table(cfg.paths.features), cfg


def with_training_vectors(table: dict, count: int, seed: int) -> dict:
    """`table` with `count` training rows: every training original, then augmented
    copies drawn at random; validation and test rows as they are."""
    train = table["split"] == "train"
    originals = np.flatnonzero(train & (table["copy"] == ""))
    copies = np.flatnonzero(train & (table["copy"] != ""))
    wanted = max(0, count - len(originals))
    kept_copies = np.random.default_rng(seed).choice(copies, min(wanted, len(copies)), replace=False)
    keep = np.sort(np.concatenate([originals[:count], kept_copies, np.flatnonzero(~train)]))
    return {key: value if key == "meta" else value[keep] for key, value in table.items()}


# --- the two fits -----------------------------------------------------------------------------


@dataclass
class Fit:
    seconds: float
    accuracy: float
    note: str  # the chosen L2 strength, or whether lbfgs converged


def quiet_lightning() -> None:
    """Lightning's banner and tips would come between the figures."""
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")


def fit_ours(cfg, table: dict) -> Fit:
    started = time.perf_counter()
    head, strength = fit_head(cfg, table, [])
    seconds = time.perf_counter() - started
    test = table["split"] == "test"
    with torch.inference_mode():
        predicted = head(torch.from_numpy(table["features"][test])).argmax(dim=1).numpy()
    return Fit(seconds, float((predicted == table["label_index"][test]).mean()), f"L2 {strength:.1e}")


def fit_sklearn(table: dict) -> Fit:
    train, test = table["split"] == "train", table["split"] == "test"
    x, y = table["features"], table["label_index"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        started = time.perf_counter()
        model = LogisticRegression().fit(x[train], y[train])
        seconds = time.perf_counter() - started
    converged = not any(issubclass(w.category, ConvergenceWarning) for w in caught)
    note = "converged" if converged else f"stopped at max_iter={model.max_iter}, not converged"
    return Fit(seconds, float(model.score(x[test], y[test])), note)


def alternately(cfg, table: dict, repeats: int, threads: int) -> tuple[list[Fit], list[Fit]]:
    """Both fits `repeats` times, in turn, so that the machine's drift hits both alike."""
    ours, theirs = [], []
    with threadpool_limits(threads or None):
        if threads:
            torch.set_num_threads(threads)
        for _ in range(repeats):
            ours.append(fit_ours(cfg, table))
            theirs.append(fit_sklearn(table))
    return ours, theirs


def describe(name: str, fits: list[Fit]) -> str:
    times = ", ".join(f"{fit.seconds:.1f}" for fit in fits)
    return (
        f"   {name:8s} median {statistics.median(f.seconds for f in fits):6.2f} s ({times}), "
        f"test accuracy {fits[-1].accuracy:.3f}, {fits[-1].note}"
    )


def busy_note(threads: int) -> str | None:
    """A warning when other processes hold the cores and both sides run several threads:
    a thread waiting at a barrier for a descheduled sibling makes the timings mostly
    waiting (sklearn took 20 s instead of 0.15 s on 450 vectors at load 5 on 2 cores)."""
    load, cores = os.getloadavg()[0], os.cpu_count() or 1
    if threads == 1 or load < 0.75 * cores:
        return None
    return (
        f"   note: load average {load:.1f} on {cores} CPUs: multi-threaded timings mostly measure "
        f"waiting; try --threads 1"
    )


def compare(cfg, table: dict, repeats: int, threads: int = 0) -> bool:
    """Print both sides and the verdict; True when ours is no slower and no less accurate."""
    quiet_lightning()
    if note := busy_note(threads):
        print(note)
    ours, theirs = alternately(cfg, table, repeats, threads)
    train, test = table["split"] == "train", table["split"] == "test"
    print(
        f"   {int(train.sum())} training vectors ({int((table['copy'][train] != '').sum())} augmented "
        f"copies), dimension {table['features'].shape[1]}, {len(table['meta']['labels'])} labels, "
        f"{int(test.sum())} test images; threads: {threads or 'library defaults'}, "
        f"load average {os.getloadavg()[0]:.1f}"
    )
    print(describe("ours", ours))
    print(describe("sklearn", theirs))
    ratio = statistics.median(f.seconds for f in ours) / statistics.median(f.seconds for f in theirs)
    gap = ours[-1].accuracy - theirs[-1].accuracy
    ok = ratio <= 1 and gap >= 0
    print(
        f"   ours/sklearn {ratio:.2f}, accuracy {100 * gap:+.1f} points "
        f"(bar: ours <= sklearn and accuracy not lower: {'PASS' if ok else 'FAIL'})"
    )
    return ok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clipart", type=Path, help="openclipart's png folder (see above)")
    parser.add_argument("--quick", action="store_true", help="5,000 vectors, one timing each")
    parser.add_argument("--vectors", type=int, help="training vectors (default 20,000; 5,000 with --quick)")
    parser.add_argument("--repeats", type=int, help="timings of each side (default 3; 1 with --quick)")
    parser.add_argument("--threads", type=int, default=0, help="threads for both sides (0: library defaults)")
    parser.add_argument("--v1", action="store_true", help="v1's features: the default's last 1,280 columns")
    args = parser.parse_args()
    vectors = args.vectors or (5000 if args.quick else 20000)
    repeats = args.repeats or (1 if args.quick else 3)
    clipart = clipart_root(args.clipart)

    print(f"images from {clipart} into {DATA / 'images'} (first run only) ...", flush=True)
    started = time.perf_counter()
    images = build_images(clipart, DATA / "images")
    print("split and extract, in this process (only the first run extracts) ...", flush=True)
    logging.basicConfig(level=logging.ERROR, format="   %(name)s: %(message)s")
    logging.getLogger("pipeline.extract").setLevel(logging.INFO)  # how many vectors it extracted, how fast
    table, cfg = feature_table(images, QUICK_AUGMENT if args.quick else AUGMENT)
    print(f"   {time.perf_counter() - started:.0f} s")
    table = with_training_vectors(table, vectors, SEED)
    if args.v1:
        table["features"] = np.ascontiguousarray(table["features"][:, -V1_DIM:])

    print(
        f"\nthe default head (fit_head) against one LogisticRegression() fit, {repeats} times each, in turn"
    )
    compare(cfg, table, repeats, args.threads)


if __name__ == "__main__":
    main()
