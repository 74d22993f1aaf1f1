"""The app (docs/preview-and-serving.md): the Preview answers as `predict`
does, in the real Gradio client and in headless Chromium; it stops on Ctrl-C; a
missing output or a bad setting is one line."""

import base64
import csv
import json
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pillow_heif
import psutil
import pytest
from conftest import CHROMIUM_FLAGS, project_env, run
from PIL import Image

from pipeline.data.images import DataError
from pipeline.evaluation.similarity import centred_unit, most_similar
from pipeline.project.config import compose_config, output_overrides
from pipeline.web.pages import check_outputs, needed, read_metrics

STARTUP = 120  # seconds an app may take to answer (imports on a loaded 2-core machine)
CHROMIUM = Path("/usr/bin/chromium")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def app_command(*overrides: str) -> list[str]:
    return [sys.executable, "-m", "pipeline.app", *overrides]


def start_app(project: Path, tmp_path: Path) -> tuple[subprocess.Popen, str]:
    """The app on a free loopback port in `project`, answering; its uploads kept under tmp_path."""
    port = free_port()
    env = project_env() | {"GRADIO_TEMP_DIR": str(tmp_path / "gradio")}
    app = subprocess.Popen(
        app_command(f"app.port={port}"),
        cwd=project,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        # Ctrl-C as in a terminal even where pytest runs as a background job, whose
        # shell starts it (and so the app) with SIGINT ignored
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + STARTUP
    while time.monotonic() < deadline and app.poll() is None:
        try:
            urllib.request.urlopen(url, timeout=2).close()
            return app, url
        except OSError:
            time.sleep(0.2)
    app.kill()
    raise AssertionError(f"the app did not answer at {url}: {app.communicate()[0].decode()[-2000:]}")


def stop_app(app: subprocess.Popen) -> int:
    """Ctrl-C, as a user stops it; its exit code."""
    app.send_signal(signal.SIGINT)
    try:
        return app.wait(timeout=30)
    finally:
        if app.poll() is None:
            app.kill()
            app.wait()


@pytest.fixture(scope="module")
def served(demo_project, tmp_path_factory):
    """The demo project's app, answering at its URL, for the tests that only ask it."""
    app, url = start_app(demo_project, tmp_path_factory.mktemp("app"))
    yield url
    stop_app(app)


def predicted(project: Path, images: list[Path]) -> list[dict]:
    """`python -m pipeline.predict --json`'s answers."""
    return json.loads(
        run([sys.executable, "-m", "pipeline.predict", *map(str, images), "--json"], project).stdout
    )


def confident_test_images(project: Path, count: int) -> list[Path]:
    """Test images of different labels that the model answers with a label, not "unknown"."""
    with (project / "reports/predictions.csv").open() as file:
        rows = [row for row in csv.DictReader(file) if row["split"] == "test" and row["answer"] != "unknown"]
    firsts = {row["answer"]: row for row in rows}  # one per label
    return [project / row["path"] for row in list(firsts.values())[:count]]


def test_most_similar_ranks_by_cosine_less_the_shift():
    rng = np.random.default_rng(0)
    shift = rng.normal(5, 1, 16)  # a large common component, as clip art's features have
    features = shift + rng.normal(0, 1, (50, 16))
    references = centred_unit(features, shift)
    query = centred_unit(features[7] + rng.normal(0, 0.05, 16), shift)
    rows, similarity = most_similar(query, references, 3)
    assert rows[0] == 7 and similarity[0] > 0.99
    assert list(similarity) == sorted(similarity, reverse=True)
    assert np.allclose(similarity, references[rows] @ query)
    assert len(most_similar(query, references, 80)[0]) == 50


def test_each_missing_output_names_the_stage_that_writes_it(tmp_path):
    cfg = compose_config(*output_overrides(tmp_path))
    outputs = needed(cfg)
    assert {stage for _, stage in outputs} == {"extract", "train", "evaluate", "convert"}
    for path, _ in outputs:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()
    check_outputs(cfg)
    for missing, stage in outputs:
        missing.unlink()
        with pytest.raises(DataError, match=f"{missing} not found: run the {stage} stage"):
            check_outputs(cfg)
        missing.touch()


def test_without_a_model_the_app_says_which_stage_to_run(tmp_path):
    result = run(app_command(*output_overrides(tmp_path)), tmp_path, check=False)
    assert result.returncode == 2
    (line,) = result.stdout.strip().splitlines()
    assert "not found: run the extract stage (dvc repro)" in line
    assert "Traceback" not in result.stderr


def test_a_bad_app_setting_is_one_line(tmp_path):
    result = run(app_command("app.port=70000", "app.top_k=0"), tmp_path, check=False)
    assert result.returncode == 2
    assert result.stdout.strip().splitlines() == [  # a line per bad setting
        "ERROR   app.port = 70000: expected a port number, 1 to 65535",
        "app.top_k = 0: expected a whole number >= 1",
    ]


def test_damaged_metrics_are_named(tmp_path):
    metrics = tmp_path / "metrics.json"
    metrics.write_text(json.dumps({"test": {"per_class": {}}}))
    with pytest.raises(DataError, match=f"{metrics} is not of this pipeline: run the evaluate stage"):
        read_metrics(metrics)


@pytest.mark.slow
def test_gradio_client_gets_what_predict_gives(served, demo_project, tmp_path):
    from gradio_client import Client, handle_file

    image = confident_test_images(demo_project, 1)[0]
    phone = tmp_path / "phone.heic"  # as an iPhone saves it: browsers cannot even show one
    pillow_heif.from_pillow(Image.open(image).convert("RGB")).save(phone)
    images = [image, phone]
    answers = Client(served, verbose=False).predict(
        [handle_file(str(i)) for i in images], api_name="/preview"
    )
    for sent, answer, expected in zip(images, answers, predicted(demo_project, images), strict=True):
        assert answer["file"] == sent.name and answer["label"] == expected["label"]
        assert [p["label"] for p in answer["predictions"]] == [p["label"] for p in expected["predictions"]]
        for got, wanted in zip(answer["predictions"], expected["predictions"], strict=True):
            assert got["confidence"] == pytest.approx(wanted["confidence"], abs=1e-4)
    nearest = answers[0]["nearest"]
    assert len(nearest) == 4 and [n["similarity"] for n in nearest] == sorted(
        (n["similarity"] for n in nearest), reverse=True
    )
    for near in nearest:  # training images of the demo, under their own label
        assert near["file"].startswith("data/demo/train/") and (demo_project / near["file"]).is_file()
        assert Path(near["file"]).parent.name == near["label"]


@pytest.mark.slow
def test_a_file_that_is_no_image_gets_a_message_and_the_app_keeps_serving(served, demo_project, tmp_path):
    from gradio_client import Client, handle_file

    notes = tmp_path / "notes.txt"
    notes.write_text("not an image")
    image = confident_test_images(demo_project, 1)[0]
    client = Client(served, verbose=False)
    bad, good = client.predict([handle_file(str(notes)), handle_file(str(image))], api_name="/preview")
    assert bad == {"file": "notes.txt", "error": "cannot read image (cannot identify image file 'notes.txt')"}
    assert good["label"] == predicted(demo_project, [image])[0]["label"]
    (again,) = client.predict([handle_file(str(image))], api_name="/preview")
    assert again["label"] == good["label"]


@pytest.mark.slow
def test_the_evaluation_tab_links_to_the_full_report(served, demo_project):
    report = (demo_project / "reports/report.html").resolve()
    config = json.loads(urllib.request.urlopen(f"{served}config", timeout=30).read())
    link = f"/gradio_api/file={report}"
    assert any(link in str(component.get("props", {}).get("value")) for component in config["components"])
    with urllib.request.urlopen(served.rstrip("/") + link, timeout=30) as page:
        assert page.read() == report.read_bytes()


@pytest.mark.slow
def test_a_port_in_use_is_one_line(served, demo_project):
    port = served.rsplit(":", 1)[1].strip("/")
    result = run(app_command(f"app.port={port}"), demo_project, check=False)
    assert result.returncode == 2
    (line,) = result.stdout.strip().splitlines()
    assert line.startswith(f"ERROR   app.port = {port}: Cannot find empty port")


def drop_files(page, paths: list[Path]) -> None:
    """Drop files on the Preview's upload area as a desktop's drag and drop does."""
    files = [(path.name, base64.b64encode(path.read_bytes()).decode()) for path in paths]
    page.locator('button[aria-label="Click to upload or drop files"]').evaluate(
        """(area, files) => {
            const dropped = new DataTransfer();
            for (const [name, data] of files) {
                const bytes = Uint8Array.from(atob(data), c => c.charCodeAt(0));
                dropped.items.add(new File([bytes], name, {type: "image/jpeg"}));
            }
            const drop = new DragEvent("drop", {dataTransfer: dropped, bubbles: true, cancelable: true});
            area.dispatchEvent(drop);
        }""",
        files,
    )


@pytest.mark.slow
def test_chromium_shows_the_labels_of_two_dropped_images(served, demo_project):
    if not CHROMIUM.is_file():
        pytest.skip("chromium is not installed (.ci/run installs it)")
    from playwright.sync_api import sync_playwright

    images = confident_test_images(demo_project, 2)
    expected = [answer["label"] for answer in predicted(demo_project, images)]
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page()
            page.goto(served)
            drop_files(page, images)
            labels = page.locator('[data-testid="label-output-value"]')
            labels.nth(1).wait_for(timeout=60_000)
            assert labels.all_inner_texts() == expected
            assert len(set(expected)) == 2  # two images of different labels, both read
        finally:
            browser.close()


@pytest.mark.slow
def test_ctrl_c_stops_the_app_and_leaves_no_process(demo_project, tmp_path):
    app, url = start_app(demo_project, tmp_path)
    family = [psutil.Process(app.pid), *psutil.Process(app.pid).children(recursive=True)]
    assert stop_app(app) == 0
    output = app.stdout.read().decode()
    assert output.rstrip().endswith("stopped") and "Traceback" not in output
    assert not [process for process in family if process.is_running() and process.status() != "zombie"]
    with pytest.raises(OSError):
        urllib.request.urlopen(url, timeout=2)
