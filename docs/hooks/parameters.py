"""The Parameters page's tables, generated from conf/ when the site is built (a MkDocs
hook): every setting, its default and the comment conf/ gives it, so the page cannot
drift from the configuration, and a setting added without a comment stops
`mkdocs build` (and tests/test_docs.py) with one line naming it.

A setting's comment is the comment lines right above it and the one after its value;
a group file's opening comment describes that choice of the group. Citations of a
docs page (`docs/trust.md`) become links.
"""

import re
from dataclasses import dataclass
from pathlib import Path

from mkdocs.exceptions import PluginError

MARK = "<!-- parameters from conf/ -->"
DOCS_DIR = Path(__file__).resolve().parents[1]
CONF_DIR = DOCS_DIR.parent / "conf"
NOT_PARAMETERS = {"hydra"}  # how Hydra runs the stages, not what they do

# `key: value  # comment`, `section:  # comment`, or `- group: choice` in `defaults:`
LINE = re.compile(
    r"^(?P<indent> *)(?P<item>- )?(?P<key>\w+):(?: +(?P<value>[^#\s].*?))?(?: +# ?(?P<comment>.*))?$"
)


@dataclass
class Setting:
    key: str  # dotted, as Hydra overrides name it
    value: str | None  # as written in conf/; None for a section that holds settings
    comment: str


def read_settings(path: Path) -> tuple[str, list[Setting]]:
    """A conf/ file's opening comment and its settings, in file order."""
    opening, above, settings, parents = [], [], [], []
    for line in path.read_text(encoding="utf-8").splitlines():
        stripped = line.strip()
        if stripped.startswith("#"):  # the file's own comment until its first setting, then a setting's
            (above if settings or line.startswith(" ") else opening).append(stripped.lstrip("# "))
            continue
        if not stripped:
            above = []
            continue
        if stripped.startswith("- ") and ":" not in stripped:  # `- _self_`: Hydra's order, no setting
            continue
        match = LINE.match(line)
        if not match:
            raise ValueError(f"{path}: cannot read this line for the Parameters page: {line!r}")
        parents = parents[: len(match["indent"]) // 2]
        key = match["key"] if match["item"] else ".".join([*parents, match["key"]])
        settings.append(Setting(key, match["value"], " ".join([*above, match["comment"] or ""]).strip()))
        if match["value"] is None:
            parents.append(match["key"])
        above = []
    return " ".join(opening), settings


def markdown(text: str) -> str:
    """A comment as a table cell: docs/ citations as links to the page, by its title;
    no stray column breaks."""
    text = text.replace("|", "\\|").replace("<", "&lt;")  # `<name>` is text, not an HTML tag
    return re.sub(r"docs/([\w-]+\.md)", lambda cited: f"[{title_of(cited[1])}]({cited[1]})", text)


def title_of(page: str) -> str:
    """A docs page's title: its first line, `# Title`."""
    return (DOCS_DIR / page).read_text(encoding="utf-8").splitlines()[0].removeprefix("# ")


def code(value: str | None) -> str:
    return f"`{value}`" if value not in (None, "") else ""


def undocumented(where: Path, key: str) -> ValueError:
    return ValueError(
        f"{where}: `{key}` has no comment; say what it does beside it "
        "(docs/parameters.md is generated from it)"
    )


def group_tables(conf_dir: Path, groups: list[Setting]) -> list[str]:
    """One table per config group: each choice's file, setting by setting."""
    lines = []
    for group in groups:
        files = sorted((conf_dir / group.key).glob("*.yaml"), key=lambda f: f.stem != group.value)
        read = {f.stem: read_settings(f) for f in files}
        default = f"Default: `{group.key}={group.value}`."
        lines += [f"### `{group.key}`", "", f"{markdown(group.comment)}. {default}", ""]
        lines += [f"- `{group.key}={stem}`: {markdown(opening)}" for stem, (opening, _) in read.items()]
        lines += ["", f"| parameter | {' | '.join(f'`{stem}`' for stem in read)} | meaning |"]
        lines += ["| --- " * (len(read) + 2) + "|"]
        values = {stem: {s.key: s.value for s in settings} for stem, (_, settings) in read.items()}
        comments = {stem: {s.key: s.comment for s in settings} for stem, (_, settings) in read.items()}
        for key in dict.fromkeys(key for keys in values.values() for key in keys):  # every choice's, in order
            if not any(comments[stem].get(key) for stem in read):
                raise undocumented(Path(conf_dir.name, group.key), f"{group.key}.{key}")
            cells = " | ".join(code(values[stem].get(key)) for stem in read)
            lines.append(f"| `{group.key}.{key}` | {cells} | {markdown(meaning(key, comments))} |")
        lines.append("")
    return lines


def meaning(key: str, comments: dict[str, dict[str, str]]) -> str:
    """A group setting's comments in its files, the default's first: a comment another
    choice adds (what it must hold there, say) follows, named by that choice."""
    (default, first), *others = [(stem, c[key]) for stem, c in comments.items() if c.get(key)]
    said = [first] if default == next(iter(comments)) else [f"{default}: {first}"]
    return "; ".join(said + [f"{stem}: {text}" for stem, text in others if text != first])


def parameters_markdown(conf_dir: Path = CONF_DIR) -> str:
    """The tables that stand in for MARK on docs/parameters.md."""
    _, settings = read_settings(conf_dir / "config.yaml")
    defaults = [s for s in settings if "." not in s.key and (conf_dir / s.key).is_dir()]  # `- group: choice`
    lines = ["## Config groups", "", "Choose one file of a group with `<group>=<file>`, e.g. `head=mlp`.", ""]
    lines += group_tables(conf_dir, [group for group in defaults if group.key not in NOT_PARAMETERS])
    section = None
    for setting in settings:
        if setting.key == "defaults" or setting in defaults:
            continue
        top = setting.key.split(".")[0]
        if top != section:
            section = top
            lines += ["", f"## `{top}`", ""]
            if setting.value is None:
                lines += [markdown(setting.comment), ""] if setting.comment else []
            lines += ["| parameter | default | meaning |", "| --- | --- | --- |"]
        if setting.value is None:
            continue
        if not setting.comment:
            raise undocumented(Path(conf_dir.name, "config.yaml"), setting.key)
        lines.append(f"| `{setting.key}` | {code(setting.value)} | {markdown(setting.comment)} |")
    return "\n".join(lines) + "\n"


def on_page_markdown(markdown_text: str, page, **_) -> str:
    """MkDocs hook: fill in docs/parameters.md."""
    if page.file.src_uri != "parameters.md":
        return markdown_text
    if MARK not in markdown_text:
        raise ValueError(f"docs/parameters.md: the line {MARK} the tables stand in for is missing")
    try:
        return markdown_text.replace(MARK, parameters_markdown())
    except ValueError as error:  # one line, not a traceback: which setting lacks its comment
        raise PluginError(str(error)) from None
