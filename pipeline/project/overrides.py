"""Parameter names checked against conf/ (docs/pipeline.md): a parameter or a
group option that conf/ does not have stops the door with one line naming it and the
nearest valid name, exit code 2. Overrides are checked before Hydra composes
anything; a stage's composed configuration once more, for params.yaml.

Without this, a typo cost several lines of Hydra's internals and exit code 1
(`trian.learning_rate=0.1`, `head=mpl`), and the `+trian.learning_rate=0.1` that
Hydra's own hint suggests added a parameter nothing reads: the run went on without
it, as did a stage that `dvc exp run -S +trian.learning_rate=0.1` put it in params.yaml for.
"""

import difflib
from pathlib import Path

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override, ValueType
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf

from pipeline.data.images import SettingError

PLAIN_OR_LISTED = (ValueType.ELEMENT, ValueType.CHOICE_SWEEP, ValueType.SIMPLE_CHOICE_SWEEP)


def dotted_keys(node: DictConfig, prefix: str = "") -> set[str]:
    """Every key of `node` as a dotted path, sections included (`train`, `train.seed`)."""
    keys = set()
    for key, value in node.items_ex(resolve=False):
        path = f"{prefix}{key}"
        keys.add(path)
        if isinstance(value, DictConfig):
            keys |= dotted_keys(value, f"{path}.")
    return keys


def conf_names(conf_dir: Path) -> tuple[set[str], dict[str, list[str]]]:
    """The parameters conf/ defines, each group's options among them, and the groups' options."""
    options = {
        group.name: sorted(option.stem for option in group.glob("*.yaml"))
        for group in conf_dir.iterdir()
        if group.is_dir() and group.name != "hydra"  # hydra/: Hydra's own settings
    }
    primary = OmegaConf.load(conf_dir / "config.yaml")
    keys = dotted_keys(OmegaConf.masked_copy(primary, [k for k in primary if k not in ("defaults", "hydra")]))
    for group, names in options.items():
        for name in names:
            keys |= dotted_keys(OmegaConf.load(conf_dir / group / f"{name}.yaml"), f"{group}.")
    return keys | set(options), options


def nearest(name: str, candidates) -> str:
    close = difflib.get_close_matches(name, sorted(candidates), n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


def unknown_names(overrides: list[str], conf_dir: Path) -> list[str]:
    """One line per override naming a parameter or group option conf/ does not have."""
    try:
        parsed: list[Override] = OverridesParser.create().parse_overrides(overrides)
    except HydraException:
        return []  # not an override Hydra can read: Hydra says so itself
    keys, options = conf_names(conf_dir)
    found = []
    for override in parsed:
        key = override.key_or_group
        if key.split("/")[0].split(".")[0] == "hydra" or override.package is not None:
            continue  # Hydra's own settings, and packages moved by hand: Hydra's to judge
        if key in options and not override.is_delete() and override.value_type in PLAIN_OR_LISTED:
            chosen = override.sweep_string_iterator() if override.is_sweep_override() else [override.value()]
            found += [
                f"{key}={option}: {key} has no option {option}{nearest(option, options[key])};"
                f" its options: {', '.join(options[key])}"
                for option in map(str, chosen)
                if option not in options[key]
            ]
        elif key not in keys:
            found.append(f"{override.input_line}: no such parameter in conf/{nearest(key, keys)}")
    return found


def unknown_parameters(cfg: DictConfig, conf_dir: Path) -> list[str]:
    """One line per parameter of a composed configuration that conf/ does not have."""
    keys, _ = conf_names(conf_dir)
    leaves = {key for key in dotted_keys(cfg) if not isinstance(OmegaConf.select(cfg, key), DictConfig)}
    return [f"{key}: no such parameter in conf/{nearest(key, keys)}" for key in sorted(leaves - keys)]


def check_overrides(overrides: list[str], conf_dir: Path) -> None:
    """SettingError listing every override conf/ has no name for, one per line."""
    found = unknown_names(overrides, conf_dir)
    if found:
        raise SettingError("\n".join(found))


def check_parameters(cfg: DictConfig, conf_dir: Path) -> None:
    """SettingError listing every parameter conf/ has no name for, one per line."""
    found = unknown_parameters(cfg, conf_dir)
    if found:
        raise SettingError("\n".join(found))
