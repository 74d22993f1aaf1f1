"""`extract.engine: ray` (docs/scaling-out.md): the missing features extracted by a
Ray Data job on a cluster, written by this process into the same feature cache the
local engine fills, so either engine extracts only what neither has.

Each actor holds the backbone once and runs the local engine's per-batch function
(extraction.features_of) on the images it reads by path: the same decoding,
geometry and augmentations, hence the same numbers. Only this process writes the
cache, one SQLite transaction per returned block, so a node lost mid-run leaves
whole blocks or nothing, as a killed local run does.

Imported only when extract.engine is ray: the import of ray takes seconds.
"""

import logging
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import ray
from omegaconf import DictConfig, OmegaConf
from ray.exceptions import RayError

import pipeline
from pipeline.data.images import DataError, SettingError, follow_pixel_limit
from pipeline.data.storage import is_s3
from pipeline.features.augment import Copy, planned_copies
from pipeline.features.cache import FeatureCache
from pipeline.features.extraction import Job, entry_count, entry_key, features_of, progress
from pipeline.features.runtime import exported_onnx, onnx_session_runner, torch_runner

log = logging.getLogger(__name__)

# One core per CPU actor, its onnxruntime single-threaded: as with the local engine's
# threads, many one-core workers beat fewer that each wait on their own decoding.
ACTOR_CPUS = 1
# ray.init retries an address where nothing listens for a minute or more, in many log lines
CONNECT_TIMEOUT_S = 10


def cluster_address(cfg: DictConfig) -> str:
    address = cfg.extract.ray_address or os.environ.get("RAY_ADDRESS")
    if not address:
        raise SettingError("extract.ray_address = None: extract.engine = ray needs it (or RAY_ADDRESS)")
    return address


def check_reachable(address: str) -> None:
    """One line, within seconds, when nothing listens at a host:port address
    (ray:// client addresses too); other forms (`auto`) are left to ray.init."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as error:
        raise unreachable(address, error.strerror or type(error).__name__) from None


def unreachable(address: str, reason: str) -> SettingError:
    return SettingError(f"extract.ray_address = {address!r}: no Ray cluster answers there ({reason})")


@contextmanager
def connected(address: str) -> Iterator[None]:
    """Connected to the cluster at `address` as a driver, and disconnected after.

    The driver's own `pipeline` package travels with the job (py_modules): the
    geometry the nodes apply is this checkout's, whatever version they have installed.
    """
    check_reachable(address)
    try:
        ray.init(
            address=address,
            log_to_driver=False,
            logging_level=logging.WARNING,
            runtime_env={"py_modules": [str(Path(pipeline.__file__).parent)]},
        )
    except (ConnectionError, TimeoutError, ValueError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise unreachable(address, reason) from None
    log.info("connected to the Ray cluster at %s", address)
    try:
        yield
    finally:
        ray.shutdown()


class BatchExtractor:
    """A Ray Data actor: the backbone loaded once, then batch after batch of jobs
    (one row each) turned into their feature vectors."""

    def __init__(
        self,
        extractor: dict,
        runtime: str,
        onnx_model: bytes | None,
        crop_and_scale: str,
        copies: list[Copy],
        max_image_pixels: int,
    ):
        follow_pixel_limit(max_image_pixels)
        extractor = OmegaConf.create(extractor)
        if runtime == "onnxruntime":
            # intra-op threads: the cores Ray gave this actor, no more (it shares the node)
            threads = int(ray.get_runtime_context().get_assigned_resources().get("CPU", ACTOR_CPUS))
            self.runner = onnx_session_runner(onnx_model, max(1, threads))
        else:
            self.runner = torch_runner(extractor)
        self.size, self.crop_and_scale = extractor.input_size, crop_and_scale
        self.copies = {copy.key: copy for copy in copies}

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        jobs = [
            Job(sha, path, tuple((entry_key(sha, self.copies.get(c)), self.copies.get(c)) for c in copies))
            for sha, path, copies in zip(batch["sha256"], batch["path"], batch["copies"], strict=True)
        ]
        vectors, failed = features_of(jobs, self.size, self.crop_and_scale, self.runner)
        reasons = {item["path"]: item["reason"] for item in failed}
        return {
            "sha256": [job.sha256 for job in jobs],
            "keys": [[key for key, _ in job.entries] for job in jobs],
            "vectors": [job_vectors(job, vectors) for job in jobs],
            "reason": [reasons.get(job.path, "") for job in jobs],
        }


def job_vectors(job: Job, vectors: dict[str, np.ndarray]) -> bytes:
    """A job's vectors, float32 as the backbone gave them, in one value: one column
    type for every row, whatever its number of copies (none for a failed image)."""
    kept = [np.asarray(vectors[key], np.float32) for key, _ in job.entries if key in vectors]
    return b"".join(vector.tobytes() for vector in kept)


def block_vectors(keys: np.ndarray, data: bytes) -> dict[str, np.ndarray]:
    return dict(zip(keys, np.frombuffer(data, np.float32).reshape(len(keys), -1), strict=True))


def job_rows(jobs: list[Job]) -> list[dict]:
    """The jobs as Ray Data rows; local paths absolute, since actors do not run in this
    folder (s3:// ones as they are: docs/scaling-out.md)."""
    return [
        {
            "sha256": job.sha256,
            "path": job.path if is_s3(job.path) else str(Path(job.path).absolute()),
            "copies": ["" if copy is None else copy.key for _, copy in job.entries],
        }
        for job in jobs
    ]


def cluster_runtime(requested: str) -> str:
    """torch where the cluster has GPUs (or when asked for), else onnxruntime."""
    if requested == "auto":
        return "torch" if ray.cluster_resources().get("GPU", 0) >= 1 else "onnxruntime"
    return requested


def failure(path: str, reason: str) -> dict:
    """A decoding failure; a file the nodes cannot read while it is right here is the
    cluster's problem, not the split's, and stops the run rather than skip the image."""
    if reason.startswith("cannot read") and Path(path).is_file():
        raise DataError(
            f"{path}: the Ray cluster's nodes cannot read it ({reason.split(':')[0]}): extract.engine = ray"
            " needs the images at the same path on every node (docs/scaling-out.md)"
        )
    return {"path": path, "reason": reason}


def extract_on_ray(jobs: list[Job], cfg: DictConfig, cache: FeatureCache) -> tuple[str, list[dict]]:
    """The Ray engine: (the runtime the actors used, the images that failed to decode)."""
    address = cluster_address(cfg)
    with connected(address):
        from ray.data import DataContext

        DataContext.get_current().enable_progress_bars = False  # ours counts images, not blocks
        runtime = cluster_runtime(cfg.extract.runtime)
        results = extraction(jobs, cfg, cache, runtime)
        paths, failed, done = {job.sha256: job.path for job in jobs}, [], 0
        with progress(jobs, f"{runtime} on ray") as bar:
            try:
                for block in results.iter_batches(batch_size=None, batch_format="numpy"):
                    vectors = {}
                    for sha, keys, data, reason in zip(
                        block["sha256"], block["keys"], block["vectors"], block["reason"], strict=True
                    ):
                        if reason:
                            failed.append(failure(paths[sha], reason))
                        else:
                            vectors.update(block_vectors(keys, data))
                    cache.put(vectors)  # one transaction per block: whole blocks or nothing
                    done += len(vectors)
                    bar.update(len(vectors))
            except RayError as error:  # what Ray's retries could not mend
                first = str(error).strip().splitlines()[0] if str(error).strip() else ""
                raise SettingError(
                    f"extract.ray_address = {address!r}: the cluster failed mid-run ({type(error).__name__}:"
                    f" {first}); the {done} vectors extracted are cached, run again for the rest"
                ) from None
    return runtime, failed


def extraction(jobs: list[Job], cfg: DictConfig, cache: FeatureCache, runtime: str) -> "ray.data.Dataset":
    """The Ray Data job (lazy): a row per job in, a row per job out, from actors that
    each hold the backbone."""
    resources, workers = actor_resources(runtime)
    onnx_model = None
    if runtime == "onnxruntime":  # sent to the actors: the nodes need not see this disk
        onnx_model = exported_onnx(cfg.extractor, cache.onnx_backbone).read_bytes()
    entries_per_job = entry_count(jobs) / len(jobs)
    log.info("extracting on the Ray cluster: up to %d %s actors", workers, runtime)
    return ray.data.from_items(job_rows(jobs)).map_batches(
        BatchExtractor,
        fn_constructor_kwargs={
            "extractor": OmegaConf.to_container(cfg.extractor, resolve=True),
            "runtime": runtime,
            "onnx_model": onnx_model,
            "crop_and_scale": cfg.extract.crop_and_scale,
            "copies": planned_copies(cfg.augment),
            "max_image_pixels": cfg.data.max_image_pixels,
        },
        # about extract.batch_size images per backbone call, copies included, as the local engine's
        batch_size=max(1, round(cfg.extract.batch_size / entries_per_job)),
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=workers),
        **resources,
    )


def actor_resources(runtime: str) -> tuple[dict, int]:
    """What each actor asks Ray for, and how many actors the cluster holds at once."""
    total = ray.cluster_resources()
    if runtime == "torch":
        return {"num_gpus": 1}, max(1, int(total.get("GPU", 0)))
    return {"num_cpus": ACTOR_CPUS}, max(1, int(total.get("CPU", 1)) // ACTOR_CPUS)
