"""Every `visiontune-train` line in README.md and docs/ run with `--cfg job` (compose and check, no
training), sweeps once per swept value."""

from __future__ import annotations

import os
import re
import shlex
import subprocess

import pytest

from helpers import COMMANDS, reference

PLACEHOLDER = re.compile(r"<[^<>\n]+>")


def _values(override: str) -> list[str]:
    """Each value a sweep override takes (an interval: its start); a plain override, itself."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import IntervalSweep

    (parsed,) = OverridesParser.create().parse_overrides([override])
    if not parsed.is_sweep_override():
        return [override]
    key = parsed.get_key_element()
    if isinstance(parsed.value(), IntervalSweep):
        return [f"{key}={parsed.value().start}"]
    return [f"{key}={value}" for value in parsed.sweep_string_iterator()]


def expand(line: str) -> list[list[str]]:
    """The argument lists to check: one for a single run; for a sweep, enough that every swept
    value is composed once (Hydra allows no --cfg with -m)."""
    args = shlex.split(PLACEHOLDER.sub("X", line), comments=True)[1:]
    args = [a for a in args if a != "..."]
    if not {"-m", "--multirun"} & set(args):
        return [args]
    per_override = [_values(a) for a in args if a not in ("-m", "--multirun")]
    runs = max(len(values) for values in per_override)
    return [[values[min(i, len(values) - 1)] for values in per_override] for i in range(runs)]


@pytest.fixture(scope="module")
def cli_env(tmp_path_factory):
    """The CLI's environment: an `sbatch` on PATH (the SLURM preset is refused without one)."""
    bin_dir = tmp_path_factory.mktemp("fake-slurm")
    (bin_dir / "sbatch").write_text("#!/bin/sh\nexit 1\n")
    (bin_dir / "sbatch").chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    return {**env, "PATH": f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"}


def check(args: list[str], env: dict, cwd) -> subprocess.CompletedProcess:
    """visiontune-train with these arguments, composing and checking its config only."""
    command = [*reference.command_line("visiontune-train"), *args, "--cfg", "job"]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def test_a_wrong_command_fails(cli_env, tmp_path):
    """The check bites: a misspelt key in a documented sweep is refused, by name."""
    (args,) = {tuple(a) for a in expand("visiontune-train -m model=resnet epoch=3")}
    result = check(list(args), cli_env, tmp_path)
    assert result.returncode != 0 and "epoch" in result.stderr


@pytest.mark.parametrize(("page", "line"), COMMANDS, ids=[f"{p}:{c[17:60]}" for p, c in COMMANDS])
def test_documented_command_composes(page, line, cli_env, tmp_path):
    for args in expand(line):
        result = check(args, cli_env, tmp_path)
        assert result.returncode == 0, f"{page}: {line}\n  as {shlex.join(args)}\n{result.stderr[-2000:]}"
