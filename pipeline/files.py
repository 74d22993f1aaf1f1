"""Small report files at fixed paths, written the same way by every stage."""

import csv
import json
import os
from collections.abc import Callable
from pathlib import Path


def write_json(path: str | Path, payload: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def write_csv(path: str | Path, rows: list[dict], columns: list[str] | None = None) -> None:
    """One row per dict; `columns` fixes the header, leaving missing values empty."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as file:
        writer = csv.DictWriter(file, fieldnames=columns or list(rows[0]), restval="")
        writer.writeheader()
        writer.writerows(rows)


def write_atomically(path: str | Path, write: Callable[[Path], None]) -> None:
    """`write(temporary)` beside `path`, then a rename onto it: readers, and a run that
    was killed, see the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    write(temporary)
    temporary.replace(path)
