"""Running the feature extractor: onnxruntime on a CPU, torch on CUDA or Apple MPS.

On this project's 2-core reference machine onnxruntime runs EfficientNet-Lite0
about 8x faster than torch eager (bench/extract.py). torch is imported only
when a GPU is there or the ONNX graph must be exported: the import alone takes
seconds, most of an incremental run that finds nearly everything cached.
"""

import logging
import platform
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime
from omegaconf import DictConfig

log = logging.getLogger(__name__)

Runner = Callable[[np.ndarray], np.ndarray]  # (B, S, S, 3) uint8 pixels -> (B, D) float32 features


def gpu_may_be_present() -> bool:
    """A cheap first look, so that CPU-only machines never import torch to ask."""
    apple_silicon = sys.platform == "darwin" and platform.machine() == "arm64"
    return apple_silicon or any(Path("/dev").glob("nvidia[0-9]*"))


def choose_runtime(requested: str) -> str:
    if requested not in ("auto", "onnxruntime", "torch"):
        raise ValueError(f"extract.runtime must be auto, onnxruntime or torch, not {requested!r}")
    if requested != "auto":
        return requested
    if gpu_may_be_present():
        from pipeline.features.backbone import pick_device

        if pick_device().type != "cpu":
            return "torch"
    return "onnxruntime"


def exported_onnx(extractor: DictConfig, path: Path) -> Path:
    """`path`, the extractor exported there first if it is not yet (once per extractor)."""
    if not path.exists():
        from pipeline.features.backbone import export_feature_extractor

        log.info("exporting %s to %s for onnxruntime (once per extractor)", extractor.name, path)
        export_feature_extractor(extractor, path)
    return path


def onnx_runner(extractor: DictConfig, path: Path, threads: int = 0) -> Runner:
    """`threads` per call (0: onnxruntime's choice); calls may run concurrently."""
    return onnx_session_runner(str(exported_onnx(extractor, path)), threads)


def onnx_session_runner(model: str | bytes, threads: int) -> Runner:
    """A runner for an ONNX graph given by its file name, or by its bytes (a Ray
    actor gets them from the driver: the cluster's nodes need not share its disk)."""
    options = onnxruntime.SessionOptions()
    # Idle onnxruntime threads spin by default, taking the cores the decoding threads need.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.intra_op_num_threads = threads
    session = onnxruntime.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    return lambda pixels: session.run(None, {"pixels": pixels})[0]


def torch_runner(extractor: DictConfig) -> Runner:
    import torch

    from pipeline.features.backbone import feature_extractor, pick_device

    device = pick_device()
    model = feature_extractor(extractor).to(device)

    def run(pixels: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model(torch.from_numpy(pixels).to(device)).float().cpu().numpy()

    return run


def open_runner(extractor: DictConfig, requested: str, onnx_path: Path, threads: int) -> tuple[str, Runner]:
    runtime = choose_runtime(requested)
    runner = (
        onnx_runner(extractor, onnx_path, threads) if runtime == "onnxruntime" else torch_runner(extractor)
    )
    return runtime, runner
