"""The Python API (docs/api.md) gives what the stages give."""

import json
import shutil
import sys

import coremltools as ct
import pytest
import torch
from conftest import copy_project, make_dataset, run, write_image

from pipeline import DataSource, ImageClassifier, ModelParameters
from pipeline.data.images import DataError


@pytest.mark.slow
def test_api_flow_gives_the_pipelines_metrics_and_model(demo_project, tmp_path, monkeypatch):
    """Train from the demo folders, evaluate on the test folder, write the model: the
    numbers `dvc repro` wrote to reports/metrics.json and the spec `convert` wrote."""
    project = copy_project(demo_project, tmp_path / "project")
    monkeypatch.chdir(project)  # the project's feature cache and paths, as a script run there has
    model = ImageClassifier.train(
        DataSource.labeled_directories("data/demo/train"), parameters=ModelParameters()
    )
    metrics = model.evaluation(on=DataSource.labeled_directories("data/demo/test"))

    recorded = json.loads((project / "reports/metrics.json").read_text())
    assert metrics.accuracy == recorded["test"]["accuracy"]
    assert model.validation_metrics.accuracy == recorded["validation"]["accuracy"]
    for label, scores in recorded["test"]["per_class"].items():
        assert metrics.per_label.loc[label, "precision"] == pytest.approx(scores["precision"], abs=1e-12)
        assert metrics.per_label.loc[label, "recall"] == pytest.approx(scores["recall"], abs=1e-12)
        assert metrics.per_label.loc[label, "count"] == scores["count"]
    assert len(metrics.misclassified) == round((1 - metrics.accuracy) * metrics.per_label["count"].sum())

    written = model.write(tmp_path / "api" / "ImageClassifier.mlpackage")
    assert written.with_suffix(".onnx").is_file()
    ours, theirs = (
        ct.utils.load_spec(str(p)) for p in (written, project / "models/ImageClassifier.mlpackage")
    )
    for spec in (ours, theirs):  # from which split file: the only difference there may be
        spec.description.metadata.userDefined["data_fingerprint"] = ""
    assert ours == theirs
    assert [p.read_bytes() for p in sorted(written.rglob("*.bin"))] == [
        p.read_bytes() for p in sorted((project / "models/ImageClassifier.mlpackage").rglob("*.bin"))
    ]


def three_layouts(tmp_path):
    """The same images as label folders, as `label.n.png` files, and as a dict."""
    folders = tmp_path / "folders"
    paths = make_dataset(folders, per_label=12)
    flat = tmp_path / "flat"
    flat.mkdir()
    by_label = {}
    for n, path in enumerate(paths):
        label = path.parent.name
        shutil.copy(path, flat / f"{label}.{n}.png")
        by_label.setdefault(label, []).append(path)
    return (
        DataSource.labeled_directories(folders),
        DataSource.labeled_files(flat),
        DataSource.files_by_label(by_label),
    )


def test_every_data_source_gives_the_same_model(tmp_path):
    sources = three_layouts(tmp_path)
    assert [len(source.files) for source in sources] == [36, 36, 36]
    parameters = ModelParameters(feature_cache=tmp_path / "cache", augmentations={"flip": 1})
    models = [ImageClassifier.train(source, validation=None, parameters=parameters) for source in sources]
    reference = models[0].head.state_dict()
    for model in models[1:]:
        assert model.labels == models[0].labels == ["blue", "green", "red"]
        assert model.checkpoint.regularization == models[0].checkpoint.regularization
        for name, tensor in model.head.state_dict().items():
            assert torch.equal(tensor, reference[name]), name


def test_saved_model_loads_and_predicts_the_same(tmp_path):
    source = three_layouts(tmp_path)[0]
    model = ImageClassifier.train(source, parameters=ModelParameters(feature_cache=tmp_path / "cache"))
    model.save(tmp_path / "head.ckpt")
    loaded = ImageClassifier.load(tmp_path / "head.ckpt", feature_cache=tmp_path / "cache")
    images = [path for path, _ in source.files[:3]]
    assert loaded.predictions(images, top_k=2).equals(model.predictions(images, top_k=2))
    assert list(model.predictions(images).label) == [label for _, label in source.files[:3]]


def test_bad_input_through_the_api_is_named_or_listed(tmp_path):
    with pytest.raises(DataError, match=str(tmp_path / "missing")):
        DataSource.labeled_directories(tmp_path / "missing")
    make_dataset(tmp_path / "one", per_label=5, labels=("red",))
    with pytest.raises(DataError, match=f"need at least 2 labels .* in {tmp_path / 'one'}"):
        ImageClassifier.train(DataSource.labeled_directories(tmp_path / "one"))
    make_dataset(tmp_path / "two", per_label=6, labels=("red", "blue"))
    (tmp_path / "two" / "red" / "notes.jpg").write_text("not an image")
    write_image(tmp_path / "two" / "stray.png", (1, 2, 3), seed=0)
    model = ImageClassifier.train(
        DataSource.labeled_directories(tmp_path / "two"),
        parameters=ModelParameters(feature_cache=tmp_path / "cache", augmentations={}),
    )
    reasons = {skipped.path.rsplit("/", 1)[1]: skipped.reason for skipped in model.skipped}
    assert reasons["stray.png"] == "not inside a label folder"
    assert reasons["notes.jpg"].startswith("not a readable image")


@pytest.mark.slow
def test_example_script_runs_the_documented_flow(demo_project, tmp_path):
    project = copy_project(demo_project, tmp_path / "project")
    result = run([sys.executable, "examples/script.py"], project)
    recorded = json.loads((project / "reports/metrics.json").read_text())["test"]["accuracy"]
    assert f"test accuracy:       {recorded:.3f}" in result.stdout
    assert (project / "examples/output/FromPython.mlpackage").is_dir()
    assert (project / "examples/output/FromPython.onnx").is_file()
