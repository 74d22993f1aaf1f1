"""`python -m pipeline.predict IMAGE_OR_FOLDER... [--top-k K] [--json]`: Create ML's
Preview, the answer and the top labels with their calibrated confidence, from the
exported ONNX model. The answer is "unknown" when no label reaches the model's
rejection threshold (docs/trust.md)."""

import argparse
import json
import sys
from pathlib import Path

from pipeline.data.images import is_hidden
from pipeline.data.storage import data_path, is_folder, is_s3, s3_files
from pipeline.model.onnx_model import OnnxClassifier, why_unreadable
from pipeline.project.config import compose_config


def default_model() -> Path:
    cfg = compose_config()
    return Path(cfg.paths.models_dir) / f"{cfg.model.name}.onnx"


def image_files(arguments: list[str]) -> list[str | Path]:
    """The image files named, and those in the folders named (s3:// ones too)."""
    files = []
    for argument in map(data_path, arguments):
        if is_s3(argument) and is_folder(argument):
            files += [p for p in s3_files(argument) if not is_hidden(Path(p))]
        elif not is_s3(argument) and argument.is_dir():
            files += sorted(p for p in argument.rglob("*") if p.is_file() and not is_hidden(p))
        else:
            files.append(argument)
    return files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.predict", description=__doc__)
    parser.add_argument("images", nargs="+", help="image files or folders")
    parser.add_argument("--top-k", type=int, default=3, help="labels to show per image (default 3)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--model", type=Path, default=None, help="ONNX model (default: the pipeline's)")
    args = parser.parse_args(argv)
    if any(not argument.strip() for argument in args.images):
        print("error: an empty image argument (it would mean the whole current folder)", file=sys.stderr)
        return 2
    files = image_files(args.images)
    if not files:
        print(f"error: no image files in {', '.join(args.images)}", file=sys.stderr)
        return 2
    model = args.model or default_model()
    if not model.is_file():
        print(f"error: no model at {model}: run `dvc repro` first", file=sys.stderr)
        return 2
    classifier = OnnxClassifier(model)
    results, failed = [], 0
    for path in files:
        try:
            probabilities = classifier.probabilities(path)
            results.append(
                {
                    "path": str(path),
                    "label": classifier.answer(probabilities),
                    "top_k": classifier.top(probabilities, args.top_k),
                }
            )
        except Exception as error:  # one unreadable file must not hide the others' answers
            print(f"error: {path}: {why_unreadable(error)}", file=sys.stderr)
            failed += 1
    if args.json:
        print(
            json.dumps(
                [
                    {
                        "path": r["path"],
                        "label": r["label"],
                        "predictions": [{"label": lbl, "confidence": c} for lbl, c in r["top_k"]],
                    }
                    for r in results
                ],
                indent=2,
                ensure_ascii=False,
            )
        )
    else:
        for result in results:
            print(f"{result['path']}: {result['label']}")
            for label, confidence in result["top_k"]:
                print(f"  {confidence:7.2%}  {label}")
    return 2 if failed else 0  # bad input, as everywhere: the files named above


if __name__ == "__main__":
    sys.exit(main())
