"""Backbone features for every image of a split and for the augmented copies of
its training images (docs/pipeline.md): the work of `extract`, and what `train`,
`evaluate` and the Python API call to get a feature table.

Each image is decoded and run through the backbone once per extractor and
augmentation, ever: features are cached by content hash, so new images are the
only work. Batches are decoded and extracted on a pool of worker threads, a
bounded number ahead of the cache writes, so memory does not grow with the dataset.
"""

import hashlib
import io
import logging
import os
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
from omegaconf import DictConfig
from tqdm import tqdm

from pipeline.data.images import DataError, follow_pixel_limit, load_rgb, to_square
from pipeline.data.split_file import Split, SplitRow, load_split, recorded_digest, split_digest
from pipeline.data.storage import read_bytes
from pipeline.features.augment import Copy, augmented, planned_copies
from pipeline.features.cache import DamagedEntry, FeatureCache, extractor_fingerprint
from pipeline.features.runtime import Runner, open_runner
from pipeline.features.table import ROW_COLUMNS, FeatureTable, TableMeta, load_table
from pipeline.project.config import show_progress

log = logging.getLogger(__name__)

MAX_WORKERS = 8  # each holds a batch of pixels and its activations
STALE = "rerun split (dvc repro)"  # the end of a reason that makes the split itself out of date


@dataclass(frozen=True)
class Job:
    """One image to decode, and the cache entries (original and copies) it is missing."""

    sha256: str
    path: str
    entries: tuple[tuple[str, Copy | None], ...]


def entry_key(sha256: str, copy: Copy | None) -> str:
    return sha256 if copy is None else f"{sha256}-{copy.key}"


Entry = tuple[SplitRow, Copy | None]  # a split row, and which copy of it (None: the original)


def wanted_entries(rows: list[SplitRow], copies: list[Copy]) -> list[Entry]:
    """Every row's original, and the copies of training rows only."""
    return [(row, copy) for row in rows for copy in [None, *(copies if row["split"] == "train" else [])]]


def missing_jobs(entries: list[Entry], cache: FeatureCache) -> list[Job]:
    missing: dict[str, dict] = {}
    for row, copy in entries:
        key = entry_key(row["sha256"], copy)
        if key not in cache:
            # the same content under two names is decoded once
            job = missing.setdefault(row["sha256"], {"path": row["path"], "entries": {}})
            job["entries"][key] = copy
    return [Job(sha, job["path"], tuple(job["entries"].items())) for sha, job in missing.items()]


def batches_of(jobs: list[Job], size: int) -> Iterator[list[Job]]:
    """Jobs grouped so that each group has about `size` entries to extract."""
    batch, entries = [], 0
    for job in jobs:
        batch.append(job)
        entries += len(job.entries)
        if entries >= size:
            yield batch
            batch, entries = [], 0
    if batch:
        yield batch


def features_of(
    jobs: list[Job], size: int, crop_and_scale: str, runner: Runner
) -> tuple[dict[str, np.ndarray], list[dict]]:
    """Decode, augment and run the backbone on one batch: (the features by cache key,
    the images that failed to decode). What each engine's worker does with a batch,
    a thread here or a Ray actor (pipeline/features/ray_engine.py), so that both
    fill the cache with the same numbers.

    Features are cached under the content hash the split recorded, so the bytes are
    checked against it first: an image replaced since `split` would otherwise store
    its new pixels' features under the old content's hash, for good.
    """
    keys, pixels, failed = [], [], []
    for job in jobs:
        try:
            content = read_bytes(job.path)  # a local file or an s3:// object
        except OSError as error:  # deleted or unreadable since split
            failed.append({"path": job.path, "reason": f"cannot read ({error.strerror}): {STALE}"})
            continue
        if hashlib.sha256(content).hexdigest() != job.sha256:
            failed.append({"path": job.path, "reason": f"changed since split: {STALE}"})
            continue
        try:
            image = to_square(load_rgb(io.BytesIO(content), min_side=size), size, crop_and_scale)
        except Exception as error:  # a file that passed split's checks but does not decode now
            failed.append({"path": job.path, "reason": f"cannot decode ({error})"})
            continue
        for key, copy in job.entries:
            keys.append(key)
            pixels.append(image if copy is None else augmented(image, job.sha256, copy))
    vectors = dict(zip(keys, runner(np.stack(pixels)), strict=True)) if pixels else {}
    return vectors, failed


def extract_batch(
    jobs: list[Job], size: int, crop_and_scale: str, runner: Runner, cache: FeatureCache
) -> list[dict]:
    """One batch's features, cached in one transaction: a worker thread's whole task.
    Returns the images that failed to decode."""
    vectors, failed = features_of(jobs, size, crop_and_scale, runner)
    if vectors:
        cache.put(vectors)
    return failed


def in_order(pool: ThreadPoolExecutor, task: Callable, items: Iterable, ahead: int) -> Iterator:
    """pool.map that submits at most `ahead` items beyond the one being waited for."""
    pending = deque()
    for item in items:
        pending.append(pool.submit(task, item))
        if len(pending) > ahead:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def worker_count(setting: str | int) -> int:
    return min(os.cpu_count() or 1, MAX_WORKERS) if setting == "auto" else int(setting)


def fill_cache(entries: list[Entry], cfg: DictConfig, cache: FeatureCache) -> list[dict]:
    """Extract the features not cached yet, here or on a Ray cluster (extract.engine,
    docs/scaling-out.md); returns the images that failed to decode. Either engine
    fills the same cache, so each extracts only what the other has not."""
    jobs = missing_jobs(entries, cache)
    follow_pixel_limit(cfg.data.max_image_pixels)  # decode what split let through
    if not jobs:
        log.info("all %d feature vectors were cached", len(entries))
        return []
    total, started = entry_count(jobs), time.perf_counter()
    if cfg.extract.engine == "ray":
        from pipeline.features.ray_engine import extract_on_ray  # imports ray: only runs that use it pay

        runtime, failed = extract_on_ray(jobs, cfg, cache)
    else:
        runtime, failed = extract_here(jobs, cfg, cache)
    seconds = time.perf_counter() - started
    log.info(
        "extracted %d new feature vectors with %s in %.1f s (%.1f img/s)",
        total,
        runtime,
        seconds,
        total / seconds,
    )
    return failed


def entry_count(jobs: list[Job]) -> int:
    """Feature vectors the jobs make: an image and each of its augmented copies."""
    return sum(len(job.entries) for job in jobs)


def progress(jobs: list[Job], runtime: str) -> tqdm:
    return tqdm(total=entry_count(jobs), unit="img", desc=f"extract ({runtime})", disable=not show_progress())


def extract_here(jobs: list[Job], cfg: DictConfig, cache: FeatureCache) -> tuple[str, list[dict]]:
    """The local engine: (the runtime used, the images that failed to decode).

    Each worker thread decodes a batch and runs the backbone on it, single-threaded
    on a CPU: on 2 cores that beats one decoder thread feeding a backbone that uses
    both (bench/extract.py), because no core waits for the other mid-batch.
    """
    workers = worker_count(cfg.extract.workers)
    threads = max(1, (os.cpu_count() or 1) // workers)
    runtime, runner = open_runner(cfg.extractor, cfg.extract.runtime, cache.onnx_backbone, threads)
    task = partial(
        extract_batch,
        size=cfg.extractor.input_size,
        crop_and_scale=cfg.extract.crop_and_scale,
        runner=runner,
        cache=cache,
    )
    failed = []
    with ThreadPoolExecutor(workers) as pool, progress(jobs, runtime) as bar:
        batches = list(batches_of(jobs, cfg.extract.batch_size))
        for batch, batch_failed in zip(batches, in_order(pool, task, batches, ahead=workers), strict=True):
            failed += batch_failed
            bar.update(entry_count(batch))
    return runtime, failed


def cached_features(cfg: DictConfig, wanted: list[Entry]) -> tuple[np.ndarray, list[Entry], list[dict], dict]:
    """Features of the `wanted` entries that decode, extracting those not cached yet:
    (features, those entries, the images that failed to decode, the extractor's description)."""
    with FeatureCache(cfg.paths.feature_cache, cfg.extractor, cfg.extract.crop_and_scale) as cache:
        failed = fill_cache(wanted, cfg, cache)
        stop_if_stale(failed)
        vectors, damaged = read_cached(cache, [entry_key(row["sha256"], copy) for row, copy in wanted])
        if damaged:
            log.warning("%d damaged entries in %s: extracting them again", len(damaged), cache.dir)
            cache.drop(damaged)
            failed = fill_cache(wanted, cfg, cache)  # tries the failed ones again too
            vectors.update(read_cached(cache, damaged)[0])
        entries = [(row, copy) for row, copy in wanted if entry_key(row["sha256"], copy) in vectors]
        features = np.stack([vectors[entry_key(row["sha256"], copy)] for row, copy in entries])
        return features, entries, failed, {**cache.about, "dim": features.shape[1]}


def stop_if_stale(failed: list[dict]) -> None:
    """Training on what is left would drop images the split promised."""
    stale = [item for item in failed if item["reason"].endswith(STALE)]
    if stale:
        more = f" (and {len(stale) - 1} more)" if len(stale) > 1 else ""
        raise DataError(f"{stale[0]['path']}: {stale[0]['reason']}{more}")


def read_cached(cache: FeatureCache, keys: list[str]) -> tuple[dict[str, np.ndarray], list[str]]:
    """The vectors of the cached `keys`, each read once, and the keys whose entry is damaged."""
    vectors, damaged = {}, []
    for key in keys:
        if key in cache:
            try:
                vectors[key] = cache.get(key)
            except DamagedEntry:
                damaged.append(key)
    return vectors, damaged


def build_table(cfg: DictConfig, split: Split) -> FeatureTable:
    """The features of every usable image in `split` and of the training images'
    copies, with what made them. Copies have the `copy` column set."""
    copies = planned_copies(cfg.augment)
    features, entries, failed, extractor = cached_features(cfg, wanted_entries(split["images"], copies))
    for item in failed:
        log.warning("skipped %s: %s", item["path"], item["reason"])
    labels = split["labels"]
    return FeatureTable(
        features=features,
        label_index=np.array([labels.index(row["label"]) for row, _ in entries]),
        split=np.array([row["split"] for row, _ in entries]),
        path=np.array([row["path"] for row, _ in entries]),
        sha256=np.array([row["sha256"] for row, _ in entries]),
        copy=np.array(["" if copy is None else copy.key for _, copy in entries]),
        meta=TableMeta(
            extractor=extractor,
            labels=labels,
            split_sha256=split_digest(split),
            copies=[copy.key for copy in copies],
            skipped=failed,
        ),
    )


def features_for(cfg: DictConfig, columns: Sequence[str] = ROW_COLUMNS) -> FeatureTable:
    """The feature table for cfg's extractor, augmentations and the current split
    (the stage's saved one with only `columns` read, see load_table).

    The stage's saved table when it matches; otherwise built from the cache,
    extracting what is missing, so `python -m pipeline.train +extractor=v2`
    works before any v2 extraction ran.
    """
    # the summary's digest, not the whole split: a million rows as Python dicts would
    # cost more memory than the batch of vectors `train` holds
    path, digest = Path(cfg.paths.features), recorded_digest(cfg.paths.split)
    if path.exists():
        try:
            table = load_table(path, columns)
        except DataError as error:  # the stage's output, damaged or from an older version: rebuilt
            log.warning("%s", error)
            return build_table(cfg, load_split(cfg.paths.split, cfg.paths.split_table))
        meta = table["meta"]
        fingerprint = extractor_fingerprint(cfg.extractor, cfg.extract.crop_and_scale)
        if (
            meta["extractor"]["fingerprint"] == fingerprint
            and meta["split_sha256"] == digest
            and meta.get("copies") == [copy.key for copy in planned_copies(cfg.augment)]
        ):
            return table
    log.info("%s does not match this config and split: building it from the cache", path)
    return build_table(cfg, load_split(cfg.paths.split, cfg.paths.split_table))
