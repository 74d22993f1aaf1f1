"""Stage `train`: a Lightning head on the cached features (docs/pipeline.md);
the training itself is pipeline/model/training.py."""

import logging

from omegaconf import DictConfig

from pipeline.project.config import stage_entry

log = logging.getLogger(__name__)


def run(cfg: DictConfig) -> None:
    # Imported here, once stage_entry has checked every setting: torch, Lightning,
    # MLflow and coremltools take seconds to import, and a bad setting must fail in under one.
    import mlflow
    from pytorch_lightning.loggers import MLFlowLogger

    from pipeline.features.extraction import features_for
    from pipeline.model.calibration import calibrate
    from pipeline.model.checkpoint import save_checkpoint
    from pipeline.model.training import CURVE_COLUMNS, TABLE_COLUMNS, EpochCurve, checkpoint_for, fit_head
    from pipeline.project import tracking
    from pipeline.project.files import write_csv

    table = features_for(cfg, TABLE_COLUMNS)
    with tracking.new_run(cfg, table["meta"]["split_sha256"]) as run_id:  # FAILED if training fails
        curve = EpochCurve()
        logger = MLFlowLogger(tracking_uri=mlflow.get_tracking_uri(), run_id=run_id)
        head, strength = fit_head(cfg, table, [curve], logger)
        write_csv(cfg.paths.curves, curve.rows, CURVE_COLUMNS)
        mlflow.log_artifact(cfg.paths.curves)
        mlflow.log_param("train.regularization_used", strength)  # the cross-validated choice, for `auto`
        calibration, held_out = calibrate(cfg, table, head, strength)
        mlflow.log_params({f"calibrate.{key}_used": value for key, value in calibration.items()})
        saved = held_out.saved(cfg, table) if held_out is not None else None
        checkpoint = checkpoint_for(cfg, table, head, strength, calibration, saved)
        save_checkpoint(cfg.paths.checkpoint, checkpoint)
        tracking.tag_checkpoint(cfg.paths.checkpoint)  # how evaluate and convert find this run
    last = curve.rows[-1]
    log.info(
        "trained %s head for %d epochs: %s (MLflow run %s)",
        cfg.head.type,
        len(curve.rows),
        ", ".join(f"{k} {v:.3f}" for k, v in last.items() if k != "epoch"),
        run_id,
    )


main = stage_entry(run, "train")

if __name__ == "__main__":
    main()
