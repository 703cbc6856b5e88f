"""The house holds (docs/architecture.md): the import contracts in pyproject.toml
(``[tool.importlinter]``: the layers, no import circles, torch-free recipe, plan and
run-directory stages and catalogues) kept, no private name used outside its module, and
no task or method named outside ``tasks/`` and ``methods/``. The same check by hand:
``lint-imports`` in the repository."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "lowrank_runner"


def modules() -> dict[str, Path]:
    """Every module of the package by dotted name."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(REPO).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def test_the_import_contracts_are_kept():
    """In a process of its own: import-linter writes to the stderr it found at import time,
    which pytest's capture may have replaced by then (\"lost sys.stderr\" after other tests)."""
    import subprocess
    import sys

    code = ("import sys; from importlinter.cli import lint_imports; "
            f"sys.exit(lint_imports(config_filename={str(REPO / 'pyproject.toml')!r}, no_cache=True, no_logo=True))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stdout + done.stderr


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def private_uses(name: str, path: Path, known: dict[str, Path]) -> list[str]:
    """Private names of other modules that ``name`` imports or reads through a module it
    imported (``from lowrank_runner.x import _y``, ``x._y``)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    aliases, found = {}, []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            if not base.startswith("lowrank_runner"):
                continue
            for alias in node.names:
                target = f"{base}.{alias.name}"
                if target in known:
                    aliases[alias.asname or alias.name] = target
                elif _private(alias.name) and base != name:
                    found.append(f"{name}: from {base} import {alias.name}")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("lowrank_runner") and alias.asname:
                    aliases[alias.asname] = alias.name
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases \
                and _private(node.attr) and aliases[node.value.id] != name:
            found.append(f"{name}: {aliases[node.value.id]}.{node.attr}")
    return found


def test_no_private_name_is_used_outside_its_module():
    known = modules()
    found = [use for name, path in known.items() for use in private_uses(name, path, known)]
    assert found == []


def _registered_names() -> tuple[set[str], set[str]]:
    from lowrank_runner.methods.registry import method_specs
    from lowrank_runner.tasks.registry import TASKS

    return set(TASKS), {name for name, spec in method_specs().items() if spec.source == "built-in"}


def _strings(node) -> list[str]:
    """The string constants of a comparison operand (a constant, or a tuple/list/set of them)."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return [s for item in node.elts for s in _strings(item)]
    return []


def named(path: Path, names: set[str]) -> list[str]:
    """Where ``path`` tests a value against one of ``names`` (``x == "chat"``,
    ``name in ("squad_v2", ...)``) or keys a mapping by them (``{"cola": ...}``)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            operands = [node.left, *node.comparators]
            found += [f"{path}:{node.lineno}: {s!r}" for o in operands for s in _strings(o) if s in names]
        elif isinstance(node, ast.Dict):
            found += [f"{path}:{node.lineno}: {k.value!r}" for k in node.keys
                      if isinstance(k, ast.Constant) and k.value in names]
    return found


@pytest.mark.parametrize("kind", ["tasks", "methods"])
def test_only_its_own_package_names_a_task_or_a_method(kind):
    tasks, methods = _registered_names()
    names = tasks if kind == "tasks" else methods
    found = [hit for name, path in modules().items() if not name.startswith(f"lowrank_runner.{kind}")
             for hit in named(path, names)]
    assert found == []


def test_the_checks_find_what_they_look_for(tmp_path):
    """The two hand-written checks above, on code that breaks them."""
    known = {"lowrank_runner.a": tmp_path / "a.py", "lowrank_runner.b": tmp_path / "b.py"}
    known["lowrank_runner.b"].write_text("from lowrank_runner.a import _hidden, shown\n"
                                         "import lowrank_runner.a as a\nprint(a._also, a.fine, a.__doc__)\n")
    assert private_uses("lowrank_runner.b", known["lowrank_runner.b"], known) == [
        "lowrank_runner.b: from lowrank_runner.a import _hidden", "lowrank_runner.b: lowrank_runner.a._also"]
    code = tmp_path / "c.py"
    code.write_text('if task["name"] == "chat" or name in ("squad_v2", "other"):\n    NAMES = {"cola": "CoLA"}\n')
    found = named(code, {"chat", "squad_v2", "cola"})
    assert [hit.rsplit(": ", 1)[1] for hit in found] == ["'chat'", "'squad_v2'", "'cola'"]
