"""`python -m pipeline.app [overrides]`: Create ML's Training, Evaluation, Preview
and Output tabs in a browser, at http://127.0.0.1:<app.port> until Ctrl-C: drop
images on the page, see the answers (docs/preview-and-serving.md)."""

from omegaconf import DictConfig

from pipeline.project.config import stage_entry
from pipeline.web.pages import check_outputs


def run(cfg: DictConfig) -> None:
    check_outputs(cfg)  # before Gradio, seconds to import: a missing output is one line at once
    from pipeline.web.app import serve

    serve(cfg)


main = stage_entry(run)

if __name__ == "__main__":
    main()
