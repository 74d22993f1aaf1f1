"""Stage `extract`: backbone features for every image in the split (SPEC 3).

Each image is decoded and run through the backbone once per extractor, ever:
features are cached by content hash, so new images are the only work.
"""

import hashlib
import json
import logging
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from pipeline.backbone import PREPROCESSING, Normalize, extractor_fingerprint, load_backbone, pick_device
from pipeline.config import show_progress, stage_entry
from pipeline.feature_cache import FeatureCache
from pipeline.images import center_crop_square, load_rgb

log = logging.getLogger(__name__)


def describe(extractor: DictConfig, dim: int | None = None) -> dict:
    about = {**OmegaConf.to_container(extractor, resolve=True), "preprocessing": PREPROCESSING}
    about["fingerprint"] = extractor_fingerprint(extractor)
    if dim is not None:
        about["dim"] = dim
    return about


def open_cache(cfg: DictConfig) -> FeatureCache:
    about = describe(cfg.extractor)
    return FeatureCache(cfg.paths.feature_cache, f"{cfg.extractor.name}-{about['fingerprint']}", about)


def decode(path: str, size: int) -> np.ndarray | Exception:
    try:
        return center_crop_square(load_rgb(path, min_side=size), size)
    except Exception as error:  # a file that passed the header check but does not decode
        return error


def fill_cache(rows: list[dict], cfg: DictConfig, cache: FeatureCache) -> list[dict]:
    """Extract features for the images not cached yet; returns the ones that failed."""
    todo = list({row["sha256"]: row["path"] for row in rows if row["sha256"] not in cache}.items())
    if not todo:
        return []
    device = pick_device()
    size, batch_size = cfg.extractor.input_size, cfg.extractor.batch_size
    model = torch.nn.Sequential(
        Normalize(cfg.extractor.mean, cfg.extractor.std), load_backbone(cfg.extractor)
    )
    model = model.to(device)
    batches = [todo[i : i + batch_size] for i in range(0, len(todo), batch_size)]
    failed = []
    with (
        ThreadPoolExecutor() as pool,
        tqdm(total=len(todo), unit="img", desc="extract", disable=not show_progress()) as bar,
    ):

        def submit(batch: list[tuple[str, str]]) -> list[Future]:
            return [pool.submit(decode, path, size) for _, path in batch]

        # Decode the next batch while the backbone runs on this one; memory stays
        # at two batches of pixels whatever the dataset size.
        pending = submit(batches[0])
        for index, batch in enumerate(batches):
            decoded = [future.result() for future in pending]
            if index + 1 < len(batches):
                pending = submit(batches[index + 1])
            good = []
            for (sha, path), pixels in zip(batch, decoded, strict=True):
                if isinstance(pixels, Exception):
                    failed.append({"path": path, "reason": f"cannot decode ({pixels})"})
                else:
                    good.append((sha, pixels))
            if good:
                pixels = torch.from_numpy(np.stack([p for _, p in good])).permute(0, 3, 1, 2).float()
                with torch.inference_mode():
                    features = model(pixels.to(device)).cpu().numpy()
                for (sha, _), vector in zip(good, features, strict=True):
                    cache.put(sha, vector)
            bar.update(len(batch))
    return failed


def split_digest(split: dict) -> str:
    return hashlib.sha256(json.dumps(split["images"], sort_keys=True).encode()).hexdigest()


def build_table(cfg: DictConfig, split: dict) -> dict:
    """The features of every usable image in `split`, with what made them."""
    cache = open_cache(cfg)
    failed = fill_cache(split["images"], cfg, cache)
    for item in failed:
        log.warning("skipped %s: %s", item["path"], item["reason"])
    rows = [row for row in split["images"] if row["sha256"] in cache]
    labels = split["labels"]
    features = np.stack([cache.get(row["sha256"]) for row in rows])
    return {
        "features": features,
        "label_index": np.array([labels.index(row["label"]) for row in rows]),
        "split": np.array([row["split"] for row in rows]),
        "path": np.array([row["path"] for row in rows]),
        "meta": {
            "extractor": describe(cfg.extractor, dim=features.shape[1]),
            "labels": labels,
            "split_sha256": split_digest(split),
            "skipped": failed,
        },
    }


def save_table(path: str | Path, table: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {k: v for k, v in table.items() if k != "meta"}
    np.savez(path, meta=np.array(json.dumps(table["meta"], ensure_ascii=False)), **arrays)


def load_table(path: str | Path) -> dict:
    with np.load(path) as data:
        table = {k: data[k] for k in data.files if k != "meta"}
        table["meta"] = json.loads(str(data["meta"]))
    return table


def read_split(cfg: DictConfig) -> dict:
    return json.loads(Path(cfg.paths.split).read_text(encoding="utf-8"))


def features_for(cfg: DictConfig) -> dict:
    """The feature table for cfg's extractor and the current split.

    The stage's saved table when it matches; otherwise built from the cache,
    extracting what is missing, so `python -m pipeline.train +extractor=v2`
    works before any v2 extraction ran.
    """
    path, split = Path(cfg.paths.features), read_split(cfg)
    if path.exists():
        table = load_table(path)
        meta = table["meta"]
        if meta["extractor"]["fingerprint"] == extractor_fingerprint(cfg.extractor) and meta[
            "split_sha256"
        ] == split_digest(split):
            return table
    log.info("%s has no %s features for this split: building them from the cache", path, cfg.extractor.name)
    return build_table(cfg, split)


def run(cfg: DictConfig) -> None:
    table = build_table(cfg, read_split(cfg))
    save_table(cfg.paths.features, table)
    log.info("%d feature vectors of dimension %d (%s)", *table["features"].shape, cfg.extractor.name)


main = stage_entry(run)

if __name__ == "__main__":
    main()
