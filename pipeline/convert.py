"""Stage `convert`: one Core ML model and its ONNX twin, backbone and head together,
taking a plain RGB image (docs/pipeline.md, docs/xcode-and-onnx.md); the
files are made in pipeline/model/model_files.py."""

import logging
from pathlib import Path

from omegaconf import DictConfig

from pipeline.project.config import stage_entry

log = logging.getLogger(__name__)


def run(cfg: DictConfig) -> None:
    # Imported here, once stage_entry has checked every setting: torch, Lightning,
    # MLflow and coremltools take seconds to import, and a bad setting must fail in under one.
    import mlflow

    from pipeline.model.checkpoint import load_checkpoint
    from pipeline.model.model_files import write_model_files
    from pipeline.model.serving import log_image_model
    from pipeline.project import tracking
    from pipeline.project.files import write_json

    head, checkpoint = load_checkpoint(cfg.paths.checkpoint)
    models = Path(cfg.paths.models_dir)
    mlpackage, onnx_path = models / f"{cfg.model.name}.mlpackage", models / f"{cfg.model.name}.onnx"
    with tracking.resumed_run(cfg, cfg.paths.checkpoint):  # FAILED if converting fails
        _, sizes = write_model_files(cfg, head, checkpoint, mlpackage, onnx_path)
        write_json(cfg.paths.model_report, sizes)
        mlflow.log_metrics(
            {"mlpackage_mb": sizes["mlpackage_bytes"] / 2**20, "onnx_mb": sizes["onnx_bytes"] / 2**20}
        )
        mlflow.log_artifact(str(mlpackage), "coreml")
        model = log_image_model(onnx_path, checkpoint.labels, cfg.model.name)  # serves images
        mlflow.set_tag("model_version", str(model.registered_model_version))  # which version this run made
        tracking.crown_first_version(cfg.model.name, str(model.registered_model_version))
    log.info(
        "wrote %s (%s, %.1f MB) and %s (float32, %.1f MB)",
        mlpackage,
        cfg.model.precision,
        sizes["mlpackage_bytes"] / 2**20,
        onnx_path,
        sizes["onnx_bytes"] / 2**20,
    )


main = stage_entry(run, "convert")

if __name__ == "__main__":
    main()
