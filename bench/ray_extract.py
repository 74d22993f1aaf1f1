"""The Ray engine against the local one (docs/scaling-out.md), in one run on the same
images and the same machine. Run from the project root:

    python bench/ray_extract.py               # 500 images, a few minutes on 2 CPU cores
    python bench/ray_extract.py --images 200  # a quicker look

Images are the demo set's, copied with flips, quarter turns and a pixel of their own
so that each has its own content, into a temporary folder. A two-node cluster of
one CPU each is started on this machine (tests/ray_cluster.py, every port on
loopback), so both engines share the same two cores: the ratio is Ray's overhead,
not a cluster's gain. Reported:

1. images/s of the local engine (extract.workers = auto) and of the Ray engine,
   each filling an empty feature cache, end to end (the Ray figure includes
   connecting, shipping the code and backbone, and starting the actors), and the
   ratio;
2. the seconds from `ray start --head` to a second node joined;
3. peak memory: the Ray processes' resident sets summed (psutil, sampled every
   0.1 s), beside the driver's and the local run's own peak.
"""

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import psutil
from PIL import Image, ImageOps

ROOT = Path(__file__).resolve().parent.parent
sys.path[0:1] = [str(ROOT), str(ROOT / "tests")]  # the project root instead of bench/; tests/ for the cluster

from ray_cluster import LOOPBACK_ONLY, two_node_cluster  # noqa: E402

os.environ.update(LOOPBACK_ONLY)  # before ray is imported: this driver too talks to 127.0.0.1

from pipeline.features.cache import FeatureCache  # noqa: E402
from pipeline.features.extraction import fill_cache, wanted_entries  # noqa: E402
from pipeline.project.config import compose_config  # noqa: E402

DEMO = sorted((ROOT / "data/demo").rglob("*.jpg"))
TURNS = [
    lambda im: im,
    ImageOps.mirror,
    ImageOps.flip,
    lambda im: im.rotate(90, expand=True),
    lambda im: im.rotate(270, expand=True),
]


def build_images(folder: Path, count: int) -> list[dict]:
    """`count` distinct images as split rows (path, content hash, split)."""
    rows = []
    for index in range(count):
        with Image.open(DEMO[index % len(DEMO)]) as source:
            image = TURNS[(index // len(DEMO)) % len(TURNS)](source.convert("RGB"))
        image.putpixel((0, 0), (index % 256, index // 256 % 256, 7))  # its own content, whatever the turn
        path = folder / f"{index:05d}.jpg"
        image.save(path, quality=90)
        rows.append(
            {"path": str(path), "sha256": hashlib.sha256(path.read_bytes()).hexdigest(), "split": "test"}
        )
    return rows


class PeakRSS:
    """The largest value `measure` returned, sampled every 0.1 s on a thread."""

    def __init__(self, measure: Callable[[], int]):
        self.measure, self.peak, self._stop = measure, 0, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.measure())
            time.sleep(0.1)

    def __enter__(self) -> "PeakRSS":
        self._thread.start()
        return self

    def __exit__(self, *_) -> None:
        self._stop.set()
        self._thread.join()


def timed_fill(rows: list[dict], cache_root: Path, *overrides: str) -> float:
    """Seconds to fill an empty cache with every row's features."""
    cfg = compose_config("augment.flip=0", *overrides)
    with FeatureCache(cache_root, cfg.extractor, cfg.extract.crop_and_scale) as cache:
        started = time.perf_counter()
        failed = fill_cache(wanted_entries(rows, []), cfg, cache)
        seconds = time.perf_counter() - started
        assert not failed and all(row["sha256"] in cache for row in rows)
    return seconds


def main() -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--images", type=int, default=500)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ray-extract-bench-"))
    try:
        (work / "images").mkdir()
        rows = build_images(work / "images", args.images)
        # the backbone exported once, for both engines: its export is neither's work
        cfg = compose_config()
        with FeatureCache(work / "export", cfg.extractor, cfg.extract.crop_and_scale) as cache:
            from pipeline.features.runtime import exported_onnx

            onnx = exported_onnx(cfg.extractor, cache.onnx_backbone)
        for name in ("local", "ray"):
            target = work / name / cache.dir.name
            target.mkdir(parents=True)
            shutil.copy(onnx, target / onnx.name)

        me = psutil.Process()
        with PeakRSS(lambda: me.memory_info().rss) as local_memory:
            local_s = timed_fill(rows, work / "local")
        with (
            two_node_cluster() as cluster,
            PeakRSS(cluster.rss) as ray_memory,
            PeakRSS(lambda: me.memory_info().rss) as driver_memory,
        ):
            ray_s = timed_fill(
                rows, work / "ray", "extract.engine=ray", f"extract.ray_address={cluster.address}"
            )
            startup_s = cluster.startup_s
        figures = {
            "images": len(rows),
            "cpus": os.cpu_count(),
            "local_images_per_s": round(len(rows) / local_s, 1),
            "ray_images_per_s": round(len(rows) / ray_s, 1),
            "ray_over_local": round(local_s / ray_s, 2),
            "ray_cluster_startup_s": round(startup_s, 1),
            "ray_processes_peak_rss_mib": round(ray_memory.peak / 2**20),
            "local_run_peak_rss_mib": round(local_memory.peak / 2**20),
            "ray_driver_peak_rss_mib": round(driver_memory.peak / 2**20),
        }
        print(json.dumps(figures, indent=2))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
