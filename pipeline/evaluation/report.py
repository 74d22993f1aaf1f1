"""reports/report.html: the evaluation on one self-contained page (no files beside
it, no network): accuracies, a sortable per-label table, the confusion matrix,
the training curves and thumbnails of the misclassified images."""

import base64
import html
import io
from pathlib import Path

from pipeline.data.images import load_rgb

STYLE = """
body { font: 15px/1.4 system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
table { border-collapse: collapse; margin: 1em 0; }
th, td { padding: .3em .8em; border-bottom: 1px solid #ddd; text-align: right; }
th { cursor: pointer; background: #f4f4f4; user-select: none; }
td:first-child, th:first-child { text-align: left; }
.accuracy { display: flex; gap: 2em; }
.accuracy div { font-size: 2em; } .accuracy span { display: block; font-size: .45em; color: #666; }
.warning { background: #fff4d6; padding: .5em 1em; border-left: 4px solid #e0a800; }
.misclassified { display: flex; flex-wrap: wrap; gap: 1em; }
.misclassified figure { margin: 0; width: 128px; font-size: 12px; }
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


def data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def thumbnail_uri(path: str, size: int = 128) -> str:
    image = load_rgb(path, min_side=size)
    image.thumbnail((size, size))
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()


def class_table(per_class: dict) -> str:
    head = "".join(f"<th>{name}</th>" for name in ("label", "count", "precision", "recall", "F1"))
    rows = []
    for label, s in per_class.items():
        cells = [f"<td>{html.escape(label)}</td>", f"<td>{s['count']}</td>"]
        cells += [f'<td data-value="{s[k]}">{s[k]:.1%}</td>' for k in ("precision", "recall", "f1")]
        rows.append(f"<tr>{''.join(cells)}</tr>")
    return f'<table class="sortable"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>'


def misclassified_gallery(rows: list[dict]) -> str:
    figures = [
        f'<figure><img src="{thumbnail_uri(r["path"])}" alt="{html.escape(r["path"])}">'
        f"<figcaption>{html.escape(r['split'])}: <b>{html.escape(r['actual'])}</b> taken for "
        f"<b>{html.escape(r['predicted'])}</b> ({float(r['confidence']):.0%})<br>"
        f"{html.escape(Path(r['path']).name)}</figcaption></figure>"
        for r in rows
    ]
    return f'<div class="misclassified">{"".join(figures)}</div>' if figures else "<p>None.</p>"


def render(metrics: dict, misclassified: list[dict], warnings: list[str], plots_dir: Path, title: str) -> str:
    accuracies = "".join(
        f"<div>{values['accuracy']:.1%}<span>{split} accuracy</span></div>"
        for split, values in metrics.items()
    )
    sections = [f"<h1>{html.escape(title)}</h1>", f'<div class="accuracy">{accuracies}</div>']
    sections += [f'<p class="warning">{html.escape(w)}</p>' for w in warnings]
    for split in ("test", "validation"):
        if split in metrics:
            sections += [f"<h2>Per label, {split}</h2>", class_table(metrics[split]["per_class"])]
    sections += [
        "<h2>Confusion matrix</h2>",
        f'<img class="plot" src="{data_uri(plots_dir / "confusion_matrix.png")}" alt="confusion matrix">',
        "<h2>Training</h2>",
        f'<img class="plot" src="{data_uri(plots_dir / "training_curves.png")}" alt="training curves">',
        f"<h2>Misclassified images ({len(misclassified)})</h2>",
        misclassified_gallery(misclassified),
    ]
    return (
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{STYLE}</style></head><body>{''.join(sections)}<script>{SORT_SCRIPT}</script></body></html>"
    )
