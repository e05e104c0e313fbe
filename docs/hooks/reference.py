"""The reference pages, generated at every `mkdocs build` (an mkdocs hook, listed in mkdocs.yml).

- reference/config.md: every key of every option of every config group, composed by Hydra from the
  installed `visiontune.conf` (the same files `visiontune-train` reads), with its default, its type
  (the typed config's annotation where there is one, else the YAML value's), its allowed values and
  its meaning from docs/config_keys.yaml, the one place those meanings are written.
- reference/commands.md: each console script's own `--help`, run in a subprocess.

tests/helpers.py imports this file for tests/test_docs.py: a key without a meaning fails there, naming it.
`python docs/hooks/reference.py` prints both pages.
"""

from __future__ import annotations

import dataclasses
import html
import os
import subprocess
import sys
from importlib import resources
from importlib.metadata import entry_points
from pathlib import Path
from typing import NamedTuple

import yaml

DOCS = Path(__file__).resolve().parents[1]
KEYS_FILE = DOCS / "config_keys.yaml"
PACKAGE = "visiontune.conf"
# Groups selected with `group=option`, in the order train.yaml's defaults list them.
GROUPS = ("model", "mode", "data", "optimizer", "scheduler", "augment", "search")
# Groups whose options change Hydra's own config, or several groups at once (recipe, a global
# package): documented from their YAML files.
HYDRA_GROUPS = {"recipe": "", "hydra/launcher": "hydra.launcher."}
# Values documented whole (a mapping of module paths, builder arguments or distributions), not key by key.
WHOLE_SUFFIXES = ("layer_groups", "pretrained_kwargs", "scratch_kwargs", "search.space")
HELP_WIDTH = "100"


class Key(NamedTuple):
    """One documented row: a key's dotted path and its value in one option."""

    path: str
    value: object


# --- the config ---------------------------------------------------------------------------------


def options(group: str) -> list[str]:
    """The options of a group: its YAML files' names."""
    folder = resources.files(PACKAGE).joinpath(*group.split("/"))
    return sorted(p.name.removesuffix(".yaml") for p in folder.iterdir() if p.name.endswith(".yaml"))


def _flatten(tree, prefix: str = "") -> list[Key]:
    if isinstance(tree, dict) and tree and not prefix.rstrip(".").endswith(WHOLE_SUFFIXES):
        return [k for name, sub in tree.items() for k in _flatten(sub, f"{prefix}{name}.")]
    return [Key(prefix.rstrip("."), tree)]


def compose(overrides: list[str]) -> dict:
    """The config visiontune-train composes from these overrides, unresolved (`${epochs}` stays)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    GlobalHydra.instance().clear()
    with initialize_config_module(config_module=PACKAGE, version_base="1.3"):
        cfg = hydra_compose("train", overrides=overrides)
    return OmegaConf.to_container(cfg, resolve=False)


def _yaml_of(group: str, option: str) -> dict:
    text = resources.files(PACKAGE).joinpath(*group.split("/"), f"{option}.yaml").read_text()
    tree = yaml.safe_load(text) or {}
    tree.pop("defaults", None)
    return tree


def top_level_keys() -> list[Key]:
    """train.yaml's own keys: the composed config without the groups; then lr_find.yaml's own
    (visiontune-lr-find composes train.yaml and adds them)."""
    tree = compose([])
    lr_find = yaml.safe_load(resources.files(PACKAGE).joinpath("lr_find.yaml").read_text())
    own = [k for k in _flatten(tree) if k.path.split(".")[0] not in GROUPS]
    return own + _flatten({"lr_find": lr_find["lr_find"]})


def group_keys(group: str, option: str) -> list[Key]:
    """Every key one option of a group sets, as its path in the composed config."""
    if group in HYDRA_GROUPS:
        return _flatten(_yaml_of(group, option), HYDRA_GROUPS[group])
    tree = compose([f"{group}={option}"]).get(group) or {}
    return _flatten(tree, f"{group}.") if tree else []


def every_key() -> list[tuple[str, str, Key]]:
    """(group, option, key) for every key of every option, top-level keys under group ''."""
    rows = [("", "", k) for k in top_level_keys()]
    for group in (*GROUPS, *HYDRA_GROUPS):
        rows += [(group, option, k) for option in options(group) for k in group_keys(group, option)]
    return rows


def meanings() -> dict[str, dict]:
    """docs/config_keys.yaml: key -> {meaning, values?, type?}; a plain string is the meaning."""
    raw = yaml.safe_load(KEYS_FILE.read_text())
    return {k: v if isinstance(v, dict) else {"meaning": v} for k, v in raw.items()}


def undocumented() -> list[str]:
    """Keys composed from conf/ that docs/config_keys.yaml does not explain."""
    known = meanings()
    missing = {k.path for _, _, k in every_key() if not known.get(k.path, {}).get("meaning")}
    return sorted(missing)


def _typed_fields() -> dict[str, str]:
    """The typed config's annotations (config.ModelSpec, config.Mode), by key path."""
    try:
        from visiontune import config
    except ImportError:
        return {}
    types = {}
    for group, cls_name in (("model", "ModelSpec"), ("mode", "Mode")):
        cls = getattr(config, cls_name, None)
        if cls is not None and dataclasses.is_dataclass(cls):
            types |= {f"{group}.{f.name}": str(f.type) for f in dataclasses.fields(cls)}
    return types


def _type_of(value) -> str:
    if value is None:
        return "null"
    if value == "???":
        return "required"
    if isinstance(value, str) and value.startswith("${"):
        return "interpolation"
    names = {bool: "bool", int: "int", float: "float", str: "str", list: "list", dict: "mapping"}
    return names.get(type(value), type(value).__name__)


def _show(value) -> str:
    if value == "???":
        return "*required*"
    text = yaml.safe_dump(value, default_flow_style=True, width=10_000, sort_keys=False).strip()
    text = text.removesuffix("\n...").strip()
    if "|" in text:  # a pipe would end the table cell, and a backslash shows inside backticks
        return "<code>" + html.escape(text).replace("|", "&#124;") + "</code>"
    return f"`{text}`"


def _cell(text: str) -> str:
    text = " ".join(str(text).split()).replace("|", "\\|")
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _row(key: Key, known: dict, typed: dict) -> str:
    doc = known.get(key.path, {})
    kind = doc.get("type") or typed.get(key.path) or _type_of(key.value)
    kind = kind.replace(" | ", " or ")
    meaning = doc.get("meaning", "**undocumented**")
    cells = (
        f"`{key.path}`",
        _show(key.value),
        f"`{_cell(kind)}`",
        _cell(doc.get("values", "")),
        _cell(meaning),
    )
    return "| " + " | ".join(cells) + " |"


def _default_options() -> dict[str, str | None]:
    """train.yaml's defaults list: the option each group starts with."""
    tree = yaml.safe_load(resources.files(PACKAGE).joinpath("train.yaml").read_text())
    return {k: v for entry in tree["defaults"] if isinstance(entry, dict) for k, v in entry.items()}


def _description(group: str, option: str) -> str:
    """An option's YAML header comment, its first sentence-ish line."""
    text = resources.files(PACKAGE).joinpath(*group.split("/"), f"{option}.yaml").read_text()
    lines = []
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        if not line.startswith("# @package"):
            lines.append(line.lstrip("# ").rstrip())
    return " ".join(lines)


def config_page() -> str:
    known, typed = meanings(), _typed_fields()
    defaults = _default_options()
    header = "| key | default | type | allowed values | meaning |\n|---|---|---|---|---|"
    out = [
        "# Configuration reference",
        "",
        "Generated at every `mkdocs build` from the config files visiontune-train composes "
        "(`conf/` in the repository, `visiontune.conf` once installed) and from the one-line meanings in "
        "`docs/config_keys.yaml`. Pick an option per group (`model=resnet`) and override any key "
        "(`optimizer.lr=3e-4`); `visiontune-train --cfg job` prints the composed config.",
        "",
        "## Top-level keys (`conf/train.yaml`)",
        "",
        header,
        *(_row(k, known, typed) for k in top_level_keys()),
        "",
    ]
    for group in (*GROUPS, *HYDRA_GROUPS):
        all_options = options(group)
        chosen = defaults.get(group)
        default = f" (default: `{chosen}`)" if chosen else " (default: none)" if group in defaults else ""
        out += [f"## `{group}`", "", f"Options: {', '.join(f'`{o}`' for o in all_options)}{default}.", ""]
        for option in all_options:
            keys = group_keys(group, option)
            out += [f"### `{group}={option}`", "", _description(group, option) or "", ""]
            out += [header, *(_row(k, known, typed) for k in keys), ""] if keys else ["No keys.", ""]
    return "\n".join(out)


# --- the commands -------------------------------------------------------------------------------


def commands() -> list[str]:
    """visiontune's console scripts, by name, from its installed entry points."""
    names = {
        ep.name
        for ep in entry_points(group="console_scripts")
        if ep.dist is not None and ep.dist.name == "visiontune"
    }
    return sorted(names, key=lambda n: (n != "visiontune-train", n))


def command_line(name: str) -> list[str]:
    """A console script as an argv prefix, run as its installed entry point: the same code whichever
    module it lives in, and no dependence on PATH."""
    code = (
        "import sys; from importlib.metadata import entry_points as e; "
        f"sys.argv = [{name!r}, *sys.argv[1:]]; "
        f"(ep,) = [x for x in e(group='console_scripts') if x.name == {name!r}]; "
        "sys.exit(ep.load()())"
    )
    return [sys.executable, "-c", code]


def help_text(name: str) -> str:
    """A console script's --help."""
    env = {**os.environ, "COLUMNS": HELP_WIDTH, "NO_COLOR": "1"}
    result = subprocess.run(
        [*command_line(name), "--help"], capture_output=True, text=True, env=env, timeout=120
    )
    if result.returncode != 0:
        raise RuntimeError(f"{name} --help exited {result.returncode}:\n{result.stderr[-2000:]}")
    return result.stdout.rstrip()


def commands_page() -> str:
    out = [
        "# Command reference",
        "",
        "Each command's own `--help`, captured at every `mkdocs build`. `visiontune-train` is a Hydra "
        "application: its options are config overrides (see the [configuration reference](config.md)) "
        "plus Hydra's flags (`-m` for a sweep, `--cfg job` to print the composed config).",
        "",
    ]
    for name in commands():
        out += [f"## `{name}`", "", "```text", help_text(name), "```", ""]
    return "\n".join(out)


# --- the hook -----------------------------------------------------------------------------------

PAGES = {"reference/config.md": config_page, "reference/commands.md": commands_page}


def on_files(files, config):
    """Add the generated pages to the site, as if they were files under docs/."""
    from mkdocs.structure.files import File

    for uri, page in PAGES.items():
        files.append(File.generated(config, uri, content=page()))
    return files


if __name__ == "__main__":
    for make in PAGES.values():
        print(make())
