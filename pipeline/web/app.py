"""The app's page (docs/preview-and-serving.md): Create ML's tabs, in its
order, as one Gradio app on 127.0.0.1, opening on the Preview."""

import logging
import shutil
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import gradio as gr
import pandas as pd
from omegaconf import DictConfig

from pipeline.data.images import DataError, SettingError
from pipeline.model.onnx_model import UNKNOWN, OnnxClassifier
from pipeline.web import pages
from pipeline.web.preview import TrainingImages, answer, thumbnail, training_images

log = logging.getLogger(__name__)
SHOWN = ["fullscreen"]  # an image's buttons: no share button (it posts to Hugging Face)


class Model:
    """The exported model the Preview runs, and the training images it shows beside
    each answer, read in the background: the checkpoint takes torch, seconds to
    import, and the page is up before it is (the first answer waits for it)."""

    def __init__(self, cfg: DictConfig):
        self.cfg = cfg
        self.mlpackage, self.onnx = pages.model_files(cfg)
        self.classifier = OnnxClassifier(self.onnx, features=True)
        self.reading = ThreadPoolExecutor(1, thread_name_prefix="training-images").submit(
            training_images, cfg, self.classifier
        )
        self.folder = tempfile.TemporaryDirectory(prefix="pipeline-app-")  # the zipped package; gone at exit
        self.zipping = threading.Lock()  # two pages opening at once zip it once

    def training(self) -> TrainingImages:
        try:
            return self.reading.result()
        except DataError as error:  # shown on the page, which keeps serving
            raise gr.Error(str(error)) from None

    def preview(self, files: list[str] | None) -> list[dict]:
        """Each file's answer, as `predict --json` gives it, with its nearest training images."""
        if not files:
            return []
        training, app = self.training(), self.cfg.app
        return [answer(self.classifier, training, path, app.top_k, app.nearest) for path in files]

    def downloads(self) -> list[str]:
        """The ONNX model, and the Core ML package (a folder) as a zip, made the first time."""
        zipped = Path(self.folder.name) / f"{self.mlpackage.name}.zip"
        with self.zipping:
            if not zipped.exists():
                base = zipped.with_suffix("")
                shutil.make_archive(str(base), "zip", self.mlpackage.parent, self.mlpackage.name)
        return [str(self.onnx), str(zipped)]


def show_answers(model: Model, files: list[str] | None, answers: list[dict] | None) -> None:
    """The Preview's answers on the page, a row per image: the image, the top labels
    with their confidence (or why there is none), the nearest training images."""
    for path, result in zip(files or [], answers or [], strict=False):
        with gr.Row(equal_height=True, elem_classes="answer"):
            if "error" in result:
                gr.Markdown(f"**{result['file']}**: {result['error']}")
                continue
            gr.Image(
                thumbnail(path), label=result["file"], interactive=False, height=220, scale=1, buttons=SHOWN
            )
            with gr.Column(scale=1):
                confidences = {p["label"]: p["confidence"] for p in result["predictions"]}
                unknown = result["label"] == UNKNOWN
                gr.Label(confidences, label="answer", show_heading=not unknown)
                if unknown:
                    threshold = model.classifier.rejection_threshold
                    gr.Markdown(
                        f"**unknown**: no label reaches the model's rejection threshold ({threshold:.0%})"
                    )
            if result["nearest"]:
                gr.Gallery(
                    [
                        (thumbnail(n["file"]), f"{n['label']} ({n['similarity']:.2f})")
                        for n in result["nearest"]
                    ],
                    label="nearest training images (similarity)",
                    columns=len(result["nearest"]),
                    height=220,
                    scale=2,
                    buttons=SHOWN,
                )


def preview_tab(model: Model) -> None:
    gr.Markdown(
        "Drop images here, or pick them: each gets the model's answer, its top labels with their "
        "calibrated confidence, and the training images most like it. Anything Pillow opens, HEIC "
        "included, at any size; decoded and made square as `python -m pipeline.predict` does."
    )
    files = gr.File(file_count="multiple", label="images")
    with gr.Accordion("the answers as JSON, as python -m pipeline.predict --json prints them", open=False):
        answers = gr.JSON(label="answers")
    files.change(model.preview, files, answers, api_name="preview")
    gr.render(inputs=[files, answers], triggers=[answers.change])(lambda f, a: show_answers(model, f, a))


def evaluation_tab(cfg: DictConfig) -> None:
    metrics = pages.read_metrics(cfg.paths.metrics)
    gr.Dataframe(pages.accuracies(metrics), label="accuracy per split", interactive=False)
    judged = [split for split, values in metrics.items() if "per_class" in values]
    with gr.Tabs(selected=judged[-1] if judged else None):  # the test split when there is one
        for split in judged:
            with gr.Tab(split, id=split):
                gr.Dataframe(pages.per_label(metrics[split]), label=f"per label, {split}", interactive=False)
    report = Path(cfg.paths.report).resolve()
    gr.Markdown(
        f"Click a column's header to sort. [The full report](/gradio_api/file={report}) adds the "
        "images behind each cell, the most confused pairs, calibration and the data audit."
    )
    confusion = Path(cfg.paths.plots_dir) / "confusion_matrix.png"
    gr.Image(str(confusion), label="confusion matrix", interactive=False, height=560, buttons=SHOWN)


def curves_plots(cfg: DictConfig, model: Model) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, str]:
    """The Training tab's content, read as the page opens: this model's curves and the
    last runs' from MLflow (a store that cannot be read leaves this model's alone)."""
    rows, runs, note = pages.this_model_curves(cfg.paths.curves), pd.DataFrame(), ""
    this_run = model.training().run_id
    try:
        others, runs = pages.mlflow_runs(cfg, this_run)
        rows += others
    except Exception as error:  # MLflow, SQLAlchemy and requests raise many types
        note = (
            f"The MLflow store cannot be read ({str(error).splitlines()[0][:200]}): this model's curves only."
        )
    curves = pd.DataFrame(rows, columns=["epoch", "measure", "value", "series"])
    accuracy, loss = (curves[curves["measure"] == measure] for measure in pages.CURVES)
    return accuracy, loss, runs, note


def training_tab(cfg: DictConfig, model: Model, page: gr.Blocks) -> None:
    gr.Markdown(
        f"This model's accuracy and loss per epoch, on its training and validation images, beside "
        f"the validation curves of the last {cfg.app.runs_compared} runs in MLflow (`mlflow ui` compares "
        "them in full)."
    )
    note = gr.Markdown()
    accuracy = gr.LinePlot(x="epoch", y="value", color="series", title="accuracy", y_title="accuracy")
    loss = gr.LinePlot(x="epoch", y="value", color="series", title="loss", y_title="loss")
    runs = gr.Dataframe(label="the runs compared", interactive=False)
    page.load(lambda: curves_plots(cfg, model), None, [accuracy, loss, runs, note], api_visibility="private")


def output_tab(cfg: DictConfig, model: Model, page: gr.Blocks) -> None:
    gr.Markdown("The model files, for an app: drag the `.mlpackage` into Xcode.")
    gr.Dataframe(pages.file_sizes(cfg), label="files", interactive=False)
    downloads = gr.File(label="download", interactive=False)
    page.load(model.downloads, None, downloads, api_visibility="private")
    gr.Markdown("In an app, with Vision:\n\n" + pages.swift(cfg, model.classifier.crop_and_scale))
    gr.Dataframe(pages.metadata(model.classifier), label="metadata, in both files", interactive=False)


def page(cfg: DictConfig, model: Model) -> gr.Blocks:
    with gr.Blocks(title=cfg.model.name, analytics_enabled=False) as blocks:
        gr.Markdown(f"## {cfg.model.name}")
        with gr.Tabs(selected="preview"):
            with gr.Tab("Training", id="training"):
                training_tab(cfg, model, blocks)
            with gr.Tab("Evaluation", id="evaluation"):
                evaluation_tab(cfg)
            with gr.Tab("Preview", id="preview"):
                preview_tab(model)
            with gr.Tab("Output", id="output"):
                output_tab(cfg, model, blocks)
    return blocks


def serve(cfg: DictConfig) -> None:
    """The app on 127.0.0.1:`app.port` until Ctrl-C."""
    gr.set_static_paths([Path(cfg.paths.report).resolve()])  # the report's link, served as it is
    blocks = page(cfg, Model(cfg))
    try:
        try:
            blocks.launch(
                server_name="127.0.0.1",
                server_port=cfg.app.port,
                prevent_thread_lock=True,
                quiet=True,
                ssr_mode=False,  # no Node.js server beside it
                show_error=True,
                allowed_paths=[str(Path(cfg.paths.plots_dir).resolve())],
            )
        except OSError as error:  # the port is taken
            raise SettingError(f"app.port = {cfg.app.port}: {str(error).split('.')[0]}") from None
        log.info("the model in a browser: %s (Ctrl-C stops it)", blocks.local_url)
        blocks.block_thread()  # until Ctrl-C, which it answers by closing the server
    except KeyboardInterrupt:  # Ctrl-C while the server was coming up: the same quiet stop
        blocks.close()
    log.info("stopped")
