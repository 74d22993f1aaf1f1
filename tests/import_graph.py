"""The project modules a stage's process imports, read from the source (every
import statement, function-level ones included), for the layout tests."""

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
STAGES = ("split", "extract", "train", "evaluate", "convert")
DOORS = (*STAGES, "predict", "retrain", "params", "manifest", "storage", "api", "app")


def module_file(name: str) -> Path | None:
    base = REPO / name.replace(".", "/")
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def direct_imports(name: str) -> set[str]:
    """Project modules named by import statements in module `name`, and the
    packages above each (Python runs their __init__.py too)."""
    found = set()
    for node in ast.walk(ast.parse(module_file(name).read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
    modules = {n for n in found if n.split(".")[0] == "pipeline" and module_file(n)}
    return modules | {".".join(m.split(".")[:i]) for m in modules for i in range(1, m.count(".") + 1)}


def imported_modules(name: str) -> set[str]:
    """`name` and every project module it imports, directly or not."""
    seen, pending = set(), [name]
    while pending:
        module = pending.pop()
        if module not in seen:
            seen.add(module)
            pending += direct_imports(module)
    return seen


def imported_files(stage: str) -> set[str]:
    """The files of `pipeline.<stage>`'s imports, relative to the project root."""
    return {module_file(m).relative_to(REPO).as_posix() for m in imported_modules(f"pipeline.{stage}")}
