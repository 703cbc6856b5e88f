"""The bad-input corpus's harness: run ``lrr`` as a user would and hold it to the
contract every bad input must meet (lowrank_runner/errors.py):

* a non-zero exit code (2 for command-line usage, 1 otherwise),
* no Python traceback, no hang (every call has a time limit),
* the exact message (``error: ...`` line), naming the file/line/recipe path and the fix,
* nothing half-written left behind (:func:`snapshot` before, compare after).

``lrr(...)`` runs the command in-process through Typer's test runner (fast: torch is
imported once per test session); ``lrr(..., subprocess=True)`` runs the real ``lrr``
process (hangs, signals, standard input, anything that needs a fresh interpreter).
"""

from __future__ import annotations

import os
import re
import subprocess as sp
import sys
from dataclasses import dataclass
from pathlib import Path


# a message at its recipe line: "FILE:LINE:COL: [recipe.path: ]MESSAGE" or "--set KEY=VALUE: MESSAGE"
RECIPE_AT = re.compile(r"^(error: )?(\S+:\d+:\d+: |--set )")


def _located(line: str, message: str) -> bool:
    """``line`` is ``message`` named at its recipe line (validation, or the model showed it:
    lowrank_runner.recipe.load.at_recipe_lines)."""
    return bool(RECIPE_AT.match(line)) and line.endswith(": " + message)


@dataclass
class Result:
    code: int
    stdout: str
    stderr: str
    exception: BaseException | None = None  # in-process only: an exception that escaped the CLI

    @property
    def output(self) -> str:
        return self.stdout + self.stderr

    def error_lines(self) -> list[str]:
        return [ln for ln in self.stderr.splitlines() if ln.strip()]


def lrr(*args: str, cwd: Path | None = None, subprocess: bool = False, timeout: float = 120,
        input: str | None = None, env: dict | None = None) -> Result:
    """Run ``lrr ARGS`` (arguments are converted to str)."""
    argv = [str(a) for a in args]
    if subprocess:
        full_env = {**os.environ, **(env or {})}
        proc = sp.run([sys.executable, "-m", "lowrank_runner", *argv], cwd=cwd, capture_output=True, text=True,
                      timeout=timeout, input=input if input is not None else "", env=full_env)
        return Result(proc.returncode, proc.stdout, proc.stderr)
    from typer.testing import CliRunner

    from lowrank_runner.cli import app

    old = Path.cwd()
    if cwd is not None:
        os.chdir(cwd)
    try:
        res = CliRunner().invoke(app, argv, input=input or "", env=env, catch_exceptions=True)
    finally:
        os.chdir(old)
    exc = res.exception if res.exception is not None and not isinstance(res.exception, SystemExit) else None
    return Result(res.exit_code, res.stdout, res.stderr, exc)


def assert_clean_error(result: Result, message: str | None = None, *, code: int | None = None,
                       contains: tuple[str, ...] = ()) -> None:
    """A user error: non-zero exit (``code`` if given), no traceback, and ``message`` as
    one whole line of stderr (``error: `` prefix optional in ``message``), or as a recipe
    problem's message after its ``FILE:LINE:COL: recipe.path: `` (validation caught it)."""
    assert result.exception is None, f"an exception escaped the CLI: {result.exception!r}\n{result.output}"
    assert "Traceback (most recent call last)" not in result.output, result.output
    assert "internal error in lowrank-runner" not in result.output, result.output  # the CLI's last resort: a bug
    assert result.code != 0, f"exit 0 for a bad input:\n{result.output}"
    if code is not None:
        assert result.code == code, f"exit {result.code}, expected {code}:\n{result.output}"
    if message is not None:
        lines = result.error_lines()
        # the same message at its recipe line: "FILE:LINE:COL: recipe.path: MESSAGE" (validation found it)
        # or "FILE:LINE:COL: MESSAGE" / "--set KEY=VALUE: MESSAGE" (the model showed it: at_recipe_lines)
        located = any(_located(ln, message) for ln in lines)
        assert message in lines or f"error: {message}" in lines or located, \
            f"expected the line\n  {message}\nin stderr:\n" + "\n".join(lines)
    for part in contains:
        assert part in result.output, f"expected {part!r} in:\n{result.output}"


def snapshot(root: Path) -> dict[str, int]:
    """Every file under ``root`` with its size (to prove a failed command wrote nothing)."""
    return {str(p.relative_to(root)): p.stat().st_size for p in sorted(root.rglob("*")) if p.is_file()}
