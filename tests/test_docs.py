"""The documentation against the code, in this process: every config key explained, the reference
pages complete, the pages' commands found. docs/hooks/reference.py generates the configuration
reference from the composed config and docs/config_keys.yaml; a key added to conf/ without a meaning
there fails here, by name. Running every documented command: tests/e2e/test_docs.py.
"""

from __future__ import annotations

from helpers import COMMANDS, reference

# --- the configuration reference ---------------------------------------------------------------


def test_every_config_key_has_a_meaning():
    missing = reference.undocumented()
    assert not missing, (
        f"config keys without a meaning in docs/config_keys.yaml: {', '.join(missing)} "
        "(add a line `key: what it does` there)"
    )


def test_a_key_missing_from_the_meanings_is_named(monkeypatch):
    """The check bites: a key conf/ composes but the meanings lack is reported by its name."""
    known = reference.meanings()
    del known["data.cache_mb"], known["optimizer.momentum"]
    monkeypatch.setattr(reference, "meanings", lambda: known)
    assert {"data.cache_mb", "optimizer.momentum"} <= set(reference.undocumented())


def test_meanings_name_only_keys_that_exist():
    """A key renamed or removed from conf/ leaves no stale line behind."""
    composed = {key.path for _, _, key in reference.every_key()}
    stale = sorted(set(reference.meanings()) - composed)
    assert not stale, f"docs/config_keys.yaml explains keys conf/ no longer has: {', '.join(stale)}"


def test_reference_page_has_every_option_and_key():
    page = reference.config_page()
    for group in (*reference.GROUPS, *reference.HYDRA_GROUPS):
        for option in reference.options(group):
            assert f"### `{group}={option}`" in page
    for _, _, key in reference.every_key():
        assert f"| `{key.path}` |" in page
    assert "**undocumented**" not in page


def test_command_reference_has_every_console_script():
    names = reference.commands()
    assert names[0] == "visiontune-train"
    assert {"visiontune-predict", "visiontune-evaluate", "visiontune-export"} <= set(names)
    assert "usage: visiontune-predict" in reference.help_text("visiontune-predict")


def test_the_pages_show_commands():
    pages = {page for page, _ in COMMANDS}
    assert "README.md" in pages and len(COMMANDS) > 20, COMMANDS
