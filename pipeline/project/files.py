"""Files at fixed paths, written the same way by every stage: atomically, so that
readers, and a run that was killed, see the old file or the new one, never half of one."""

import csv
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pandas takes most of a second to import; the stages that write frames have it
    import pandas as pd


def write_atomically(path: str | Path, write: Callable[[Path], None]) -> None:
    """`write(temporary)` beside `path`, then a rename onto it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(temporary)
        temporary.replace(path)
    finally:
        temporary.unlink(missing_ok=True)


def write_folder_atomically(path: str | Path, write: Callable[[Path], None]) -> None:
    """`write(temporary)` beside `path` (with `path`'s suffix: coremltools saves only to
    a name ending in .mlpackage), then swapped in. A folder cannot be renamed onto a
    full one, so the old one is moved aside first: a run killed in between leaves no
    folder, which DVC reruns, never a half-written one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    old = path.with_name(f".{path.stem}.{os.getpid()}.old{path.suffix}")
    try:
        write(temporary)
        if path.exists():
            path.rename(old)
        temporary.rename(path)
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def write_text(path: str | Path, text: str) -> None:
    write_atomically(path, lambda temporary: temporary.write_text(text, encoding="utf-8"))


def write_json(path: str | Path, payload: dict) -> None:
    write_text(path, json.dumps(payload, indent=2, ensure_ascii=False) + "\n")


def write_frame(path: str | Path, frame: "pd.DataFrame") -> None:
    """A data frame as CSV, without its index."""
    write_atomically(path, lambda temporary: frame.to_csv(temporary, index=False))


def write_csv(path: str | Path, rows: list[dict], columns: list[str] | None = None) -> None:
    """One row per dict; `columns` fixes the header, leaving missing values empty."""

    def write(temporary: Path) -> None:
        with temporary.open("w", newline="", encoding="utf-8") as file:
            writer = csv.DictWriter(file, fieldnames=columns or list(rows[0]), restval="")
            writer.writeheader()
            writer.writerows(rows)

    write_atomically(path, write)
