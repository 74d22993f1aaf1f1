"""Stage `evaluate`: accuracy per split, per-label precision/recall/F1, calibration,
the confusion matrix and the misclassified images, and the data audit
(docs/pipeline.md, docs/trust.md)."""

import logging
from pathlib import Path

from omegaconf import DictConfig

from pipeline.project.config import stage_entry

log = logging.getLogger(__name__)


def run(cfg: DictConfig) -> None:
    # Imported here, once stage_entry has checked every setting: torch, Lightning,
    # MLflow and coremltools take seconds to import, and a bad setting must fail in under one.
    import mlflow

    from pipeline.evaluation import report
    from pipeline.evaluation.audit import DUPLICATE_COLUMNS, LABEL_ISSUE_COLUMNS, OUTLIER_COLUMNS, audit
    from pipeline.evaluation.metrics import (
        confusion_counts,
        evaluate,
        mlflow_metrics,
        of_split,
        summary,
        too_few_to_judge,
        wrong,
    )
    from pipeline.evaluation.plots import plot_confusion, plot_curves, plot_reliability
    from pipeline.features.extraction import features_for
    from pipeline.features.table import originals
    from pipeline.model.checkpoint import load_checkpoint
    from pipeline.project import tracking
    from pipeline.project.files import write_csv, write_frame, write_json, write_text

    head, checkpoint = load_checkpoint(cfg.paths.checkpoint)
    with tracking.resumed_run(cfg, cfg.paths.checkpoint):  # FAILED if evaluating fails
        table = features_for(cfg)
        metrics, predictions = evaluate(
            head, originals(table), checkpoint.rejection_threshold, cfg.train.feature_batch_rows
        )
        write_json(cfg.paths.metrics, metrics)
        write_json(cfg.paths.summary, summary(metrics))
        write_frame(cfg.paths.predictions, predictions)
        confusion_split = next(split for split in ("test", "validation", "train") if split in metrics)
        judged = of_split(predictions, confusion_split)
        write_frame(cfg.paths.confusion, confusion_counts(judged))
        plots = Path(cfg.paths.plots_dir)
        plots.mkdir(parents=True, exist_ok=True)
        plot_confusion(judged, checkpoint.labels, confusion_split, plots / "confusion_matrix.png")
        plot_curves(Path(cfg.paths.curves), plots / "training_curves.png")
        if "expected_calibration_error" in metrics[confusion_split]:
            errors = [
                metrics[confusion_split][f"expected_calibration_error{kind}"]
                for kind in ("", "_uncalibrated")
            ]
            plot_reliability(judged, confusion_split, errors, plots / "reliability.png")
        write_frame(cfg.paths.misclassified, wrong(predictions[predictions["split"] != "train"]))
        findings = audit(cfg, table, head, checkpoint)
        write_csv(cfg.paths.label_issues, findings.label_issues, LABEL_ISSUE_COLUMNS)
        write_csv(cfg.paths.near_duplicates, findings.near_duplicates, DUPLICATE_COLUMNS)
        write_csv(cfg.paths.outliers, findings.outliers, OUTLIER_COLUMNS)
        warnings = findings.warnings() + too_few_to_judge(metrics, cfg.evaluate.min_images_to_judge)
        for warning in warnings:
            log.warning("%s", warning)
        page = report.Page(
            title=f"{cfg.model.name}: evaluation",
            metrics=metrics,
            predictions=judged,
            labels=checkpoint.labels,
            split=confusion_split,
            warnings=warnings,
            plots_dir=plots,
            calibration=checkpoint.calibration,
            label_issues=findings.flagged(),
            near_duplicates=findings.near_duplicates,
            outliers=findings.outliers,
            images_shown=cfg.audit.images_shown,
        )
        write_text(cfg.paths.report, report.render(page))
        mlflow.log_metrics(mlflow_metrics(metrics) | findings.counts())
        for path in (
            cfg.paths.metrics,
            cfg.paths.predictions,
            cfg.paths.misclassified,
            cfg.paths.report,
            cfg.paths.label_issues,
            cfg.paths.near_duplicates,
            cfg.paths.outliers,
        ):
            tracking.log_capped_artifact(path)
        mlflow.log_artifacts(str(plots), "plots")
        log.info("accuracy: %s", ", ".join(f"{split} {m['accuracy']:.3f}" for split, m in metrics.items()))
        log.info("report: %s", cfg.paths.report)


main = stage_entry(run, "evaluate")

if __name__ == "__main__":
    main()
