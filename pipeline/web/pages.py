"""What the Evaluation, Training and Output tabs show, as tables and text read from
the pipeline's outputs (docs/preview-and-serving.md). No Gradio here:
pipeline/web/app.py lays them out."""

import json
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd
from omegaconf import DictConfig

from pipeline.data.images import DataError
from pipeline.model.onnx_model import OnnxClassifier

CURVES = ("accuracy", "loss")  # the Training tab's two plots, each of train and validation
SPLITS = ("train", "validation")
FIGURES = ("precision", "recall", "f1")  # per label, beside its count (metrics.json's names)


def model_files(cfg: DictConfig) -> tuple[Path, Path]:
    """The Core ML package and the ONNX model `convert` writes."""
    models = Path(cfg.paths.models_dir)
    return models / f"{cfg.model.name}.mlpackage", models / f"{cfg.model.name}.onnx"


def needed(cfg: DictConfig) -> list[tuple[Path, str]]:
    """The outputs the app shows, each with the stage that writes it, in the stages' order."""
    plots = Path(cfg.paths.plots_dir)
    return [
        (Path(cfg.paths.features), "extract"),
        (Path(cfg.paths.checkpoint), "train"),
        (Path(cfg.paths.curves), "train"),
        (Path(cfg.paths.metrics), "evaluate"),
        (Path(cfg.paths.report), "evaluate"),
        (plots / "confusion_matrix.png", "evaluate"),
        *((path, "convert") for path in model_files(cfg)),
        (Path(cfg.paths.model_report), "convert"),
    ]


def check_outputs(cfg: DictConfig) -> None:
    """A DataError naming the first output missing and the stage to run."""
    for path, stage in needed(cfg):
        if not path.exists():
            raise DataError(f"{path} not found: run the {stage} stage (dvc repro)")


def read_json(path: str | Path, stage: str) -> dict:
    try:
        content = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise DataError(f"{path} cannot be read ({type(error).__name__}): run the {stage} stage") from None
    if not isinstance(content, dict):
        raise DataError(f"{path} is not of this pipeline: run the {stage} stage (dvc repro)")
    return content


def read_metrics(path: str | Path) -> dict:
    """reports/metrics.json, checked: each split's accuracy, and per label its four figures."""
    metrics = read_json(path, "evaluate")
    try:
        for values in metrics.values():
            float(values["accuracy"])
            for scores in values.get("per_class", {}).values():
                [float(scores[name]) for name in ("count", *FIGURES)]
    except (TypeError, KeyError, ValueError, AttributeError):
        raise DataError(f"{path} is not of this pipeline: run the evaluate stage (dvc repro)") from None
    return metrics


def percent(share: float) -> float:
    return round(100 * share, 1)


def accuracies(metrics: dict) -> pd.DataFrame:
    """A row per split: its accuracy, images and macro-averaged F1 (train has the accuracy only)."""
    rows = []
    for split, values in metrics.items():
        counts = [scores["count"] for scores in values.get("per_class", {}).values()]
        rows.append(
            {
                "split": split,
                "accuracy %": percent(values["accuracy"]),
                "images": sum(counts) if counts else None,
                "macro F1 %": percent(values["macro_avg"]["f1"]) if "macro_avg" in values else None,
            }
        )
    return pd.DataFrame(rows, columns=["split", "accuracy %", "images", "macro F1 %"])


def per_label(values: dict) -> pd.DataFrame:
    """A split's per-label table, as Create ML's Evaluation tab shows it (numbers, so
    that a column sorts by value)."""
    return pd.DataFrame(
        [
            {"label": label, "count": scores["count"]}
            | {f"{name} %": percent(scores[name]) for name in FIGURES}
            for label, scores in values["per_class"].items()
        ],
        columns=["label", "count", *(f"{name} %" for name in FIGURES)],
    )


def curve_rows(series: str, measure: str, values) -> list[dict]:
    """One curve, a value per epoch, as a line plot's rows."""
    return [
        {"epoch": epoch, "measure": measure, "value": float(value), "series": series}
        for epoch, value in enumerate(values)
        if pd.notna(value)
    ]


def this_model_curves(path: str | Path) -> list[dict]:
    """The curves `train` wrote for the model the app serves."""
    try:
        curves = pd.read_csv(path)
    except (OSError, ValueError) as error:
        raise DataError(f"{path} cannot be read ({type(error).__name__}): run the train stage") from None
    return [
        row
        for split in SPLITS
        for measure in CURVES
        if f"{split}_{measure}" in curves
        for row in curve_rows(f"this model, {split}", measure, curves[f"{split}_{measure}"])
    ]


RUN_COLUMNS = ["run", "started", "status", "extractor", "head", "validation accuracy", "test accuracy"]


def run_row(run, name: str) -> dict:
    """A run as the Training tab's table lists it."""
    return {
        "run": name,
        "started": datetime.fromtimestamp(run.info.start_time / 1000, UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "status": run.info.status,
        "extractor": run.data.params.get("extractor.name"),
        "head": run.data.params.get("head.type"),
        "validation accuracy": run.data.metrics.get("validation_accuracy"),
        "test accuracy": run.data.metrics.get("test_accuracy"),
    }


def mlflow_runs(cfg: DictConfig, this_run: str) -> tuple[list[dict], pd.DataFrame]:
    """The last `app.runs_compared` runs in MLflow besides this model's: their
    validation curves (`curve_rows`, from the per-epoch metrics) and a row per run."""
    from mlflow import MlflowClient  # seconds to import: only once a page asks

    from pipeline.project.tracking import store_uri

    if not cfg.app.runs_compared:
        return [], pd.DataFrame(columns=RUN_COLUMNS)
    client = MlflowClient(store_uri(cfg)[0])
    experiment = client.get_experiment_by_name(cfg.mlflow.experiment)
    if experiment is None:
        return [], pd.DataFrame(columns=RUN_COLUMNS)
    found = client.search_runs(
        [experiment.experiment_id],
        order_by=["attributes.start_time DESC"],
        max_results=cfg.app.runs_compared + 1,  # this model's own run is usually among them
    )
    runs = [run for run in found if run.info.run_id != this_run][: cfg.app.runs_compared]
    curves, table = [], []
    for run in runs:
        name = f"{run.info.run_name} {run.info.run_id[:6]}"
        table.append(run_row(run, name))
        for measure in CURVES:  # on the validation images: what runs are compared on
            # logged once per epoch; its step is a batch count for the MLP, an epoch for L-BFGS
            history = client.get_metric_history(run.info.run_id, f"epoch/validation_{measure}")
            values = [metric.value for metric in sorted(history, key=lambda metric: metric.step)]
            curves += curve_rows(f"{name}, validation", measure, values)
    return curves, pd.DataFrame(table, columns=RUN_COLUMNS)


def file_sizes(cfg: DictConfig) -> pd.DataFrame:
    """The model files, their size and what they are for."""
    report = read_json(cfg.paths.model_report, "convert")
    mlpackage, onnx = model_files(cfg)
    return pd.DataFrame(
        [
            {
                "file": str(mlpackage),
                "MB": round(report.get("mlpackage_bytes", 0) / 1e6, 1),
                "for": f"Xcode: Core ML, {report.get('precision', '?')} weights",
            },
            {"file": str(onnx), "MB": round(report.get("onnx_bytes", 0) / 1e6, 1), "for": "onnxruntime"},
        ]
    )


def metadata(classifier: OnnxClassifier) -> pd.DataFrame:
    """What the model says about itself (the same in both files)."""
    about = classifier.session.get_modelmeta().custom_metadata_map
    return pd.DataFrame(sorted(about.items()), columns=["key", "value"])


def swift(cfg: DictConfig, crop_and_scale: str) -> str:
    """The lines that use the Core ML model in an app (docs/xcode-and-onnx.md)."""
    return f"""```swift
let model = try VNCoreMLModel(for: {cfg.model.name}(configuration: MLModelConfiguration()).model)
let request = VNCoreMLRequest(model: model) {{ request, _ in
    guard let best = (request.results as? [VNClassificationObservation])?.first else {{ return }}
    print(best.identifier, best.confidence)
}}
request.imageCropAndScaleOption = .{crop_and_scale}   // what training used
try VNImageRequestHandler(cgImage: image).perform([request])
```"""
