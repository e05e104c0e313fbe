"""The code's own shape, read from its syntax trees: the limits ruff cannot express.

Ruff guards complexity (C901) and argument counts (PLR0913); these tests guard the rest of the
layout's promises: short function bodies, short positional calls, a one-line summary atop every
module, commands beside the library (never imported by it) and inference without the training loop.
"""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "visiontune"
MAX_BODY_LINES = 40  # a function body, its docstring not counted
MAX_POSITIONAL = 6  # arguments in one call; more travel as keywords or a dataclass
COMMANDS = ("visiontune.commands", "visiontune.train", "visiontune.search")
INFERENCE = ("predict", "evaluate", "export")
TRAINING = ("engine", "frozen", "pipeline", "optim", "recorder", "resume", "checkpoint", "sweep", "models")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


@cache
def tree(name: str) -> ast.Module:
    return ast.parse(MODULES[name].read_text(), filename=str(MODULES[name]))


def functions(name: str):
    for node in ast.walk(tree(name)):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            yield node


def body_lines(function: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    body = function.body
    if len(body) > 1 and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        body = body[1:]  # the docstring
    return body[-1].end_lineno - body[0].lineno + 1


def imported(name: str) -> set[str]:
    """The visiontune modules `name` imports, at its top or inside its functions."""
    found = set()
    package = name if MODULES[name].name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(tree(name)):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # from . import x, from .store import y
                base = ".".join(
                    [*package.split(".")[: len(package.split(".")) - node.level + 1], base]
                ).strip(".")
            found.add(base)
            found |= {f"{base}.{alias.name}" for alias in node.names}
    return {m for m in found if m in MODULES}


def reachable(name: str) -> set[str]:
    seen, todo = set(), [name]
    while todo:
        current = todo.pop()
        for other in imported(current) - seen:
            seen.add(other)
            todo.append(other)
    return seen


def is_command(name: str) -> bool:
    return any(name == c or name.startswith(c + ".") for c in COMMANDS)


@pytest.mark.parametrize("name", sorted(MODULES))
def test_every_module_opens_with_a_line_that_says_what_it_is_for(name):
    docstring = ast.get_docstring(tree(name))
    assert docstring and docstring.splitlines()[0].strip(), f"{MODULES[name]} has no opening docstring"


@pytest.mark.parametrize("name", sorted(MODULES))
def test_function_bodies_stay_short(name):
    long = [f"{f.name} ({body_lines(f)} lines)" for f in functions(name) if body_lines(f) > MAX_BODY_LINES]
    assert not long, f"{name}: bodies over {MAX_BODY_LINES} lines: {', '.join(long)}"


@pytest.mark.parametrize("name", sorted(MODULES))
def test_no_call_passes_more_than_six_positional_arguments(name):
    calls = [
        f"line {node.lineno}"
        for node in ast.walk(tree(name))
        if isinstance(node, ast.Call) and len(node.args) > MAX_POSITIONAL
    ]
    assert not calls, (
        f"{name}: calls with more than {MAX_POSITIONAL} positional arguments at {', '.join(calls)}"
    )


@pytest.mark.parametrize("name", sorted(n for n in MODULES if not is_command(n)))
def test_the_library_imports_no_command(name):
    commands = sorted(m for m in imported(name) if is_command(m))
    assert not commands, f"{name} imports the command module(s) {commands}"


@pytest.mark.parametrize("command", INFERENCE)
def test_inference_commands_import_no_training_module(command):
    name = next(n for n in MODULES if n.rsplit(".", 1)[-1] == command)
    training = sorted(m for m in reachable(name) if m.rsplit(".", 1)[-1] in TRAINING)
    assert not training, f"{name} reaches training module(s) {training}"
