"""params.yaml: conf/ composed, what `dvc repro` runs with (docs/pipeline.md).

conf/ is the source, yet `dvc exp run -S key=value` writes its values into
params.yaml alone (conf/ keeps its own), `dvc exp apply` brings them back there,
and a `dvc exp run -S` that fails leaves them there. Composing conf/ again, as
`python -m pipeline.params` and `retrain` do, would drop them without a word: a
model the user chose reverted overnight. So before params.yaml is written again,
`dropped_values` names each value it holds that neither conf/ now nor conf/ as
last committed gives (a value conf/ gave before an edit of conf/ is simply
replaced), and the user decides: into conf/, or discarded.
"""

import io
import json
import subprocess
import tarfile
import tempfile
from pathlib import Path

import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf


def composed(conf_dir: Path, overrides: list[str]) -> dict:
    """conf/ (`conf_dir`) composed as params.yaml holds it: interpolations resolved."""
    with initialize_config_dir(str(conf_dir), version_base="1.3"):
        return OmegaConf.to_container(compose("config", overrides=overrides), resolve=True)


def committed(conf_dir: Path) -> dict | None:
    """conf/ as last committed, composed; None outside git, before the first commit,
    or when that conf/ does not compose."""
    top = subprocess.run(
        ["git", "rev-parse", "--show-toplevel"], cwd=conf_dir, capture_output=True, text=True
    )
    if top.returncode != 0:
        return None
    tree = f"HEAD:{conf_dir.resolve().relative_to(Path(top.stdout.strip()).resolve()).as_posix()}"
    # from the top: git archive run inside the folder it archives refuses ("untracked")
    archive = subprocess.run(
        ["git", "archive", "--format=tar", tree], cwd=top.stdout.strip(), capture_output=True
    )
    if archive.returncode != 0:
        return None
    with tempfile.TemporaryDirectory(prefix="conf-") as folder:
        with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
            tar.extractall(folder, filter="data")
        try:
            return composed(Path(folder), [])
        except Exception:  # Hydra raises many types for a conf/ it cannot compose
            return None


def leaves(tree, prefix: str = "") -> dict[str, object]:
    """`{"head.type": "mlp", ...}`: each setting by its dotted name (lists are values)."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    found = {}
    for key, value in tree.items():
        found |= leaves(value, f"{prefix}.{key}" if prefix else str(key))
    return found


def dropped_values(params_file: Path, conf_dir: Path, overrides: list[str]) -> list[str]:
    """`head.type = "mlp" (conf/: "logistic")` for each value of `params_file` that
    writing conf/ composed with `overrides` would drop; none outside git, where a
    value conf/ gave before an edit cannot be told from one set another way."""
    if not params_file.exists():
        return []
    before = committed(conf_dir)
    if before is None:
        return []
    held = leaves(yaml.safe_load(params_file.read_text(encoding="utf-8")) or {})
    wanted, before = leaves(composed(conf_dir, overrides)), leaves(before)
    return [
        f"{key} = {json.dumps(value)} (conf/: {json.dumps(wanted.get(key))})"
        for key, value in held.items()
        if value != wanted.get(key) and value != before.get(key)
    ]
