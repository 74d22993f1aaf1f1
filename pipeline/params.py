"""`python -m pipeline.params [overrides]`: write params.yaml, conf/ composed.

params.yaml is what `dvc repro` runs with and what DVC tracks. `dvc exp run`
writes it the same way (DVC's Hydra composition); run this after editing conf/
when you use plain `dvc repro`.
"""

import sys

from dvc.utils.hydra import compose_and_dump

from pipeline.project.config import CONF_DIR, checked_overrides

PARAMS_FILE = CONF_DIR.parent / "params.yaml"


def compose_params(overrides: list[str]) -> None:
    compose_and_dump(PARAMS_FILE, str(CONF_DIR), None, "config", str(CONF_DIR.parent), overrides)


def main() -> None:
    compose_params(checked_overrides(sys.argv[1:]))
    print(f"wrote {PARAMS_FILE}")


if __name__ == "__main__":
    main()
