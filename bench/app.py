"""The app's speed (docs/preview-and-serving.md), against `python -m
pipeline.predict` on the same images, in one run. Run from the project root after
`dvc repro` on the demo:

    python bench/app.py             # about 2 minutes on 2 CPU cores
    python bench/app.py --runs 5    # more starts, steadier medians

1. startup: from launching `python -m pipeline.app` to its page answering, and to
   its first image answered (the training images it shows beside an answer are
   read in the background as the page comes up); against a `python -m
   pipeline.predict` process on one image (start, load the model, answer). Medians
   of --runs starts, taken alternately. The bar: the page in under 10 s.
2. seconds per image: the app answering the demo's test images one request at a
   time through gradio_client (upload and nearest training images included), and
   dropped all at once on the page in headless Chromium until every label shows
   (the page's thumbnails included); against `predict`'s own time per image, its
   startup left out: (predict on all of them - predict on one) / (images - 1). The
   bar: under 1 s an image.
"""

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# The project root instead of bench/ (bench/datasets.py must not shadow a library
# called datasets), and tests/: the app is started and driven as its tests do.
sys.path[0:1] = [str(ROOT), str(ROOT / "tests")]

from conftest import CHROMIUM_FLAGS, project_env  # noqa: E402
from test_app import CHROMIUM, drop_files, start_app, stop_app  # noqa: E402

from pipeline.data.images import DataError  # noqa: E402
from pipeline.project.config import compose_config  # noqa: E402
from pipeline.web.pages import check_outputs  # noqa: E402

TEST_IMAGES = ROOT / "data/demo/test"
DROPPED = 8  # images dropped on the page at once


def predict_seconds(images: list[Path]) -> float:
    start = time.perf_counter()
    command = [sys.executable, "-m", "pipeline.predict", *map(str, images), "--json"]
    subprocess.run(command, cwd=ROOT, env=project_env(), capture_output=True, check=True)
    return time.perf_counter() - start


def app_startup(scratch: Path) -> tuple[float, float, float]:
    """Seconds to the page answering and to the first image answered; seconds per
    image over the test images, one request each."""
    from gradio_client import Client, handle_file

    images = sorted(TEST_IMAGES.rglob("*.jpg"))
    start = time.perf_counter()
    app, url = start_app(ROOT, scratch)
    try:
        page = time.perf_counter() - start
        client = Client(url, verbose=False)
        client.predict([handle_file(str(images[0]))], api_name="/preview")
        first = time.perf_counter() - start
        began = time.perf_counter()
        for image in images:
            client.predict([handle_file(str(image))], api_name="/preview")
        per_image = (time.perf_counter() - began) / len(images)
    finally:
        stop_app(app)
    return page, first, per_image


def browser_per_image(scratch: Path) -> float | None:
    """Seconds per image from dropping DROPPED images on the page to all their labels shown."""
    if not CHROMIUM.is_file():
        return None
    from playwright.sync_api import sync_playwright

    images = sorted(TEST_IMAGES.rglob("*.jpg"))[:: max(1, 60 // DROPPED)][:DROPPED]
    app, url = start_app(ROOT, scratch)
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_FLAGS)
            page = browser.new_page()
            page.goto(url)
            page.wait_for_selector("input[type=file]", state="attached")
            start = time.perf_counter()
            drop_files(page, images)
            page.locator(".answer").nth(len(images) - 1).wait_for(timeout=120_000)  # every image's row
            seconds = (time.perf_counter() - start) / len(images)
            browser.close()
    finally:
        stop_app(app)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=3, help="app starts and predict processes (medians)")
    parser.add_argument("--scratch", type=Path, default=ROOT / "bench/.data/app", help="the app's uploads")
    args = parser.parse_args()
    try:
        check_outputs(compose_config())
    except DataError as error:
        sys.exit(str(error))
    images = sorted(TEST_IMAGES.rglob("*.jpg"))
    starts, predicts = [], []
    for run in range(args.runs):  # alternately, so that a busy minute weighs on both
        starts.append(app_startup(args.scratch / str(run)))
        predicts.append((predict_seconds(images[:1]), predict_seconds(images)))
    page, first, per_image = (statistics.median(column) for column in zip(*starts, strict=True))
    one, every = (statistics.median(column) for column in zip(*predicts, strict=True))
    predict_per_image = (every - one) / (len(images) - 1)
    in_browser = browser_per_image(args.scratch / "browser")
    print(f"{len(images)} demo test images, medians of {args.runs}")
    print(f"{'figure':<46} {'predict':>9} {'app':>9} {'ratio':>7}  bar")
    rows = [
        ("startup to the page answering, s", one, page, "< 10 s"),
        ("startup to the first image answered, s", one, first, ""),
        ("seconds per image, gradio_client", predict_per_image, per_image, "< 1 s"),
    ]
    if in_browser is not None:
        rows.append(
            (f"seconds per image, {DROPPED} dropped in Chromium", predict_per_image, in_browser, "< 1 s")
        )
    for name, baseline, ours, bar in rows:
        print(f"{name:<46} {baseline:>9.3f} {ours:>9.3f} {ours / baseline:>6.2f}x  {bar}")


if __name__ == "__main__":
    main()
