"""reports/report.html: the evaluation on one self-contained page (no files beside
it, no network), docs/trust.md: accuracies, a sortable per-label table,
a confusion matrix whose cells open their images, the most confused pairs and the
top losses, calibration, the data audit (label issues, near-duplicates and leakage,
outliers) and the training curves."""

import base64
import html
import io
from collections import Counter
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pandas as pd

from pipeline.data.images import load_rgb
from pipeline.evaluation.metrics import wrong

STYLE = """
body { font: 15px/1.4 system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
table { border-collapse: collapse; margin: 1em 0; }
th, td { padding: .3em .8em; border-bottom: 1px solid #ddd; text-align: right; }
table.sortable th { cursor: pointer; background: #f4f4f4; user-select: none; }
td:first-child, th:first-child { text-align: left; }
.accuracy { display: flex; gap: 2em; }
.accuracy div { font-size: 2em; } .accuracy span { display: block; font-size: .45em; color: #666; }
.warning { background: #fff4d6; padding: .5em 1em; border-left: 4px solid #e0a800; }
.gallery { display: flex; flex-wrap: wrap; gap: 1em; }
.gallery figure { margin: 0; width: 128px; font-size: 12px; overflow-wrap: anywhere; }
.pair { display: flex; gap: .5em; border: 1px solid #ddd; padding: .5em; }
table.confusion td a { display: block; min-width: 2.5em; text-decoration: none; color: inherit; }
table.confusion td.right { background: #e3efff; } table.confusion td.wrong { background: #ffe3e3; }
table.confusion td.empty { color: #bbb; }
.cell { display: none; } .cell:target { display: block; }
img.plot { max-width: 100%; }
"""

# Sorting by any column: click a header, click again to reverse.
SORT_SCRIPT = """
document.querySelectorAll("table.sortable th").forEach((th, column) => th.addEventListener("click", () => {
  const body = th.closest("table").tBodies[0];
  const descending = th.dataset.order !== "desc";
  th.dataset.order = descending ? "desc" : "asc";
  const key = row => { const t = row.cells[column].dataset.value ?? row.cells[column].textContent;
                       return isNaN(parseFloat(t)) ? t : parseFloat(t); };
  [...body.rows].sort((a, b) => (key(a) > key(b) ? 1 : key(a) < key(b) ? -1 : 0) * (descending ? -1 : 1))
    .forEach(row => body.appendChild(row));
}));
"""


@dataclass
class Page:
    title: str
    metrics: dict
    predictions: pd.DataFrame  # evaluate's predictions of `split`'s images
    labels: list[str]
    split: str  # the split the confusion matrix and the top losses are of
    warnings: list[str]
    plots_dir: Path
    calibration: dict  # the checkpoint's: temperature, rejection_threshold, keep, fitted_on
    label_issues: list[dict]  # flagged ones only
    near_duplicates: list[dict]
    outliers: list[dict]
    images_shown: int  # at most this many thumbnails per gallery


def data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


@cache  # an image may be in several galleries
def thumbnail_uri(path: str, size: int = 128) -> str:
    image = load_rgb(path, min_side=size)
    image.thumbnail((size, size))
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()


def figure(path: str, caption: str) -> str:
    return (
        f'<figure><img src="{thumbnail_uri(path)}" alt="{html.escape(path)}">'
        f"<figcaption>{caption}<br>{html.escape(Path(path).name)}</figcaption></figure>"
    )


def gallery(figures: list[str], total: int) -> str:
    if not figures:
        return "<p>None.</p>"
    more = f"<p>The first {len(figures)} of {total}; all are in the CSV.</p>" if total > len(figures) else ""
    return f'<div class="gallery">{"".join(figures)}</div>{more}'


def bold(text: str) -> str:
    return f"<b>{html.escape(text)}</b>"


def class_table(per_class: dict) -> str:
    head = "".join(f"<th>{name}</th>" for name in ("label", "count", "precision", "recall", "F1"))
    rows = []
    for label, s in per_class.items():
        cells = [f"<td>{html.escape(label)}</td>", f"<td>{s['count']}</td>"]
        cells += [f'<td data-value="{s[k]}">{s[k]:.1%}</td>' for k in ("precision", "recall", "f1")]
        rows.append(f"<tr>{''.join(cells)}</tr>")
    return f'<table class="sortable"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>'


def cell_id(actual: int, predicted: int) -> str:
    return f"cell-{actual}-{predicted}"  # indices: labels may hold any character


def confusion_explorer(page: Page) -> str:
    """The confusion matrix as a table; a cell links to a panel with its images
    (`report.html#cell-A-P` opens it directly), the first `images_shown` of them."""
    chosen = page.predictions
    actual_codes, predicted_codes = chosen["actual"].cat.codes, chosen["predicted"].cat.codes
    header = "".join(f"<th>{html.escape(label)}</th>" for label in page.labels)
    body, panels = [], []
    for a, actual in enumerate(page.labels):
        tds = []
        for p, predicted in enumerate(page.labels):
            members = chosen[(actual_codes == a) & (predicted_codes == p)]
            kind = "empty" if members.empty else "right" if a == p else "wrong"
            link = f'<a href="#{cell_id(a, p)}">{len(members)}</a>' if len(members) else "0"
            tds.append(f'<td class="{kind}">{link}</td>')
            if len(members):
                # right: the least sure first; wrong: the surest mistakes first
                shown = members.sort_values("confidence", ascending=a == p, kind="stable")
                figures = [
                    figure(path, f"{confidence:.0%}")
                    for path, confidence in shown[["path", "confidence"]]
                    .head(page.images_shown)
                    .itertuples(index=False)
                ]
                title = f"<h3>{bold(actual)} predicted as {bold(predicted)} ({len(members)})</h3>"
                panels.append(
                    f'<div class="cell" id="{cell_id(a, p)}">{title}{gallery(figures, len(members))}</div>'
                )
        body.append(f"<tr><th>{html.escape(actual)}</th>{''.join(tds)}</tr>")
    return (
        f"<p>{page.split.capitalize()} images, {len(chosen)}: rows are the actual label, columns the "
        "predicted one. Click a number to see its images.</p>"
        f'<table class="confusion"><thead><tr><th>actual \\ predicted</th>{header}</tr></thead>'
        f"<tbody>{''.join(body)}</tbody></table>{''.join(panels)}"
    )


def most_confused(page: Page, count: int = 5) -> str:
    pairs = Counter(
        zip(*(wrong(page.predictions)[column] for column in ("actual", "predicted")), strict=True)
    )
    if not pairs:
        return "<p>No confusions.</p>"
    items = [f"<li>{bold(a)} taken for {bold(p)}: {n}</li>" for (a, p), n in pairs.most_common(count)]
    return f"<ul>{''.join(items)}</ul>"


def top_losses(page: Page) -> str:
    """The images the model is most wrong about: lowest probability of the actual label."""
    mistakes = wrong(page.predictions).sort_values("confidence", ascending=False, kind="stable")
    figures = [
        figure(r.path, f"{bold(r.actual)} taken for {bold(r.predicted)} ({r.confidence:.0%})")
        for r in mistakes.head(page.images_shown).itertuples(index=False)
    ]
    return gallery(figures, len(mistakes))


def calibration_section(page: Page) -> str:
    c, m = page.calibration, page.metrics.get(page.split, {})
    lines = [
        f"Temperature {c['temperature']:.3f}, fitted on {html.escape(c['fitted_on'])}: the exported "
        "models' probabilities are divided through it already.",
    ]
    if "expected_calibration_error" in m:
        lines.append(
            f"Expected calibration error on the {page.split} images: {m['expected_calibration_error']:.3f} "
            f"(before scaling {m['expected_calibration_error_uncalibrated']:.3f})."
        )
        lines.append(
            f'"Unknown" below {c["rejection_threshold"]:.3f} confidence (chosen to keep {c["keep"]:.0%} '
            f"of held-out images): {m['kept']:.1%} of the {page.split} images keep a label, "
            f"{m['kept_accuracy']:.1%} of those correctly."
        )
    plot = page.plots_dir / "reliability.png"
    image = f'<img class="plot" src="{data_uri(plot)}" alt="reliability diagram">' if plot.exists() else ""
    return "".join(f"<p>{line}</p>" for line in lines) + image


def pair_figure(pair: dict) -> str:
    first = figure(pair["path"], f"{pair['split']}: {bold(pair['label'])}")
    second = figure(pair["other_path"], f"{pair['other_split']}: {bold(pair['other_label'])}")
    return (
        f'<div class="pair">{first}{second}<p>{pair["kind"]}<br>similarity {pair["similarity"]:.3f}</p></div>'
    )


def audit_section(page: Page) -> str:
    issues = [
        figure(
            r["path"],
            f"{r['split']}: given {bold(r['given_label'])}, looks like {bold(r['suggested_label'])}",
        )
        for r in page.label_issues[: page.images_shown]
    ]
    pairs = [pair_figure(p) for p in page.near_duplicates[: page.images_shown]]
    kinds = Counter(p["kind"] for p in page.near_duplicates)
    odd = [
        figure(r["path"], f"{r['split']}: {bold(r['label'])} (typicality {r['typicality']:.2f})")
        for r in page.outliers
    ]
    return (
        f"<h3>Possible label errors ({len(page.label_issues)})</h3>"
        "<p>Training and validation images whose label the out-of-fold predictions contradict, "
        "most likely wrong first (reports/label_issues.csv ranks more).</p>"
        f"{gallery(issues, len(page.label_issues))}"
        f"<h3>Near-duplicates ({', '.join(f'{n} {k}' for k, n in sorted(kinds.items())) or 'none'})</h3>"
        "<p>Leakage: the same picture in training and test, which inflates the test score. "
        "Conflict: the same picture under two labels. (reports/near_duplicates.csv)</p>"
        f"{gallery(pairs, len(page.near_duplicates))}"
        "<h3>Least typical images</h3><p>Unlike any other training image: worth a look.</p>"
        f"{gallery(odd, len(odd))}"
    )


def render(page: Page) -> str:
    accuracies = "".join(
        f"<div>{values['accuracy']:.1%}<span>{split} accuracy</span></div>"
        for split, values in page.metrics.items()
    )
    sections = [f"<h1>{html.escape(page.title)}</h1>", f'<div class="accuracy">{accuracies}</div>']
    sections += [f'<p class="warning">{html.escape(w)}</p>' for w in page.warnings]
    for split in ("test", "validation"):
        if split in page.metrics:
            sections += [f"<h2>Per label, {split}</h2>", class_table(page.metrics[split]["per_class"])]
    sections += [
        "<h2>Confusion matrix</h2>",
        confusion_explorer(page),
        "<h3>Most confused</h3>",
        most_confused(page),
        "<h2>Top losses</h2>",
        top_losses(page),
        "<h2>Calibration</h2>",
        calibration_section(page),
        "<h2>Data audit</h2>",
        audit_section(page),
        "<h2>Training</h2>",
        f'<img class="plot" src="{data_uri(page.plots_dir / "training_curves.png")}" alt="training curves">',
    ]
    return (
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(page.title)}</title>'
        f"<style>{STYLE}</style></head><body>{''.join(sections)}<script>{SORT_SCRIPT}</script></body></html>"
    )
