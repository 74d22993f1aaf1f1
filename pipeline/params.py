"""`python -m pipeline.params [overrides] [--discard]`: write params.yaml, conf/ composed.

params.yaml is what `dvc repro` runs with and what DVC tracks. `dvc exp run`
writes it the same way (DVC's Hydra composition); run this after editing conf/
when you use plain `dvc repro`. A value params.yaml holds that conf/ does not
give (left by `dvc exp run -S`, `dvc exp apply` or an edit) stops it with one
line naming each, exit code 2, until it is put into conf/ or `--discard`ed
(pipeline/project/params_file.py).
"""

import sys

from dvc.utils.hydra import compose_and_dump

from pipeline.project.config import CONF_DIR, checked_overrides
from pipeline.project.params_file import dropped_values

PARAMS_FILE = CONF_DIR.parent / "params.yaml"
DISCARD = "--discard"


def compose_params(overrides: list[str]) -> None:
    compose_and_dump(PARAMS_FILE, str(CONF_DIR), None, "config", str(CONF_DIR.parent), overrides)


def main() -> None:
    overrides = checked_overrides([arg for arg in sys.argv[1:] if arg != DISCARD])
    dropped = [] if DISCARD in sys.argv else dropped_values(PARAMS_FILE, CONF_DIR, overrides)
    if dropped:
        print(
            f"error: params.yaml holds values conf/ does not give: {'; '.join(dropped)}"
            " (left by `dvc exp run -S`, `dvc exp apply` or an edit): to keep them put them in conf/,"
            f" to drop them run `python -m pipeline.params {DISCARD}`",
            file=sys.stderr,
        )
        sys.exit(2)
    compose_params(overrides)
    print(f"wrote {PARAMS_FILE}")


if __name__ == "__main__":
    main()
